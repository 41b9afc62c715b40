#!/usr/bin/env python3
"""The submit hook: the binder runs it once per new job, and it starts that job's worker pod.

The binder starts it with (full CE name, routing info, job id, log file), never waits for
it, ignores its exit status and stops reading its output after 16 lines. So it returns as
soon as the engine has the pod, writes its own log and record, and prints one line.

It runs inside the binder's container with only the standard library, and reaches the
engine through the target named in its configuration file (LAB_HOOK_CONFIG).
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import socket
import sys
import time
from typing import Any

DNS_LABEL_MAX = 63


def job_pod_name(job_id: str, prefix: str = "") -> str:
    """A DNS-1123 pod name for a binder job id (job ids start with digits)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", job_id.lower()).strip("-")
    return f"{prefix}job-{slug}"[:DNS_LABEL_MAX].rstrip("-")


def job_label(job_id: str) -> str:
    """A label value for a job id: at most 63 of [A-Za-z0-9._-]."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", job_id)[:DNS_LABEL_MAX].strip("._-") or "none"


def job_manifest(template: dict[str, Any], args: list[str], prefix: str = "") -> dict[str, Any]:
    """Fill the lab's Pod template in for one job: name, job label, worker arguments."""
    ce, routing, job_id, log_file = args
    values = {"ce": ce, "routing": routing, "job": job_id, "logfile": log_file}
    manifest = copy.deepcopy(template)
    manifest["metadata"]["name"] = job_pod_name(job_id, prefix)
    manifest["metadata"].setdefault("labels", {})["lab.job"] = job_label(job_id)
    for container in manifest["spec"]["containers"]:
        container["command"] = [part.format(**values) for part in container["command"]]
    return manifest


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def apply_podman(target: dict[str, Any], manifest: dict[str, Any]) -> str:
    """Play the manifest through the podman API on its unix socket."""
    conn = _UnixHTTPConnection(target["socket"], timeout=float(target.get("timeout", 60)))
    body = json.dumps(manifest)  # JSON is YAML, and kube play reads YAML.
    conn.request(
        "POST",
        "/v4.0.0/libpod/play/kube",
        body=body,
        headers={"Content-Type": "application/x-yaml"},
    )
    response = conn.getresponse()
    text = response.read().decode(errors="replace")
    if response.status >= 300:
        raise RuntimeError(f"podman API answered {response.status}: {text[:300]}")
    # The pod exists even when its container could not start (no such program, say):
    # podman says so only in the answer, and the pod would look as if it were starting.
    try:
        pods = json.loads(text).get("Pods") or []
    except (ValueError, AttributeError):
        pods = []
    errors = [str(e) for pod in pods for e in (pod.get("ContainerErrors") or [])]
    if errors:
        raise RuntimeError(f"the pod's container did not start: {errors[0][:300]}")
    return text


SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def kubernetes_address(target: dict[str, Any]) -> tuple[str, int]:
    """The API server: the target's `api` ("host:port"), else the in-cluster Service."""
    if target.get("api"):
        host, _, port = str(target["api"]).rpartition(":")
        return host.strip("[]"), int(port)
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    return host.strip("[]"), int(os.environ.get("KUBERNETES_SERVICE_PORT", "443"))


def apply_kubernetes(target: dict[str, Any], manifest: dict[str, Any]) -> str:
    """Create the pod through the Kubernetes API with the pod's service account.

    The target names the namespace (else the account's own); `account_dir` and `api`
    let a test stand in for the cluster's mounted account and its API server.
    """
    import ssl

    account = str(target.get("account_dir") or SERVICE_ACCOUNT)
    # Read for every job: the kubelet rotates the projected token.
    with open(f"{account}/token") as token_file:
        token = token_file.read().strip()
    namespace = target.get("namespace")
    if not namespace:
        with open(f"{account}/namespace") as namespace_file:
            namespace = namespace_file.read().strip()
    manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
    context = ssl.create_default_context(cafile=f"{account}/ca.crt")
    host, port = kubernetes_address(target)
    conn = http.client.HTTPSConnection(
        host, port, context=context, timeout=float(target.get("timeout", 60))
    )
    try:
        conn.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/pods?fieldManager=lab-submit-hook",
            body=json.dumps(manifest),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        response = conn.getresponse()
        text = response.read().decode(errors="replace")
    finally:
        conn.close()
    if response.status >= 300:
        try:
            message = str(json.loads(text).get("message", text))
        except ValueError:
            message = text
        raise RuntimeError(f"Kubernetes API answered {response.status}: {message[:300]}")
    return text


APPLIERS = {"podman": apply_podman, "kubernetes": apply_kubernetes}


def main(argv: list[str]) -> int:
    mono, wall = time.monotonic(), time.time()
    config_path = os.environ.get("LAB_HOOK_CONFIG", "/lab/hook.json")
    with open(config_path) as config_file:
        config = json.load(config_file)
    record: dict[str, Any] = {"mono": mono, "wall": wall, "args": argv}
    status = 0
    if len(argv) != 4:
        record.update(ok=False, error=f"expected 4 arguments, got {len(argv)}")
        status = 2
    else:
        prefix = str(config["target"].get("name_prefix", ""))
        manifest = job_manifest(config["pod_template"], argv, prefix)
        record.update(job=argv[2], pod=manifest["metadata"]["name"])
        try:
            APPLIERS[config["target"]["kind"]](config["target"], manifest)
            record.update(ok=True)
        except Exception as exc:  # Any failure is recorded; the binder would not see it.
            record.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            status = 1
    record["applied_mono"] = time.monotonic()
    with open(config["records"], "a") as records:
        records.write(json.dumps(record) + "\n")
    # One line only: the binder reads 16 and then closes the pipe.
    print(f"lab submit hook: job {record.get('job', '?')} {'ok' if status == 0 else 'FAILED'}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
