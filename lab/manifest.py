"""Pod manifests: the one YAML shape every engine runs, for workers and the binder."""

from __future__ import annotations

import re
from typing import Any

from lab.binder.submit_hook import job_label, job_pod_name
from lab.errors import ManifestError
from lab.run import RUN_LABEL

__all__ = ["job_label", "job_pod_name", "pod_manifest", "check_pod_manifest"]

DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
RESTART_POLICIES = ("Always", "OnFailure", "Never")


def pod_manifest(
    *,
    name: str,
    run_id: str,
    role: str,
    image: str,
    command: list[str],
    restart_policy: str = "Never",
    labels: dict[str, str] | None = None,
    mounts: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    workdir: str | None = None,
    host_network: bool = True,
    config_map: str | None = None,
    config_files: dict[str, str] | None = None,
    scratch: list[str] | None = None,
    service_account: str | None = None,
    namespace: str | None = None,
    ports: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A Pod with one container; `mounts` maps host path to pod path.

    The defaults give the podman engine's shape: the host network and hostPath mounts. A
    cluster engine passes ``host_network=False``, takes its configuration from the
    ConfigMap `config_map` (`config_files` maps a key of it to a file path in the pod),
    gives writable folders as `scratch` (emptyDir), and names the pod's `service_account`
    (without one, a pod off the host network gets no API token). `ports` names the
    container's ports, so a Service can point at them.
    """
    volumes: list[dict[str, Any]] = []
    volume_mounts: list[dict[str, Any]] = []
    for index, (host_path, pod_path) in enumerate(sorted((mounts or {}).items())):
        volumes.append({"name": f"v{index}", "hostPath": {"path": host_path}})
        volume_mounts.append({"name": f"v{index}", "mountPath": pod_path})
    if config_files:
        if not config_map:
            raise ManifestError("Pod manifest: config_files need the config_map that holds them")
        volumes.append({"name": "config", "configMap": {"name": config_map}})
        for key, pod_path in sorted(config_files.items()):
            volume_mounts.append(
                {"name": "config", "mountPath": pod_path, "subPath": key, "readOnly": True}
            )
    for index, pod_path in enumerate(scratch or []):
        volumes.append({"name": f"scratch{index}", "emptyDir": {}})
        volume_mounts.append({"name": f"scratch{index}", "mountPath": pod_path})
    container: dict[str, Any] = {
        "name": role,
        "image": image,
        "imagePullPolicy": "Never",
        "command": list(command),
        "env": [{"name": k, "value": v} for k, v in sorted((env or {}).items())],
        "volumeMounts": volume_mounts,
    }
    if workdir:
        container["workingDir"] = workdir
    if ports:
        container["ports"] = [
            {"name": port_name, "containerPort": number, "protocol": "TCP"}
            for port_name, number in sorted(ports.items())
        ]
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {RUN_LABEL: run_id, "lab.role": role, **(labels or {})},
    }
    if namespace:
        metadata["namespace"] = namespace
    spec: dict[str, Any] = {
        "hostNetwork": host_network,
        "restartPolicy": restart_policy,
        "containers": [container],
        "volumes": volumes,
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    elif not host_network:
        spec["automountServiceAccountToken"] = False
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
    check_pod_manifest(manifest)
    return manifest


def check_pod_manifest(manifest: object) -> None:
    """Refuse a manifest an engine would choke on, saying which field is wrong."""

    def bad(field: str, why: str) -> ManifestError:
        return ManifestError(f"Pod manifest: {field} {why}")

    if not isinstance(manifest, dict):
        raise bad("document", "is not a mapping")
    if manifest.get("apiVersion") != "v1" or manifest.get("kind") != "Pod":
        raise bad("apiVersion/kind", "must be v1/Pod")
    metadata = manifest.get("metadata")
    if not isinstance(metadata, dict):
        raise bad("metadata", "is missing")
    name = metadata.get("name")
    if not isinstance(name, str) or len(name) > 63 or not DNS_1123.match(name):
        raise bad("metadata.name", f"{name!r} is not a DNS-1123 label")
    labels = metadata.get("labels") or {}
    if not isinstance(labels, dict) or RUN_LABEL not in labels:
        raise bad("metadata.labels", f"must carry {RUN_LABEL}")
    for key, value in labels.items():
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            raise bad(f"metadata.labels[{key}]", f"{value!r} is not a valid label value")
    spec = manifest.get("spec")
    if not isinstance(spec, dict):
        raise bad("spec", "is missing")
    if spec.get("restartPolicy", "Always") not in RESTART_POLICIES:
        raise bad("spec.restartPolicy", f"must be one of {', '.join(RESTART_POLICIES)}")
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise bad("spec.containers", "must list at least one container")
    for index, container in enumerate(containers):
        if not isinstance(container, dict) or not container.get("image"):
            raise bad(f"spec.containers[{index}].image", "is missing")
        if not isinstance(container.get("name"), str) or not DNS_1123.match(container["name"]):
            raise bad(f"spec.containers[{index}].name", "is not a DNS-1123 label")
