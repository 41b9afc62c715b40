"""The kind engine against recorded fakes of kind, kubectl, docker and the API server.

kind cannot run on the lab's CI machine (no Docker engine, no node image), so these tests
check what the engine asks of its tools, call by call, and what it sends the API server,
request by request. The fakes keep just enough state to answer the next call.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import docker
import pytest
import yaml

from lab.binder import submit_hook
from lab.engines import k8s_objects as objects
from lab.engines import kind as kind_module
from lab.engines import kind_release
from lab.engines.kind import KindEngine, keep_marker
from lab.engines.kind_preflight import check_inotify, preflight
from lab.errors import (
    CommandFailed,
    DownloadFailed,
    LabError,
    ManifestError,
    PreflightFailed,
    ToolMissing,
    WaitTimeout,
)
from lab.manifest import pod_manifest
from lab.run import RunRecord
from tests.fakes.kind.fake_apiserver import FakeApiServer

FAKES = Path(__file__).parent / "fakes" / "kind"
RUN_ID = "r1203164100-a1b2c3"
CLUSTER = f"lab-{RUN_ID}"
NS = f"lab-{RUN_ID}"
IMAGE = "localhost/lab-worker-r1203164100-a1b2c3:0123abcd"
IMAGE_ID = "sha256:" + "ab" * 32
NODE_IMAGE = kind_release.NODE_IMAGES["1.31.2"]


@dataclass
class Tools:
    """The fake tools' folder, their call log and their state."""

    bin: Path
    log: Path
    state_path: Path

    def calls(self) -> list[list[str]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [[entry["tool"], *entry["argv"]] for entry in map(json.loads, lines)]

    def state(self) -> dict[str, Any]:
        return dict(json.loads(self.state_path.read_text() or "{}"))

    def set(self, **changes: Any) -> None:
        self.state_path.write_text(json.dumps({**self.state(), **changes}))

    def forget_calls(self) -> None:
        self.log.write_text("")


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tools:
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("kind", "kubectl", "docker"):
        script = folder / tool
        script.write_text(
            f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {str(FAKES)!r})\n"
            f"from fake_tools import main\nsys.exit(main({tool!r}))\n"
        )
        script.chmod(0o755)
    found = Tools(folder, tmp_path / "calls.jsonl", tmp_path / "fake-state.json")
    found.state_path.write_text("{}")
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.setenv("LAB_FAKE_LOG", str(found.log))
    monkeypatch.setenv("LAB_FAKE_STATE", str(found.state_path))
    monkeypatch.setenv("LAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    return found


@pytest.fixture
def api() -> FakeApiServer:
    return FakeApiServer()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    return folder


def make_engine(run_dir: Path, api: FakeApiServer, **options: Any) -> KindEngine:
    return KindEngine(RUN_ID, run_dir, api_transport=api.transport, host_port=0, **options)


@pytest.fixture
def engine(tools: Tools, api: FakeApiServer, run_dir: Path) -> Iterator[KindEngine]:
    tools.set(images={IMAGE: IMAGE_ID})
    made = make_engine(run_dir, api, image=IMAGE)
    made.up()
    tools.forget_calls()
    yield made
    made.down()


def kubectl(run_dir: Path, *args: str) -> list[str]:
    return ["kubectl", "--kubeconfig", str(run_dir / "kind" / "kubeconfig"), *args]


def crictl_check(node: str, image: str = IMAGE) -> list[str]:
    return [
        "docker",
        "exec",
        node,
        "crictl",
        "inspecti",
        "-o",
        "go-template",
        "--template",
        "{{.status.id}}",
        image,
    ]


def bring_up_calls(run_dir: Path, *, sa_polls: int = 1) -> list[list[str]]:
    """Everything before the image step, for a cluster the run creates."""
    return [
        ["docker", "version", "--format", "{{.Server.Version}}"],
        ["kind", "version"],
        ["kind", "get", "clusters"],
        [
            "kind",
            "create",
            "cluster",
            "--name",
            CLUSTER,
            "--config",
            str(run_dir / "kind" / "cluster.yaml"),
            "--kubeconfig",
            str(run_dir / "kind" / "kubeconfig"),
            "--wait",
            "300s",
        ],
        kubectl(run_dir, "wait", "--for=condition=Ready", "nodes", "--all", "--timeout=299s"),
        kubectl(
            run_dir,
            "-n",
            "kube-system",
            "rollout",
            "status",
            "deployment/coredns",
            "--timeout=299s",
        ),
        kubectl(run_dir, "apply", "-f", str(run_dir / "kind" / "base.yaml")),
        *[kubectl(run_dir, "-n", NS, "get", "serviceaccount", "default", "-o", "name")] * sa_polls,
    ]


def normalise_timeouts(calls: list[list[str]]) -> list[list[str]]:
    """Remaining-time arguments shrink by a second on a slow machine; pin them."""
    return [[("--timeout=299s" if a.startswith("--timeout=") else a) for a in c] for c in calls]


# -- bring-up, load and teardown -----------------------------------------------------------


def test_up_creates_a_cluster_loads_the_image_and_down_deletes_it(
    tools: Tools, api: FakeApiServer, run_dir: Path
) -> None:
    tools.set(images={IMAGE: IMAGE_ID}, sa_missing_polls=2)
    engine = make_engine(run_dir, api, image=IMAGE)

    engine.up()

    node = f"{CLUSTER}-control-plane"
    assert normalise_timeouts(tools.calls()) == [
        *bring_up_calls(run_dir, sa_polls=3),
        ["docker", "image", "inspect", "--format", "{{.Id}}", IMAGE],
        ["kind", "get", "nodes", "--name", CLUSTER],
        crictl_check(node),
        ["kind", "load", "docker-image", IMAGE, "--name", CLUSTER],
    ]
    config = yaml.safe_load((run_dir / "kind" / "cluster.yaml").read_text())
    assert config == {
        "kind": "Cluster",
        "apiVersion": "kind.x-k8s.io/v1alpha4",
        "name": CLUSTER,
        "nodes": [
            {
                "role": "control-plane",
                "image": NODE_IMAGE,
                "extraPortMappings": [
                    {
                        "containerPort": 30466,
                        "hostPort": engine.host_port,
                        "listenAddress": "127.0.0.1",
                        "protocol": "TCP",
                    }
                ],
                "extraMounts": [{"hostPath": str(run_dir), "containerPath": str(run_dir)}],
            }
        ],
    }
    applied = list(yaml.safe_load_all((run_dir / "kind" / "base.yaml").read_text()))
    assert [(o["kind"], o["metadata"]["name"]) for o in applied] == [
        ("Namespace", NS),
        ("ServiceAccount", "lab-binder"),
        ("Role", "lab-pods"),
        ("RoleBinding", "lab-pods-lab-binder"),
    ]
    assert engine.client_address() == ("127.0.0.1", engine.host_port)
    assert RunRecord.load(RUN_ID) is not None

    tools.forget_calls()
    engine.down()
    engine.down()

    assert tools.calls() == [["kind", "delete", "cluster", "--name", CLUSTER]]
    assert tools.state()["clusters"] == {}
    assert RunRecord.load(RUN_ID) is None


def test_workers_of_a_multi_node_cluster_share_the_run_folder(
    tools: Tools,
    api: FakeApiServer,
    run_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limits = tmp_path / "proc" / "sys" / "fs" / "inotify"
    limits.mkdir(parents=True)
    (limits / "max_user_watches").write_text("524288\n")
    (limits / "max_user_instances").write_text("512\n")
    monkeypatch.setattr(kind_module, "PROC", tmp_path / "proc")
    engine = make_engine(run_dir, api, nodes=3, kubernetes_version="1.30.6")

    engine.up()

    config = yaml.safe_load((run_dir / "kind" / "cluster.yaml").read_text())
    assert [node["role"] for node in config["nodes"]] == ["control-plane", "worker", "worker"]
    assert {node["image"] for node in config["nodes"]} == {kind_release.NODE_IMAGES["1.30.6"]}
    mount = [{"hostPath": str(run_dir), "containerPath": str(run_dir)}]
    assert all(node["extraMounts"] == mount for node in config["nodes"])
    assert "extraPortMappings" not in config["nodes"][1]
    engine.down()


def test_a_later_process_takes_the_run_down(
    tools: Tools, api: FakeApiServer, run_dir: Path
) -> None:
    make_engine(run_dir, api).up()
    tools.forget_calls()

    make_engine(run_dir, api).down()

    assert tools.calls() == [["kind", "delete", "cluster", "--name", CLUSTER]]
    assert RunRecord.load(RUN_ID) is None


def test_a_failed_create_still_deletes_what_kind_left(
    tools: Tools, api: FakeApiServer, run_dir: Path
) -> None:
    tools.set(fail=["create cluster"])

    with pytest.raises(CommandFailed, match="kind create cluster"):
        make_engine(run_dir, api).up()

    assert tools.calls()[-2:] == [
        [
            "kind",
            "export",
            "logs",
            str(run_dir / "kind" / "diagnostics" / "kind-logs"),
            "--name",
            CLUSTER,
        ],
        ["kind", "delete", "cluster", "--name", CLUSTER],
    ]


def test_load_is_skipped_when_every_node_holds_the_image(
    tools: Tools, api: FakeApiServer, run_dir: Path, engine: KindEngine
) -> None:
    node = f"{CLUSTER}-control-plane"
    assert tools.state()["node_images"] == {node: {IMAGE: IMAGE_ID}}

    engine.load_image(IMAGE)

    assert tools.calls() == [
        ["docker", "image", "inspect", "--format", "{{.Id}}", IMAGE],
        ["kind", "get", "nodes", "--name", CLUSTER],
        crictl_check(node),
    ]


def test_a_rebuilt_image_is_loaded_again(
    tools: Tools, api: FakeApiServer, run_dir: Path, engine: KindEngine
) -> None:
    context = run_dir / "image"
    context.mkdir()
    (context / "Containerfile").write_text("FROM scratch\n")

    image_id = engine.build_image(context, IMAGE, {"lab.binder": "standin"})

    assert image_id == tools.state()["images"][IMAGE] != IMAGE_ID
    assert tools.calls() == [
        [
            "docker",
            "build",
            "--file",
            str(context / "Containerfile"),
            "--tag",
            IMAGE,
            "--label",
            "lab.binder=standin",
            "--label",
            f"lab.run={RUN_ID}",
            str(context),
        ],
        ["docker", "image", "inspect", "--format", "{{.Id}}", IMAGE],
        ["docker", "image", "inspect", "--format", "{{.Id}}", IMAGE],
        ["kind", "get", "nodes", "--name", CLUSTER],
        crictl_check(f"{CLUSTER}-control-plane"),
        ["kind", "load", "docker-image", IMAGE, "--name", CLUSTER],
    ]


def test_an_existing_cluster_is_reused_and_only_the_namespace_removed(
    tools: Tools, api: FakeApiServer, run_dir: Path
) -> None:
    tools.set(
        clusters={"shared": ["shared-control-plane"]},
        ports={"shared-control-plane 30466/tcp": "127.0.0.1:41999"},
    )
    engine = make_engine(run_dir, api, cluster="shared")

    engine.up()

    assert normalise_timeouts(tools.calls()) == [
        ["docker", "version", "--format", "{{.Server.Version}}"],
        ["kind", "version"],
        ["kind", "get", "clusters"],
        ["kind", "get", "kubeconfig", "--name", "shared"],
        ["docker", "port", "shared-control-plane", "30466/tcp"],
        kubectl(run_dir, "wait", "--for=condition=Ready", "nodes", "--all", "--timeout=299s"),
        kubectl(
            run_dir,
            "-n",
            "kube-system",
            "rollout",
            "status",
            "deployment/coredns",
            "--timeout=299s",
        ),
        kubectl(run_dir, "apply", "-f", str(run_dir / "kind" / "base.yaml")),
        kubectl(run_dir, "-n", NS, "get", "serviceaccount", "default", "-o", "name"),
    ]
    assert engine.client_address() == ("127.0.0.1", 41999)

    tools.forget_calls()
    engine.down()

    assert tools.calls() == [
        kubectl(run_dir, "delete", "namespace", NS, "--ignore-not-found", "--wait=false")
    ]
    assert "shared" in tools.state()["clusters"]


def test_bring_up_sweeps_only_clusters_whose_run_is_gone(
    tools: Tools, api: FakeApiServer, run_dir: Path, tmp_path: Path
) -> None:
    orphan, alive, kept = "r0101000000-aaaaaa", "r0101000000-bbbbbb", "r0101000000-cccccc"
    tools.set(
        clusters={f"lab-{rid}": [f"lab-{rid}-control-plane"] for rid in (orphan, alive, kept)}
        | {"lab-mine": ["lab-mine-c"]}
    )
    dead = RunRecord.create(orphan, tmp_path, "kind")
    dead.owner_pid, dead.owner_start = 999_999_999, "0"
    dead.save()
    RunRecord.create(alive, tmp_path, "kind")  # owned by this very process
    keep_marker(f"lab-{kept}").write_text(kept)

    make_engine(run_dir, api).up()

    deletes = [call for call in tools.calls() if call[1:3] == ["delete", "cluster"]]
    assert deletes == [["kind", "delete", "cluster", "--name", f"lab-{orphan}"]]
    assert set(tools.state()["clusters"]) == {
        f"lab-{alive}",
        f"lab-{kept}",
        "lab-mine",
        CLUSTER,
    }
    assert RunRecord.load(orphan) is None


def test_keep_leaves_the_cluster_and_marks_it_for_later_sweeps(
    tools: Tools, api: FakeApiServer, run_dir: Path
) -> None:
    engine = make_engine(run_dir, api, keep=True)
    engine.up()
    tools.forget_calls()

    engine.down()

    assert tools.calls() == []
    assert CLUSTER in tools.state()["clusters"]
    assert keep_marker(CLUSTER).read_text().strip() == RUN_ID


def test_a_failed_bring_up_keeps_logs_and_events_before_teardown(
    tools: Tools, api: FakeApiServer, run_dir: Path
) -> None:
    tools.set(fail=["rollout status"], pods={"coredns-1": "dns is sad\n"})
    engine = make_engine(run_dir, api)

    with pytest.raises(CommandFailed, match="rollout status"):
        engine.up()

    diagnostics = run_dir / "kind" / "diagnostics"
    after_rollout = tools.calls()[6:]
    assert normalise_timeouts(after_rollout) == [
        kubectl(run_dir, "-n", NS, "get", "pods", "-o", "wide"),
        kubectl(run_dir, "-n", NS, "get", "events", "--sort-by=.metadata.creationTimestamp"),
        kubectl(run_dir, "-n", NS, "get", "pods", "-o", "name"),
        kubectl(run_dir, "-n", NS, "logs", "pod/coredns-1", "--all-containers", "--timestamps"),
        ["kind", "export", "logs", str(diagnostics / "kind-logs"), "--name", CLUSTER],
        ["kind", "delete", "cluster", "--name", CLUSTER],
    ]
    assert (diagnostics / "pods" / "coredns-1.log").read_text() == "dns is sad\n"
    assert "rollout status" in (diagnostics / "reason.txt").read_text()
    assert (diagnostics / "kind-logs" / "kind-version.txt").exists()
    assert tools.state()["clusters"] == {}


# -- invalid input and missing tools -------------------------------------------------------


@pytest.mark.parametrize("name", ["Lab_1", "-lab", "lab-", "a" * 41, ""])
def test_invalid_cluster_names_are_refused(run_dir: Path, name: str) -> None:
    with pytest.raises(LabError, match="is not valid: use 1-40 characters"):
        KindEngine("r1", run_dir, cluster=name or "UPPER")


def test_a_run_id_that_makes_no_cluster_name_is_refused(run_dir: Path) -> None:
    with pytest.raises(LabError, match="'lab-R_1' is not valid"):
        KindEngine("R_1", run_dir)


def test_unknown_and_mistyped_options_are_refused(run_dir: Path) -> None:
    with pytest.raises(LabError, match="unknown kind engine option node: choose from nodes"):
        KindEngine(RUN_ID, run_dir, node=2)
    with pytest.raises(LabError, match="nodes='2' must be a int"):
        KindEngine(RUN_ID, run_dir, nodes="2")  # type: ignore[arg-type]
    with pytest.raises(LabError, match="no pinned kind node image for Kubernetes 1.99"):
        KindEngine(RUN_ID, run_dir, kubernetes_version="1.99")


def test_missing_kubectl_says_what_to_install(
    tools: Tools, api: FakeApiServer, run_dir: Path
) -> None:
    (tools.bin / "kubectl").unlink()

    with pytest.raises(ToolMissing, match="kubectl not found: install kubectl"):
        make_engine(run_dir, api).up()


def test_missing_kind_offline_is_one_clear_error(
    tools: Tools, api: FakeApiServer, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tools.bin / "kind").unlink()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    url = f"http://127.0.0.1:{port}/kind-linux-amd64"
    monkeypatch.setattr(kind_release, "RELEASE_URL", url + "?{version}{os}{arch}")

    with pytest.raises(DownloadFailed) as caught:
        make_engine(run_dir, api).up()

    message = str(caught.value)
    assert "kind is not on PATH and the pinned kind v0.25.0 could not be downloaded" in message
    assert "install kind" in message and "\n" not in message
    assert tools.calls() == []


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server for one folder, standing in for the release page."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


def test_the_pinned_kind_is_downloaded_once_and_checked(
    tmp_path: Path, file_server: tuple[str, Path]
) -> None:
    base, folder = file_server
    binary = b"#!/bin/sh\necho kind v0.25.0\n"
    (folder / "kind").write_bytes(binary)
    digest = hashlib.sha256(binary).hexdigest()
    cache = tmp_path / "cache"

    first = kind_release.find_kind(
        cache=cache, url=f"{base}/kind", sha256=digest, search_path=str(tmp_path / "empty")
    )
    (folder / "kind").unlink()
    second = kind_release.find_kind(
        cache=cache, url=f"{base}/kind", sha256=digest, search_path=str(tmp_path / "empty")
    )

    assert first == second
    assert Path(first).read_bytes() == binary
    assert os.access(first, os.X_OK)


def test_a_kind_download_with_the_wrong_checksum_is_refused(
    tmp_path: Path, file_server: tuple[str, Path]
) -> None:
    base, folder = file_server
    (folder / "kind").write_bytes(b"not kind")

    with pytest.raises(DownloadFailed, match="not the pinned 0+: it was corrupted or replaced"):
        kind_release.find_kind(
            cache=tmp_path / "cache",
            url=f"{base}/kind",
            sha256="0" * 64,
            search_path=str(tmp_path / "empty"),
        )
    left = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert left == ["kind-linux-amd64.lock"] or left == ["kind-linux-arm64.lock"]


# -- preflight ---------------------------------------------------------------------------


def test_preflight_lists_every_problem_with_its_fix(tools: Tools, tmp_path: Path) -> None:
    tools.set(docker_up=False, kind_version="kind v0.17.0 go1.19 linux/amd64")
    held = socket.socket()
    held.bind(("0.0.0.0", 0))
    held.listen()
    port = held.getsockname()[1]
    limits = tmp_path / "proc" / "sys" / "fs" / "inotify"
    limits.mkdir(parents=True)
    (limits / "max_user_watches").write_text("8192\n")
    (limits / "max_user_instances").write_text("512\n")
    try:
        with pytest.raises(PreflightFailed) as caught:
            preflight(kind="kind", nodes=2, ports={"binder": port}, proc_root=tmp_path / "proc")
    finally:
        held.close()

    message = str(caught.value)
    assert message.startswith("kind cannot start here: 1) the Docker daemon is not reachable")
    assert "fix: start it (`sudo systemctl start docker`)" in message
    assert "2) kind v0.17.0 is older than v0.20.0 (fix: upgrade kind" in message
    assert f"3) port {port} for the binder is in use" in message
    assert "4) fs.inotify.max_user_watches is 8192, below 524288 (fix: `sudo sysctl " in message
    assert "\n" not in message


def test_low_inotify_limits_only_warn_for_one_node(tmp_path: Path) -> None:
    limits = tmp_path / "sys" / "fs" / "inotify"
    limits.mkdir(parents=True)
    (limits / "max_user_watches").write_text("8192\n")
    (limits / "max_user_instances").write_text("128\n")

    assert check_inotify(1, tmp_path) == []
    assert [p.what for p in check_inotify(2, tmp_path)] == [
        "fs.inotify.max_user_watches is 8192, below 524288",
        "fs.inotify.max_user_instances is 128, below 512",
    ]


def test_a_missing_docker_fails_preflight_before_any_cluster_call(
    tools: Tools, api: FakeApiServer, run_dir: Path
) -> None:
    tools.set(docker_up=False)

    with pytest.raises(PreflightFailed, match="Docker daemon is not reachable"):
        make_engine(run_dir, api).up()

    assert [call[:2] for call in tools.calls()] == [["docker", "version"], ["kind", "version"]]


# -- the in-process API: pods, the binder, waits and events -------------------------------


def worker_manifest(engine: KindEngine, name: str = "job-1", **extra: Any) -> dict[str, Any]:
    return pod_manifest(
        name=name,
        run_id=RUN_ID,
        role="worker",
        image=IMAGE,
        command=["sh", "startBinderJobLocal.sh", "CE", "route", "1", "log"],
        host_network=False,
        namespace=NS,
        **extra,
    )


def test_a_worker_pod_is_created_through_the_api_as_given(
    api: FakeApiServer, engine: KindEngine
) -> None:
    manifest = worker_manifest(engine)

    engine.apply(manifest)

    assert api.requests() == [
        ("POST", f"/api/v1/namespaces/{NS}/pods", {"fieldManager": "workbinder-lab"})
    ]
    sent = api.calls[-1].body
    assert sent["metadata"] == manifest["metadata"]
    assert sent["spec"]["hostNetwork"] is False
    assert sent["spec"]["automountServiceAccountToken"] is False
    assert sent["spec"]["containers"][0]["command"] == manifest["spec"]["containers"][0]["command"]


def test_podman_shaped_manifests_are_refused_with_the_way_out(
    engine: KindEngine, api: FakeApiServer, tmp_path: Path
) -> None:
    podman = pod_manifest(name="job-1", run_id=RUN_ID, role="worker", image=IMAGE, command=["true"])
    with pytest.raises(ManifestError, match="host network, which on kind is a node's"):
        engine.apply(podman)

    outside = worker_manifest(engine, mounts={str(tmp_path): "/lab/conf"})
    with pytest.raises(ManifestError, match="is not shared with the kind nodes"):
        engine.apply(outside)
    assert api.requests() == []


def test_manifest_options_move_files_to_the_configmap(
    api: FakeApiServer, engine: KindEngine, run_dir: Path
) -> None:
    conf = run_dir / "conf"
    conf.mkdir()
    (conf / "WorkerDispatcher.properties").write_text("BinderPort = 4566\n")
    logs = run_dir / "logs"
    logs.mkdir()

    params = engine.manifest_options(
        {
            str(
                conf / "WorkerDispatcher.properties"
            ): "/opt/workbinder/WorkerDispatcher.properties",
            str(logs): "/lab/logs",
        }
    )

    assert params == {
        "host_network": False,
        "namespace": NS,
        "mounts": {str(logs): "/lab/logs"},
        "config_map": "lab-config",
        "config_files": {
            "WorkerDispatcher.properties": "/opt/workbinder/WorkerDispatcher.properties"
        },
    }
    assert api.requests() == [
        (
            "PATCH",
            f"/api/v1/namespaces/{NS}/configmaps/lab-config",
            {"fieldManager": "workbinder-lab", "force": "true"},
        )
    ]
    assert api.calls[-1].body["data"] == {"WorkerDispatcher.properties": "BinderPort = 4566\n"}
    engine.apply(
        worker_manifest(
            engine, **{k: v for k, v in params.items() if k not in ("host_network", "namespace")}
        )
    )
    mounts = api.calls[-1].body["spec"]["containers"][0]["volumeMounts"]
    assert {
        "name": "config",
        "mountPath": "/opt/workbinder/WorkerDispatcher.properties",
        "subPath": "WorkerDispatcher.properties",
        "readOnly": True,
    } in mounts


def test_the_binder_becomes_a_deployment_behind_its_service(
    api: FakeApiServer, engine: KindEngine
) -> None:
    def binder_pod(**extra: Any) -> dict[str, Any]:
        return pod_manifest(
            name=f"{RUN_ID}-binder",
            run_id=RUN_ID,
            role="binder",
            image=IMAGE,
            command=["bash", "-c", "exec bash run_binder.sh"],
            host_network=False,
            namespace=NS,
            ports={"binder": 40123},
            **extra,
        )

    binder = binder_pod()
    assert binder["spec"]["automountServiceAccountToken"] is False

    engine.apply(binder)

    apply_query = {"fieldManager": "workbinder-lab", "force": "true"}
    assert api.requests() == [
        ("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/binder", apply_query),
        ("PATCH", f"/api/v1/namespaces/{NS}/services/binder", apply_query),
    ]
    deployment, service = api.calls[-2].body, api.calls[-1].body
    # The engine gives the binder the account its submit hook creates pods with.
    assert deployment == objects.deployment(binder_pod(service_account="lab-binder"))
    assert service == objects.service(RUN_ID, 40123)
    assert engine.binder_address() == f"binder.{NS}.svc.cluster.local"
    assert engine.hook_target() == {"kind": "kubernetes", "namespace": NS, "timeout": 30}

    no_port = {
        **binder,
        "spec": {
            **binder["spec"],
            "containers": [
                {k: v for k, v in binder["spec"]["containers"][0].items() if k != "ports"}
            ],
        },
    }
    with pytest.raises(ManifestError, match="names no container port"):
        engine.apply(no_port)


def running(restarts: int = 0) -> dict[str, Any]:
    return {
        "phase": "Running",
        "containerStatuses": [
            {
                "name": "worker",
                "image": IMAGE,
                "imageID": "",
                "ready": True,
                "restartCount": restarts,
                "containerID": "containerd://c0ffee",
                "state": {"running": {"startedAt": "2024-11-01T00:00:01Z"}},
            }
        ],
    }


def test_pods_and_logs_come_from_the_api(api: FakeApiServer, engine: KindEngine) -> None:
    engine.apply(worker_manifest(engine))
    api.set_status(NS, "job-1", running(restarts=2), node=f"{CLUSTER}-control-plane")
    api.logs["job-1"] = "Worker Dispatcher started...\n"
    api.calls.clear()

    pods = engine.pods({"lab.role": "worker"})
    text = engine.logs("job-1")

    assert [(p.name, p.phase, p.restarts, p.labels["lab.role"]) for p in pods] == [
        ("job-1", "Running", 2, "worker")
    ]
    assert text == "Worker Dispatcher started...\n"
    assert api.requests() == [
        (
            "GET",
            f"/api/v1/namespaces/{NS}/pods",
            {"labelSelector": f"lab.run={RUN_ID},lab.role=worker"},
        ),
        ("GET", f"/api/v1/namespaces/{NS}/pods/job-1", {}),
        (
            "GET",
            f"/api/v1/namespaces/{NS}/pods/job-1/log",
            {"container": "worker", "follow": "false", "timestamps": "false"},
        ),
    ]


def test_delete_removes_at_once_and_waits_until_gone(
    api: FakeApiServer, engine: KindEngine
) -> None:
    engine.apply(worker_manifest(engine))
    api.calls.clear()

    engine.delete("job-1")

    assert api.requests() == [
        ("GET", f"/api/v1/namespaces/{NS}/pods/job-1", {}),
        ("DELETE", f"/api/v1/namespaces/{NS}/pods/job-1", {"gracePeriodSeconds": "0"}),
        ("GET", f"/api/v1/namespaces/{NS}/pods", {"fieldSelector": "metadata.name=job-1"}),
    ]
    assert engine.pods() == []


def test_a_wait_is_bounded_and_says_what_it_last_saw(
    api: FakeApiServer, engine: KindEngine
) -> None:
    engine.apply(worker_manifest(engine))
    started = time.monotonic()

    with pytest.raises(WaitTimeout) as caught:
        engine.wait_pods("2 running workers", {"lab.role": "worker"}, 2, timeout=2.0)

    assert 2.0 <= time.monotonic() - started < 10
    assert str(caught.value) == (
        "gave up after 2 s waiting for 2 running workers; last saw: job-1=Pending"
    )


def test_a_wait_ends_when_the_watch_shows_enough(api: FakeApiServer, engine: KindEngine) -> None:
    engine.apply(worker_manifest(engine, name="job-1"))
    engine.apply(worker_manifest(engine, name="job-2"))
    api.set_status(NS, "job-1", running())

    def watches() -> list[Any]:
        return [
            c
            for c in list(api.calls)
            if c.params.get("watch") == "true"
            and "lab.role=worker" in c.params.get("labelSelector", "")
        ]

    def start_job_2_once_watched() -> None:
        deadline = time.monotonic() + 10
        while not watches() and time.monotonic() < deadline:
            time.sleep(0.01)
        api.set_status(NS, "job-2", running())

    threading.Thread(target=start_job_2_once_watched, daemon=True).start()

    pods = engine.wait_pods("2 running workers", {"lab.role": "worker"}, 2, timeout=10)

    assert [(p.name, p.phase) for p in pods] == [("job-1", "Running"), ("job-2", "Running")]
    assert len(watches()) == 1 and watches()[0].params["resourceVersion"]


def test_events_follow_a_pod_through_its_life(api: FakeApiServer, engine: KindEngine) -> None:
    engine.apply(worker_manifest(engine))
    api.set_status(NS, "job-1", running())
    died = running(restarts=0)
    died["containerStatuses"][0]["state"] = {
        "terminated": {"exitCode": 137, "reason": "Error", "startedAt": None}
    }
    api.set_status(NS, "job-1", died)
    api.set_status(NS, "job-1", running(restarts=1))
    api.remove("pods", NS, "job-1")

    def seen() -> list[tuple[str, str, str]]:
        return [(e.pod, e.kind, e.detail) for e in engine.events()]

    deadline = time.monotonic() + 5
    while len(seen()) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen() == [
        ("job-1", "created", ""),
        ("job-1", "started", ""),
        ("job-1", "died", "Error (exit 137)"),
        ("job-1", "restarted", "restarts=1"),
        ("job-1", "started", ""),
        ("job-1", "removed", ""),
    ]
    monos = [e.mono for e in engine.events()]
    assert monos == sorted(monos)


# -- faults through Docker's API ----------------------------------------------------------


def fake_docker(node: str) -> tuple[Any, Any]:
    """A docker.DockerClient stand-in that checks calls against docker-py's signatures."""
    container = mock.create_autospec(docker.models.containers.Container, instance=True)
    collection = mock.create_autospec(docker.models.containers.ContainerCollection, instance=True)
    collection.get.return_value = container
    client = mock.Mock(spec_set=["containers"])
    client.containers = collection
    return client, container


def test_kill_sends_sigkill_to_the_containers_process_inside_its_node(
    tools: Tools, api: FakeApiServer, run_dir: Path
) -> None:
    node = f"{CLUSTER}-control-plane"
    client, container = fake_docker(node)
    container.exec_run.side_effect = [(0, b"4242\n"), (0, b"")]
    engine = make_engine(run_dir, api, docker_client=client)
    engine.up()
    engine.apply(worker_manifest(engine))
    api.set_status(NS, "job-1", running(), node=node)

    engine.kill("job-1")

    client.containers.get.assert_called_once_with(node)
    assert container.exec_run.call_args_list == [
        mock.call(
            ["crictl", "inspect", "-o", "go-template", "--template", "{{.info.pid}}", "c0ffee"]
        ),
        mock.call(["kill", "-KILL", "4242"]),
    ]
    engine.down()


def test_kill_of_a_pod_without_a_container_says_to_wait(
    tools: Tools, api: FakeApiServer, run_dir: Path
) -> None:
    client, container = fake_docker("x")
    engine = make_engine(run_dir, api, docker_client=client)
    engine.up()
    engine.apply(worker_manifest(engine))

    with pytest.raises(LabError, match="has no running container to kill yet"):
        engine.kill("job-1")
    container.exec_run.assert_not_called()
    engine.down()


def test_a_node_is_stopped_and_started_through_dockers_api(
    tools: Tools, api: FakeApiServer, run_dir: Path
) -> None:
    node = f"{CLUSTER}-control-plane"
    client, container = fake_docker(node)
    engine = make_engine(run_dir, api, docker_client=client)
    engine.up()

    assert engine.nodes() == [node]
    engine.stop_node(node)
    engine.start_node(node)

    assert client.containers.get.call_args_list == [mock.call(node), mock.call(node)]
    assert container.method_calls == [mock.call.stop(timeout=0), mock.call.start()]
    with pytest.raises(LabError, match="is not a node of kind cluster"):
        engine.stop_node("someone-elses-node")
    engine.down()


# -- the submit hook's Kubernetes branch ---------------------------------------------------


@pytest.fixture
def tls_api(tmp_path: Path) -> Iterator[tuple[str, Path, list[dict[str, Any]]]]:
    """A loopback HTTPS server standing in for the API server, and a service account."""
    import ssl

    account = tmp_path / "account"
    account.mkdir()
    try:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(account / "key.pem"),
                "-out",
                str(account / "ca.crt"),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl could not make a test certificate: {exc}")
    (account / "token").write_text("secret-token\n")
    (account / "namespace").write_text(NS + "\n")
    seen: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers["Authorization"], "body": body})
            status = 409 if body["metadata"]["name"] == "job-taken" else 201
            answer = (
                {"kind": "Pod", **body}
                if status == 201
                else {"kind": "Status", "message": 'pods "job-taken" already exists'}
            )
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(account / "ca.crt", account / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", account, seen
    server.shutdown()
    server.server_close()


def test_the_submit_hook_creates_the_job_pod_with_the_service_account(
    tls_api: tuple[str, Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    address, account, seen = tls_api
    template = pod_manifest(
        name="placeholder",
        run_id=RUN_ID,
        role="worker",
        image=IMAGE,
        command=["sh", "startBinderJobLocal.sh", "{ce}", "{routing}", "{job}", "{logfile}"],
        host_network=False,
    )
    config = tmp_path / "hook.json"
    records = tmp_path / "submissions.jsonl"
    config.write_text(
        json.dumps(
            {
                "target": {
                    "kind": "kubernetes",
                    "timeout": 10,
                    "api": address,
                    "account_dir": str(account),
                },
                "pod_template": template,
                "records": str(records),
            }
        )
    )
    env = {"PATH": os.environ.get("PATH", ""), "LAB_HOOK_CONFIG": str(config)}

    done = subprocess.run(
        [sys.executable, submit_hook.__file__, "site-a:8443/ce", "r", "1700000000_7", "l.log"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.stdout == "lab submit hook: job 1700000000_7 ok\n", done.stderr
    assert [(s["path"], s["auth"]) for s in seen] == [
        (f"/api/v1/namespaces/{NS}/pods?fieldManager=lab-submit-hook", "Bearer secret-token")
    ]
    expected = submit_hook.job_manifest(template, ["site-a:8443/ce", "r", "1700000000_7", "l.log"])
    expected["metadata"]["namespace"] = NS
    assert seen[0]["body"] == expected
    assert json.loads(records.read_text())["ok"] is True


def test_the_submit_hook_records_what_the_api_refused(
    tls_api: tuple[str, Path, list[dict[str, Any]]],
) -> None:
    address, account, _ = tls_api
    target = {"kind": "kubernetes", "namespace": NS, "api": address, "account_dir": str(account)}
    manifest = pod_manifest(
        name="job-taken",
        run_id=RUN_ID,
        role="worker",
        image=IMAGE,
        command=["true"],
        host_network=False,
    )

    with pytest.raises(RuntimeError, match='answered 409: pods "job-taken" already exists'):
        submit_hook.apply_kubernetes(target, manifest)
