"""A lab on a Kubernetes cluster reached through KubeApi: what the kind and vbox engines share.

Once a cluster answers, its pods are handled the same way whoever made it: Pod manifests
become pods in the run's namespace (a binder's a Deployment behind its Service), files
travel in the run's ConfigMap, and logs, events and removal go through the API server.
An engine built on this brings the cluster into being, gets images onto its nodes,
reaches containers for faults and tears the cluster down.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import httpx2

from lab.engines import k8s_objects as objects
from lab.engines.base import EngineEvent, PodInfo
from lab.engines.kube_api import KubeApi, PodMap, PodWatcher, pod_info, summary
from lab.errors import LabError, ManifestError
from lab.manifest import check_pod_manifest
from lab.run import RUN_LABEL, RunRecord

log = logging.getLogger(__name__)


class ClusterEngine(ABC):
    """Runs a lab's pods on a Kubernetes cluster that a subclass brings up and down."""

    name: str
    # Error messages name the machines pods run on in each engine's own words; each of
    # these ends the sentence shown after it.
    msg_unreachable: str  # "hostPath /x cannot reach ..."
    msg_host_network: str  # "pod p asks for the host network, which ..."
    msg_unshared: str  # "pod p: hostPath /x ..."

    def __init__(
        self, run_id: str, run_dir: Path, api_transport: httpx2.BaseTransport | None
    ) -> None:
        """The run's namespace, and its folder (named after the engine) in the run folder.

        api_transport stands in for the cluster's API server in tests.
        """
        self.run_id = run_id
        self.run_dir = Path(run_dir).resolve()
        self.namespace = objects.run_namespace(run_id)
        self.work = self.run_dir / self.name
        self.kubeconfig = self.work / "kubeconfig"
        self.record: RunRecord | None = None
        self._api_transport = api_transport
        self._api: KubeApi | None = None
        self._watcher: PodWatcher | None = None

    @abstractmethod
    def _not_up(self) -> str:
        """What to tell a caller who needs the cluster before up() made it."""

    @abstractmethod
    def _pod_wait_s(self) -> float:
        """How long to wait for pods to come or go, unless the caller says."""

    # -- the API server ------------------------------------------------------------------

    @property
    def api(self) -> KubeApi:
        if self._api is None:
            if not self.kubeconfig.exists():
                raise LabError(self._not_up())
            self._api = KubeApi(self.kubeconfig, self.namespace, transport=self._api_transport)
        return self._api

    def _start_watch(self) -> None:
        self._watcher = PodWatcher(self.api, {RUN_LABEL: self.run_id})
        self._watcher.start()

    def _stop_watch(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def _disconnect(self) -> None:
        self._stop_watch()
        if self._api is not None:
            self._api.close()
            self._api = None

    def _forget_run(self) -> None:
        """The lab is gone: drop its kubeconfig and the run's record."""
        self.kubeconfig.unlink(missing_ok=True)
        record = self.record or RunRecord.load(self.run_id)
        if record is not None:
            record.forget()
        self.record = None

    # -- pods ----------------------------------------------------------------------------

    def manifest_options(self, mounts: dict[str, str] | None = None) -> dict[str, Any]:
        """pod_manifest keywords that fit this engine, from podman-style `mounts`.

        Files become keys of the run's ConfigMap (created here, from their current text);
        folders the nodes share with the host stay hostPath volumes; anything else is
        refused.
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
                    f"hostPath {host_path} cannot reach {self.msg_unreachable}: put it under "
                    f"the run folder {self.run_dir}, or make it a file for the ConfigMap"
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
        """Whether the nodes see this host path where the host does."""
        return path.resolve().is_relative_to(self.run_dir)

    def _check_fits(self, manifest: dict[str, Any]) -> None:
        spec = manifest["spec"]
        name = manifest["metadata"]["name"]
        if spec.get("hostNetwork"):
            raise ManifestError(
                f"pod {name} asks for the host network, which {self.msg_host_network}: build "
                "it with the engine's manifest_options() (its Service is the binder's address)"
            )
        for volume in spec.get("volumes") or []:
            host = (volume.get("hostPath") or {}).get("path")
            if host and not self._shared(Path(host)):
                raise ManifestError(f"pod {name}: hostPath {host} {self.msg_unshared}")

    def _binder_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The binder's pod spec as its Deployment runs it: under the binder's account,
        whose token its submit hook uses to create the workers' pods."""
        spec = {k: v for k, v in spec.items() if k != "automountServiceAccountToken"}
        return {**spec, "serviceAccountName": objects.BINDER_ACCOUNT}

    def apply(self, manifest: dict[str, Any]) -> None:
        """Create a worker's pod; a binder's becomes a Deployment behind its Service."""
        check_pod_manifest(manifest)
        self._check_fits(manifest)
        manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": self.namespace}}
        name = manifest["metadata"]["name"]
        if manifest["metadata"]["labels"].get("lab.role") != "binder":
            log.debug("creating pod %s", name)
            self.api.create_pod(manifest)
            return

        ports = [p for c in manifest["spec"]["containers"] for p in c.get("ports") or []]
        if not ports:
            raise ManifestError(
                f"binder pod {name} names no container port: build it with "
                "ports={'binder': <its ListeningPort>}"
            )
        log.info("deploying the binder as Deployment and Service %s", objects.BINDER)
        self.api.apply(
            objects.deployment({**manifest, "spec": self._binder_spec(manifest["spec"])})
        )
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
        live = [p for p in made.values() if not p["metadata"].get("deletionTimestamp")]
        if not live:
            raise LabError(f"no pod {name} in namespace {self.namespace}: see `pods()`")
        return live[0]

    def _running_containers(self, pod: str) -> tuple[str, list[str]]:
        """The node a pod runs on and its containers' runtime ids, for a fault to reach."""
        found = self._resolve(pod)
        node = (found.get("spec") or {}).get("nodeName")
        statuses = (found.get("status") or {}).get("containerStatuses") or []
        ids = [str(s["containerID"]).split("://")[-1] for s in statuses if s.get("containerID")]
        if not node or not ids:
            raise LabError(f"pod {pod} has no running container to kill yet: wait for it first")
        return str(node), ids

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
            timeout=timeout or self._pod_wait_s(),
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
        self, labels: dict[str, str] | None, fields: dict[str, str] | None, pod: str
    ) -> None:
        def gone(pods: PodMap) -> tuple[bool, str]:
            return not pods, summary(pods)

        self.api.wait_pods(
            f"pod {pod} to be gone",
            gone,
            labels=labels,
            fields=fields,
            timeout=self._pod_wait_s(),
        )

    def logs(self, pod: str) -> str:
        found = self._resolve(pod)
        containers = [c["name"] for c in found["spec"]["containers"]]
        return "".join(self.api.log(found["metadata"]["name"], c) for c in containers)

    def events(self) -> list[EngineEvent]:
        return self._watcher.events() if self._watcher is not None else []

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
