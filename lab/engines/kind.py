"""The kind engine: a Kubernetes cluster in Docker containers, one per run.

Set-up (cluster, readiness, images, the run's namespace and rights) goes through the
`kind`, `kubectl` and `docker` commands. Inside timed windows the engine talks to the API
server in process (lightkube), as every cluster engine does (`lab.engines.cluster`), and
every wait is a bounded watch. Faults on nodes and containers go through Docker's API
(docker-py).
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
from lab.engines.cluster import ClusterEngine
from lab.engines.images import PACKAGES
from lab.engines.kind_preflight import preflight
from lab.engines.kind_release import DEFAULT_KUBERNETES, find_kind
from lab.engines.kind_release import node_image as pinned_node_image
from lab.errors import CommandFailed, LabError, ManifestError, WaitTimeout
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


class KindEngine(ClusterEngine):
    """Runs a lab's pods on a kind cluster made for the run (or reused by name)."""

    name = "kind"
    msg_unreachable = "a kind node"
    msg_host_network = "on kind is a node's"
    msg_unshared = (
        "is not shared with the kind nodes: build it with the engine's manifest_options(), "
        "which moves files to a ConfigMap"
    )

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
        options = KindOptions(
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
        super().__init__(run_id, run_dir, options.api_transport)
        self.options = options
        self.cluster = check_cluster_name(self.options.cluster or cluster_name_for(run_id))
        self.node_image = node_image or pinned_node_image(kubernetes_version)
        self.kind = ""
        self.kubectl = ""
        self.host_port = self.options.host_port
        # This run made the cluster, so this run deletes it; a mark in the run folder
        # tells a later process (`lab down`) the same.
        self.created = (self.work / "created").exists()
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

    def _not_up(self) -> str:
        return f"kind cluster {self.cluster} is not up: call up() first"

    def _pod_wait_s(self) -> float:
        return self.options.wait_timeout_s

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

    def _shared(self, path: Path) -> bool:
        """Only a cluster this run made mounts the run folder into its nodes."""
        return self.options.share_run_dir and self.created and super()._shared(path)

    def _check_fits(self, manifest: dict[str, Any]) -> None:
        super()._check_fits(manifest)
        name = manifest["metadata"]["name"]
        namespace = manifest["metadata"].get("namespace", self.namespace)
        if namespace != self.namespace:
            raise ManifestError(f"pod {name} is for namespace {namespace}, not {self.namespace}")

    # -- faults --------------------------------------------------------------------------

    @property
    def docker(self) -> docker.DockerClient:
        if self._docker is None:
            self._docker = docker.from_env(timeout=60)
        return self._docker

    def kill(self, pod: str) -> None:
        """SIGKILL the main process of each of a pod's containers, from inside its node."""
        node_name, ids = self._running_containers(pod)
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

    # -- where clients reach the binder --------------------------------------------------

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
        self._stop_watch()

    def down(self) -> None:
        """Remove the run's cluster (or, on a reused one, its namespace); safe twice."""
        self._disconnect()
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
        self._forget_run()


def _left(deadline: float) -> int:
    left = int(deadline - time.monotonic())
    if left <= 0:
        raise WaitTimeout("gave up waiting for the kind cluster to be ready: its time ran out")
    return left
