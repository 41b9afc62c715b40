"""The kind engine: a Kubernetes cluster in Docker containers, one per run.

Set-up (cluster, readiness, images, the run's namespace and rights) goes through the
`kind`, `kubectl` and `docker` commands. Inside timed windows the engine talks to the API
server in process (lightkube), and every wait is a bounded watch. Faults on nodes and
containers go through Docker's API (docker-py).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import docker
import yaml

from lab.engines import k8s_objects as objects
from lab.engines.base import EngineEvent, PodInfo
from lab.engines.images import PACKAGES
from lab.engines.kind_preflight import preflight
from lab.engines.kind_release import DEFAULT_KUBERNETES, find_kind
from lab.engines.kind_release import node_image as pinned_node_image
from lab.engines.kube_api import KubeApi, PodMap, PodWatcher, pod_info, summary
from lab.errors import CommandFailed, LabError, ManifestError, WaitTimeout
from lab.manifest import check_pod_manifest
from lab.ports import free_port
from lab.proc import require_tool, run
from lab.run import RUN_LABEL, RunRecord, state_dir
from lab.waits import wait_for

log = logging.getLogger(__name__)

KUBECTL_HINT = "install kubectl (https://kubernetes.io/docs/tasks/tools/) and put it on PATH"
DOCKER_HINT = "install Docker Engine (https://docs.docker.com/engine/install/)"
CLUSTER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
CLUSTER_NAME_MAX = 40  # node names add "-control-plane" and must stay hostnames
LAB_CLUSTER = re.compile(r"^lab-(r\d{10}-[0-9a-f]{6})$")
BASE_REPO = "workbinder-lab/base"
PROC = Path("/proc")  # where preflight reads kernel limits


def cluster_name_for(run_id: str) -> str:
    """The kind cluster a run creates: lab-<run id>."""
    return check_cluster_name(f"lab-{run_id}")


def check_cluster_name(name: str) -> str:
    if len(name) > CLUSTER_NAME_MAX or not CLUSTER_NAME.match(name):
        raise LabError(
            f"kind cluster name {name!r} is not valid: use 1-{CLUSTER_NAME_MAX} characters of "
            "a-z, 0-9 and '-', starting and ending with a letter or digit"
        )
    return name


def keep_marker(cluster: str) -> Path:
    """A kept cluster's mark, so later runs' sweeps leave it alone."""
    return state_dir() / f"{cluster}.kind-keep"


@dataclass(frozen=True)
class KindOptions:
    """What a user may choose for a kind lab (see KindEngine)."""

    nodes: int
    kubernetes_version: str
    node_image: str
    cluster: str
    keep: bool
    image: str
    host_port: int
    ready_timeout_s: float
    wait_timeout_s: float
    share_run_dir: bool
    api_transport: Any
    docker_client: Any

    def check(self) -> KindOptions:
        for name, kind in (
            ("nodes", int),
            ("host_port", int),
            ("keep", bool),
            ("share_run_dir", bool),
        ):
            value = getattr(self, name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise LabError(f"kind engine option {name}={value!r} must be a {kind.__name__}")
        if self.nodes < 1:
            raise LabError(f"kind engine option nodes={self.nodes}: a cluster needs 1 or more")
        if not 0 <= self.host_port < 65536:
            raise LabError(f"kind engine option host_port={self.host_port}: use 0 or a port")
        return self


class KindEngine:
    """Runs a lab's pods on a kind cluster made for the run (or reused by name)."""

    name = "kind"

    def __init__(
        self,
        run_id: str,
        run_dir: Path,
        *,
        nodes: int = 1,
        kubernetes_version: str = DEFAULT_KUBERNETES,
        node_image: str = "",
        cluster: str = "",
        keep: bool = False,
        image: str = "",
        host_port: int = 0,
        ready_timeout_s: float = 300.0,
        wait_timeout_s: float = 60.0,
        share_run_dir: bool = True,
        api_transport: Any = None,
        docker_client: Any = None,
        **unknown: object,
    ) -> None:
        """A kind lab for one run.

        nodes: one control plane plus nodes - 1 workers. kubernetes_version picks a
        pinned node image; node_image (kindest/node:<tag>@sha256:<digest>) overrides it.
        cluster: a cluster name to reuse, or to create; by default lab-<run id>. keep:
        leave the cluster up after the run. image: an image to load into the nodes at
        bring-up. host_port: the loopback port that reaches the binder's node port (0: a
        free one). share_run_dir: mount the run folder into every node. api_transport and
        docker_client stand in for the API server and Docker's API in tests.
        """
        if unknown:
            raise LabError(
                f"unknown kind engine option {', '.join(sorted(unknown))}: choose from "
                f"{', '.join(f.name for f in fields(KindOptions))}"
            )
        self.run_id = run_id
        self.run_dir = Path(run_dir).resolve()
        self.options = KindOptions(
            nodes=nodes,
            kubernetes_version=kubernetes_version,
            node_image=node_image,
            cluster=cluster,
            keep=keep,
            image=image,
            host_port=host_port,
            ready_timeout_s=ready_timeout_s,
            wait_timeout_s=wait_timeout_s,
            share_run_dir=share_run_dir,
            api_transport=api_transport,
            docker_client=docker_client,
        ).check()
        self.cluster = check_cluster_name(self.options.cluster or cluster_name_for(run_id))
        self.namespace = objects.run_namespace(run_id)
        self.node_image = node_image or pinned_node_image(kubernetes_version)
        self.work = self.run_dir / "kind"
        self.kubeconfig = self.work / "kubeconfig"
        self.kind = ""
        self.kubectl = ""
        self.host_port = self.options.host_port
        # This run made the cluster, so this run deletes it; a mark in the run folder
        # tells a later process (`lab down`) the same.
        self.created = (self.work / "created").exists()
        self.record: RunRecord | None = None
        self._api: KubeApi | None = None
        self._watcher: PodWatcher | None = None
        self._docker: docker.DockerClient | None = self.options.docker_client

    # -- bring-up ----------------------------------------------------------------------

    def up(self) -> None:
        """Check the machine, sweep old labs, create or reuse the cluster, make it ready."""
        self.work.mkdir(parents=True, exist_ok=True)
        self.kind = find_kind()
        self.kubectl = require_tool("kubectl", KUBECTL_HINT)
        if self.host_port == 0:
            self.host_port = free_port()
        preflight(
            kind=self.kind,
            nodes=self.options.nodes,
            ports={"binder's host port": self.host_port},
            proc_root=PROC,
        )
        self.record = RunRecord.create(self.run_id, self.run_dir, self.name)

        existing = self._clusters()
        self._sweep(existing)
        try:
            if self.cluster in existing:
                self._reuse()
            else:
                self._create()
            deadline = time.monotonic() + self.options.ready_timeout_s
            self._wait_ready(deadline)
            self._apply_base(deadline)
            if self.options.image:
                self.load_image(self.options.image)
            self._start_watch()
        except BaseException as exc:
            self.collect_failure(f"bring-up failed: {exc}")
            self.down()
            raise

    def _clusters(self) -> list[str]:
        done = run([self.kind, "get", "clusters"], timeout=60)
        return [line.strip() for line in done.stdout.splitlines() if line.strip()]

    def _sweep(self, clusters: list[str]) -> None:
        """Delete clusters of earlier lab runs whose owner process is gone."""
        for cluster in clusters:
            match = LAB_CLUSTER.match(cluster)
            if match is None or cluster == self.cluster or keep_marker(cluster).exists():
                continue
            record = RunRecord.load(match.group(1))
            if record is not None and record.owner_alive():
                continue
            log.info("removing kind cluster %s, left by a run that is gone", cluster)
            run([self.kind, "delete", "cluster", "--name", cluster], timeout=300)
            if record is not None:
                record.forget()

    def _create(self) -> None:
        config = objects.kind_cluster_config(
            self.cluster,
            nodes=self.options.nodes,
            node_image=self.node_image,
            host_port=self.host_port,
            shared_dirs=[str(self.run_dir)] if self.options.share_run_dir else [],
        )
        path = self.work / "cluster.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        log.info(
            "creating kind cluster %s (%d node(s), %s)",
            self.cluster,
            self.options.nodes,
            self.node_image.split("@")[0],
        )
        self.created = True
        (self.work / "created").write_text(self.cluster + "\n")
        run(
            [
                self.kind,
                "create",
                "cluster",
                "--name",
                self.cluster,
                "--config",
                str(path),
                "--kubeconfig",
                str(self.kubeconfig),
                "--wait",
                f"{int(self.options.ready_timeout_s)}s",
            ],
            timeout=self.options.ready_timeout_s + 120,
            hint="see the run folder's kind/diagnostics, or rerun with -vv",
        )

    def _reuse(self) -> None:
        log.info("reusing kind cluster %s", self.cluster)
        done = run([self.kind, "get", "kubeconfig", "--name", self.cluster], timeout=60)
        self.kubeconfig.write_text(done.stdout)
        self.kubeconfig.chmod(0o600)
        port = run(
            ["docker", "port", f"{self.cluster}-control-plane", f"{objects.BINDER_NODE_PORT}/tcp"],
            check=False,
            timeout=30,
        )
        mapped = (
            re.search(r":(\d+)\s*$", port.stdout.strip().splitlines()[0])
            if (port.returncode == 0 and port.stdout.strip())
            else None
        )
        self.host_port = int(mapped.group(1)) if mapped else 0

    def _kubectl(
        self, *args: str, timeout: float = 120.0, check: bool = True, namespace: str | None = None
    ) -> str:
        argv = [self.kubectl, "--kubeconfig", str(self.kubeconfig)]
        if namespace:
            argv += ["-n", namespace]
        return run([*argv, *args], timeout=timeout, check=check, hint=KUBECTL_HINT).stdout

    def _wait_ready(self, deadline: float) -> None:
        """Nodes Ready and CoreDNS rolled out: what `--wait` alone does not promise."""
        self._kubectl(
            "wait",
            "--for=condition=Ready",
            "nodes",
            "--all",
            f"--timeout={_left(deadline)}s",
            timeout=_left(deadline) + 30,
        )
        self._kubectl(
            "rollout",
            "status",
            "deployment/coredns",
            f"--timeout={_left(deadline)}s",
            namespace="kube-system",
            timeout=_left(deadline) + 30,
        )

    def _apply_base(self, deadline: float) -> None:
        """The run's namespace and the binder's rights, then its default service account."""
        path = self.work / "base.yaml"
        path.write_text(yaml.safe_dump_all(objects.base_objects(self.run_id), sort_keys=False))
        self._kubectl("apply", "-f", str(path))

        def default_account() -> tuple[bool, str]:
            argv = [
                self.kubectl,
                "--kubeconfig",
                str(self.kubeconfig),
                "-n",
                self.namespace,
                "get",
                "serviceaccount",
                "default",
                "-o",
                "name",
            ]
            done = run(argv, check=False, timeout=30)
            seen = (done.stdout + done.stderr).strip() or f"exit {done.returncode}"
            return done.returncode == 0, seen

        # Pods are refused until the namespace's controller has made this account.
        wait_for(
            f"the default service account of namespace {self.namespace}",
            default_account,
            timeout=_left(deadline),
            interval=0.5,
        )

    def _start_watch(self) -> None:
        self._watcher = PodWatcher(self.api, {RUN_LABEL: self.run_id})
        self._watcher.start()

    @property
    def api(self) -> KubeApi:
        if self._api is None:
            if not self.kubeconfig.exists():
                raise LabError(f"kind cluster {self.cluster} is not up: call up() first")
            self._api = KubeApi(
                self.kubeconfig, self.namespace, transport=self.options.api_transport
            )
        return self._api

    # -- images ------------------------------------------------------------------------

    def base_image(self) -> str:
        """Debian with a headless JRE, built once by Docker from Debian's packages."""
        recipe = hashlib.sha256(" ".join(PACKAGES).encode()).hexdigest()[:12]
        tag = f"{BASE_REPO}:bookworm-{recipe}"
        found = run(
            ["docker", "image", "inspect", "--format", "{{.Id}}", tag], check=False, timeout=60
        )
        if found.returncode == 0:
            return tag
        context = self.work / "base-image"
        context.mkdir(parents=True, exist_ok=True)
        (context / "Containerfile").write_text(
            "FROM debian:bookworm-slim\n"
            "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
            f"--no-install-recommends {' '.join(PACKAGES)} && rm -rf /var/lib/apt/lists/*\n"
        )
        log.info("building the base image %s with Docker (once)", tag)
        run(
            [
                "docker",
                "build",
                "--file",
                str(context / "Containerfile"),
                "--tag",
                tag,
                str(context),
            ],
            timeout=1800,
            hint=DOCKER_HINT,
        )
        return tag

    def build_image(self, context: Path, tag: str, labels: dict[str, str]) -> str:
        """Build with Docker, then load the image into the cluster's nodes."""
        argv = ["docker", "build", "--file", str(Path(context) / "Containerfile"), "--tag", tag]
        for key, value in sorted({RUN_LABEL: self.run_id, **labels}.items()):
            argv += ["--label", f"{key}={value}"]
        log.info("building image %s", tag)
        run([*argv, str(context)], timeout=1800, hint=DOCKER_HINT)
        image_id = self._image_id(tag)
        if self.kubeconfig.exists():
            self.load_image(tag)
        return image_id

    def _image_id(self, image: str) -> str:
        done = run(
            ["docker", "image", "inspect", "--format", "{{.Id}}", image],
            timeout=60,
            hint=f"build or pull {image} first",
        )
        return done.stdout.strip()

    def load_image(self, image: str) -> None:
        """`kind load docker-image`, unless every node already holds that image id."""
        want = self._image_id(image)
        nodes = run([self.kind, "get", "nodes", "--name", self.cluster], timeout=60)
        stale = []
        for node in [line.strip() for line in nodes.stdout.splitlines() if line.strip()]:
            held = run(
                [
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
                ],
                check=False,
                timeout=60,
            )
            if held.returncode != 0 or held.stdout.strip() != want:
                stale.append(node)
        if not stale:
            log.info("image %s is already on every node; not loading it", image)
            return
        log.info("loading image %s into %s", image, ", ".join(stale))
        run(
            [self.kind, "load", "docker-image", image, "--name", self.cluster],
            timeout=900,
            hint="check `docker image ls` holds the image and the cluster's nodes are running",
        )

    # -- pods ----------------------------------------------------------------------------

    def manifest_options(self, mounts: dict[str, str] | None = None) -> dict[str, Any]:
        """pod_manifest keywords that fit this engine, from podman-style `mounts`.

        Files become keys of the run's ConfigMap (created here, from their current text);
        folders under the run folder stay hostPath volumes, which the nodes share with the
        host; anything else is refused.
        """
        files: dict[str, str] = {}
        config_files: dict[str, str] = {}
        folders: dict[str, str] = {}
        for host_path, pod_path in sorted((mounts or {}).items()):
            path = Path(host_path)
            if path.is_file():
                key = re.sub(r"[^-._a-zA-Z0-9]+", "_", path.name)
                if key in files and files[key] != path.read_text():
                    key = f"{len(files)}-{key}"
                files[key] = path.read_text()
                config_files[key] = pod_path
            elif self._shared(path):
                folders[host_path] = pod_path
            else:
                raise ManifestError(
                    f"hostPath {host_path} cannot reach a kind node: put it under the run "
                    f"folder {self.run_dir}, or make it a file for the ConfigMap"
                )
        params: dict[str, Any] = {
            "host_network": False,
            "namespace": self.namespace,
            "mounts": folders,
        }
        if files:
            self.put_config(files)
            params.update(config_map=objects.CONFIG_MAP, config_files=config_files)
        return params

    def put_config(self, files: dict[str, str]) -> str:
        """Create or update the run's ConfigMap with these files; return its name."""
        self.api.apply(objects.config_map(self.run_id, files))
        return objects.CONFIG_MAP

    def _shared(self, path: Path) -> bool:
        return (
            self.options.share_run_dir
            and self.created
            and path.resolve().is_relative_to(self.run_dir)
        )

    def _check_fits(self, manifest: dict[str, Any]) -> None:
        spec = manifest["spec"]
        name = manifest["metadata"]["name"]
        if spec.get("hostNetwork"):
            raise ManifestError(
                f"pod {name} asks for the host network, which on kind is a node's: build it "
                "with the engine's manifest_options() (its Service is the binder's address)"
            )
        for volume in spec.get("volumes") or []:
            host = (volume.get("hostPath") or {}).get("path")
            if host and not self._shared(Path(host)):
                raise ManifestError(
                    f"pod {name}: hostPath {host} is not shared with the kind nodes: build it "
                    "with the engine's manifest_options(), which moves files to a ConfigMap"
                )
        namespace = manifest["metadata"].get("namespace", self.namespace)
        if namespace != self.namespace:
            raise ManifestError(f"pod {name} is for namespace {namespace}, not {self.namespace}")

    def apply(self, manifest: dict[str, Any]) -> None:
        """Create a worker's pod; a binder's becomes a Deployment behind its Service."""
        check_pod_manifest(manifest)
        self._check_fits(manifest)
        manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": self.namespace}}
        if manifest["metadata"]["labels"].get("lab.role") != "binder":
            log.debug("creating pod %s", manifest["metadata"]["name"])
            self.api.create_pod(manifest)
            return
        ports = [p for c in manifest["spec"]["containers"] for p in c.get("ports") or []]
        if not ports:
            raise ManifestError(
                f"binder pod {manifest['metadata']['name']} names no container port: build it "
                "with ports={'binder': <its ListeningPort>}"
            )
        # Its submit hook creates the workers' pods with this account's token.
        spec = {k: v for k, v in manifest["spec"].items() if k != "automountServiceAccountToken"}
        spec["serviceAccountName"] = objects.BINDER_ACCOUNT
        log.info("deploying the binder as Deployment and Service %s", objects.BINDER)
        self.api.apply(objects.deployment({**manifest, "spec": spec}))
        self.api.apply(objects.service(self.run_id, int(ports[0]["containerPort"])))

    def pods(self, selector: dict[str, str] | None = None) -> list[PodInfo]:
        found = self.api.pods({RUN_LABEL: self.run_id, **(selector or {})})
        return [pod_info(pod) for _, pod in sorted(found.items())]

    def _resolve(self, name: str) -> dict[str, Any]:
        """A pod by its name, or by the Pod manifest name its Deployment was made from."""
        pod = self.api.pod(name)
        if pod is not None:
            return pod
        made = self.api.pods({RUN_LABEL: self.run_id, objects.NAME_LABEL: name})
        live = [p for p in made.values() if not (p["metadata"].get("deletionTimestamp"))]
        if not live:
            raise LabError(f"no pod {name} in namespace {self.namespace}: see `pods()`")
        return live[0]

    def wait_pods(
        self, what: str, selector: dict[str, str], count: int, timeout: float | None = None
    ) -> list[PodInfo]:
        """Wait until `count` pods matching `selector` are Running."""

        def enough(pods: PodMap) -> tuple[bool, str]:
            running = [p for p in pods.values() if pod_info(p).phase == "Running"]
            return len(running) >= count, summary(pods)

        found = self.api.wait_pods(
            what,
            enough,
            labels={RUN_LABEL: self.run_id, **selector},
            timeout=timeout or self.options.wait_timeout_s,
        )
        return [pod_info(pod) for _, pod in sorted(found.items())]

    def delete(self, pod: str) -> None:
        """Remove a pod at once and wait until it is gone.

        The binder's pod belongs to a Deployment that would bring it back, so naming the
        binder's Pod manifest removes its Deployment and Service instead.
        """
        made_from = {RUN_LABEL: self.run_id, objects.NAME_LABEL: pod}
        if self.api.pod(pod) is None and self.api.pods(made_from):
            self.api.delete("Deployment", objects.BINDER, grace_s=None)
            self.api.delete("Service", objects.BINDER, grace_s=None)
            self._wait_gone(made_from, None, pod)
            return
        if self.api.delete("Pod", pod, grace_s=0):
            self._wait_gone(None, {"metadata.name": pod}, pod)

    def _wait_gone(
        self, labels: dict[str, str] | None, field: dict[str, str] | None, pod: str
    ) -> None:
        self.api.wait_pods(
            f"pod {pod} to be gone",
            lambda pods: (not pods, summary(pods)),
            labels=labels,
            fields=field,
            timeout=self.options.wait_timeout_s,
        )

    def logs(self, pod: str) -> str:
        found = self._resolve(pod)
        containers = [c["name"] for c in found["spec"]["containers"]]
        return "".join(self.api.log(found["metadata"]["name"], c) for c in containers)

    def events(self) -> list[EngineEvent]:
        return self._watcher.events() if self._watcher is not None else []

    # -- faults --------------------------------------------------------------------------

    @property
    def docker(self) -> docker.DockerClient:
        if self._docker is None:
            self._docker = docker.from_env(timeout=60)
        return self._docker

    def kill(self, pod: str) -> None:
        """SIGKILL the main process of each of a pod's containers, from inside its node."""
        found = self._resolve(pod)
        node_name = (found.get("spec") or {}).get("nodeName")
        statuses = (found.get("status") or {}).get("containerStatuses") or []
        ids = [
            str(s.get("containerID", "")).split("://")[-1] for s in statuses if s.get("containerID")
        ]
        if not node_name or not ids:
            raise LabError(f"pod {pod} has no running container to kill yet: wait for it first")
        node = self.docker.containers.get(node_name)
        for container_id in ids:
            code, out = node.exec_run(
                [
                    "crictl",
                    "inspect",
                    "-o",
                    "go-template",
                    "--template",
                    "{{.info.pid}}",
                    container_id,
                ]
            )
            pid = out.decode().strip() if isinstance(out, bytes) else str(out).strip()
            if code != 0 or not pid.isdigit():
                raise LabError(
                    f"could not find the process of pod {pod} on node {node_name}: "
                    f"crictl said {pid!r}; is the container still running?"
                )
            code, out = node.exec_run(["kill", "-KILL", pid])
            if code != 0:
                raise LabError(f"kill -KILL {pid} on node {node_name} failed: {out!r}")

    def nodes(self) -> list[str]:
        """The cluster's node names, which are also their Docker container names."""
        done = run([self.kind, "get", "nodes", "--name", self.cluster], timeout=60)
        return sorted(line.strip() for line in done.stdout.splitlines() if line.strip())

    def stop_node(self, node: str, grace_s: int = 0) -> None:
        """Stop a node's container, as a machine failure would."""
        self._node(node).stop(timeout=grace_s)

    def start_node(self, node: str) -> None:
        self._node(node).start()

    def _node(self, node: str) -> Any:
        if not node.startswith(f"{self.cluster}-"):
            raise LabError(f"{node} is not a node of kind cluster {self.cluster}: see nodes()")
        return self.docker.containers.get(node)

    # -- what the binder needs -----------------------------------------------------------

    def hook_target(self) -> dict[str, Any]:
        """The submit hook creates pods with the binder's service account, in the run's
        namespace."""
        return {"kind": "kubernetes", "namespace": self.namespace, "timeout": 30}

    def hook_mounts(self) -> dict[str, str]:
        return {}  # the service account's token is mounted by Kubernetes itself

    def binder_address(self) -> str:
        """Workers reach the binder through its Service."""
        return objects.service_host(self.run_id)

    def client_address(self) -> tuple[str, int]:
        """Where the host's clients reach the binder: its node port, mapped to loopback."""
        if not self.host_port:
            raise LabError(
                f"kind cluster {self.cluster} maps no host port to node port "
                f"{objects.BINDER_NODE_PORT}: let the lab create the cluster (no cluster=...)"
            )
        return "127.0.0.1", self.host_port

    # -- failure and teardown ------------------------------------------------------------

    def collect_failure(self, reason: str) -> Path:
        """Keep pod logs, events and kind's own logs in the run folder, before teardown."""
        folder = self.work / "diagnostics"
        (folder / "pods").mkdir(parents=True, exist_ok=True)
        (folder / "reason.txt").write_text(reason + "\n")
        if not self.kind:
            return folder
        if self.kubectl and self.kubeconfig.exists():
            self._save(folder / "pods.txt", "get", "pods", "-o", "wide")
            self._save(
                folder / "events.txt", "get", "events", "--sort-by=.metadata.creationTimestamp"
            )
            names = self._save(None, "get", "pods", "-o", "name")
            for line in names.splitlines():
                pod = line.strip().removeprefix("pod/")
                if pod:
                    self._save(
                        folder / "pods" / f"{pod}.log",
                        "logs",
                        f"pod/{pod}",
                        "--all-containers",
                        "--timestamps",
                    )
        done = run(
            [self.kind, "export", "logs", str(folder / "kind-logs"), "--name", self.cluster],
            check=False,
            timeout=300,
        )
        if done.returncode != 0:
            (folder / "kind-export.err").write_text(done.stdout + done.stderr)
        log.info("kept what the cluster said in %s", folder)
        return folder

    def _save(self, path: Path | None, *args: str) -> str:
        try:
            text = self._kubectl(*args, namespace=self.namespace, check=False, timeout=60)
        except (CommandFailed, OSError) as exc:
            text = f"could not run kubectl {' '.join(args)}: {exc}\n"
        if path is not None:
            path.write_text(text)
        return text

    def detach(self) -> None:
        """Leave the cluster up after this process exits; later sweeps leave it alone."""
        keep_marker(self.cluster).write_text(self.run_id + "\n")
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def down(self) -> None:
        """Remove the run's cluster (or, on a reused one, its namespace); safe twice."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._api is not None:
            self._api.close()
            self._api = None
        if not self.kubeconfig.exists() and not self.created:
            return
        self.kind = self.kind or find_kind()
        if self.options.keep:
            keep_marker(self.cluster).write_text(self.run_id + "\n")
            log.info(
                "keeping kind cluster %s: delete it with `kind delete cluster --name %s`",
                self.cluster,
                self.cluster,
            )
            return
        if self.created:
            log.info("deleting kind cluster %s", self.cluster)
            run([self.kind, "delete", "cluster", "--name", self.cluster], timeout=300)
            keep_marker(self.cluster).unlink(missing_ok=True)
            (self.work / "created").unlink(missing_ok=True)
            self.created = False
        else:
            log.info("removing namespace %s from kind cluster %s", self.namespace, self.cluster)
            self.kubectl = self.kubectl or require_tool("kubectl", KUBECTL_HINT)
            self._kubectl(
                "delete",
                "namespace",
                self.namespace,
                "--ignore-not-found",
                "--wait=false",
                timeout=120,
            )
        self.kubeconfig.unlink(missing_ok=True)
        record = self.record or RunRecord.load(self.run_id)
        if record is not None:
            record.forget()
        self.record = None


def _left(deadline: float) -> int:
    left = int(deadline - time.monotonic())
    if left <= 0:
        raise WaitTimeout("gave up waiting for the kind cluster to be ready: its time ran out")
    return left
