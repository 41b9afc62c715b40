"""The in-process Kubernetes client a cluster engine uses inside timed windows.

Calls go through lightkube. Every wait is a watch bounded by a deadline: it lists what is
there, watches from that point on, and gives up at the deadline saying what it last saw.
Objects are handled as plain dicts, the same shape the lab's manifests have.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx2
from lightkube import ApiError, AsyncClient, Client, KubeConfig
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Pod, Service

from lab.engines.base import EngineEvent, PodInfo
from lab.errors import KubeApiError, WaitTimeout

log = logging.getLogger(__name__)

FIELD_MANAGER = "workbinder-lab"
PodMap = dict[str, dict[str, Any]]
Probe = Callable[[PodMap], tuple[bool, str]]
KINDS: dict[str, Any] = {
    "Pod": Pod,
    "Deployment": Deployment,
    "Service": Service,
    "ConfigMap": ConfigMap,
}


def _selector(pairs: dict[str, str] | None) -> Any:
    """A selector as lightkube takes it: equality on every pair."""
    return dict(pairs) if pairs else None


def _refused(action: str, exc: ApiError) -> KubeApiError:
    status = exc.status
    hint = {
        403: "the lab's kubeconfig lacks the right; use the one kind wrote for this run",
        404: "it is not there; check the name, or that the run's namespace still exists",
        409: "it exists already; delete it first or pick another name",
        422: "the object is not valid; validate the manifest against the cluster's schema",
    }.get(int(status.code or 0), "see the cluster's events for more")
    return KubeApiError(
        f"the Kubernetes API refused to {action}: {status.code} {status.reason}: "
        f"{status.message}; {hint}"
    )


def _seconds_since(stamp: str | None, now: float) -> float:
    if not stamp:
        return 0.0
    parsed = time.strptime(stamp.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S%z")
    return max(0.0, now - calendar.timegm(parsed))


def pod_info(pod: dict[str, Any], now: float | None = None) -> PodInfo:
    """A Kubernetes Pod as the lab's engines report it."""
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    statuses = status.get("containerStatuses") or []
    created = metadata.get("creationTimestamp")
    return PodInfo(
        name=str(metadata.get("name", "")),
        phase=str(status.get("phase") or "Pending"),
        restarts=sum(int(s.get("restartCount") or 0) for s in statuses),
        age_s=_seconds_since(str(created) if created else None, now or time.time()),
        labels=dict(metadata.get("labels") or {}),
    )


def summary(pods: PodMap) -> str:
    """What an operator wants to read about pods on a timeout: name and phase of each."""
    if not pods:
        return "no pods"
    parts = [f"{name}={pod_info(pod).phase}" for name, pod in sorted(pods.items())]
    return ", ".join(parts[:8]) + (f" and {len(parts) - 8} more" if len(parts) > 8 else "")


class KubeApi:
    """One namespace of one cluster, reached from this process."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        *,
        transport: httpx2.BaseTransport | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.namespace = namespace
        self._config = KubeConfig.from_file(kubeconfig)
        self._transport = transport
        self._timeout = timeout
        self.client = Client(
            self._config,
            namespace=namespace,
            timeout=httpx2.Timeout(timeout),
            transport=transport,
            field_manager=FIELD_MANAGER,
        )

    def async_client(self) -> AsyncClient:
        """A client for one event loop; watches run on it so a deadline can cancel them."""
        return AsyncClient(
            self._config,
            namespace=self.namespace,
            timeout=httpx2.Timeout(self._timeout),
            transport=self._transport,  # type: ignore[arg-type]
        )

    def close(self) -> None:
        self.client.close()

    # -- calls ---------------------------------------------------------------------------

    def create_pod(self, manifest: dict[str, Any]) -> None:
        name = manifest["metadata"]["name"]
        try:
            self.client.create(cast(Pod, Pod.from_dict(manifest)))
        except ApiError as exc:
            raise _refused(f"create pod {name}", exc) from exc

    def apply(self, manifest: dict[str, Any]) -> None:
        """Create or update an object by server-side apply, so applying twice is harmless."""
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        resource = KINDS[kind]
        try:
            self.client.apply(resource.from_dict(manifest), field_manager=FIELD_MANAGER, force=True)
        except ApiError as exc:
            raise _refused(f"apply {kind} {name}", exc) from exc

    def pods(self, labels: dict[str, str]) -> PodMap:
        try:
            found = self.client.list(Pod, namespace=self.namespace, labels=_selector(labels))
            return {str(p.metadata.name): p.to_dict() for p in found if p.metadata}
        except ApiError as exc:
            raise _refused("list pods", exc) from exc

    def pod(self, name: str) -> dict[str, Any] | None:
        try:
            return self.client.get(Pod, name, namespace=self.namespace).to_dict()
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise _refused(f"read pod {name}", exc) from exc

    def delete(self, kind: str, name: str, grace_s: int | None = 0) -> bool:
        """Delete an object; False when it was already gone."""
        try:
            self.client.delete(KINDS[kind], name, namespace=self.namespace, grace_period=grace_s)
            return True
        except ApiError as exc:
            if exc.status.code == 404:
                return False
            raise _refused(f"delete {kind} {name}", exc) from exc

    def log(self, pod: str, container: str | None = None) -> str:
        try:
            lines = self.client.log(pod, namespace=self.namespace, container=container)
            return "".join(lines)
        except ApiError as exc:
            raise _refused(f"read the log of pod {pod}", exc) from exc

    # -- bounded waits -------------------------------------------------------------------

    def wait_pods(
        self,
        what: str,
        probe: Probe,
        *,
        timeout: float,
        labels: dict[str, str] | None = None,
        fields: dict[str, str] | None = None,
    ) -> PodMap:
        """Watch pods until probe(pods) says done; raise WaitTimeout at the deadline."""
        return asyncio.run(self._wait_pods(what, probe, timeout, labels, fields))

    async def _wait_pods(
        self,
        what: str,
        probe: Probe,
        timeout: float,
        labels: dict[str, str] | None,
        fields: dict[str, str] | None,
    ) -> PodMap:
        client = self.async_client()
        pods: PodMap = {}
        last = "nothing yet"
        try:
            async with asyncio.timeout(timeout):
                listed = client.list(
                    Pod,
                    namespace=self.namespace,
                    labels=_selector(labels),
                    fields=_selector(fields),
                )
                async for pod in listed:
                    pods[str(pod.metadata.name if pod.metadata else "")] = pod.to_dict()
                done, last = probe(pods)
                if done:
                    return pods
                watch = client.watch(
                    Pod,
                    namespace=self.namespace,
                    labels=_selector(labels),
                    fields=_selector(fields),
                    resource_version=listed.resourceVersion,
                )
                async for kind, pod in watch:
                    name = str(pod.metadata.name if pod.metadata else "")
                    if kind == "DELETED":
                        pods.pop(name, None)
                    else:
                        pods[name] = pod.to_dict()
                    done, last = probe(pods)
                    if done:
                        return pods
        except TimeoutError:
            raise WaitTimeout(
                f"gave up after {timeout:.0f} s waiting for {what}; last saw: {last}"
            ) from None
        except ApiError as exc:
            raise _refused(f"watch pods for {what}", exc) from exc
        finally:
            await client.close()
        raise WaitTimeout(f"the watch for {what} ended early; last saw: {last}")


class PodWatcher:
    """Watches a run's pods in a thread and turns what changes into the lab's events."""

    def __init__(self, api: KubeApi, labels: dict[str, str]) -> None:
        self.api = api
        self.labels = labels
        self._events: list[EngineEvent] = []
        self._lock = threading.Lock()
        self._state: dict[str, dict[str, Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lab-pod-watch", daemon=True)
        self.error: str | None = None

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise WaitTimeout(f"gave up after {timeout:.0f} s waiting for the pod watch to start")

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the watch and wait for its thread, at most `timeout` seconds."""
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the pod watch did not stop within %.0f s; leaving it", timeout)

    def events(self) -> list[EngineEvent]:
        with self._lock:
            return list(self._events)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._task = loop.create_task(self._watch())
            loop.call_soon(self._ready.set)
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # Reported by the engine; a watch must not kill the lab.
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("the pod watch stopped: %s", self.error)
        finally:
            self._ready.set()
            loop.close()

    async def _watch(self) -> None:
        client = self.api.async_client()
        try:
            watch = client.watch(Pod, namespace=self.api.namespace, labels=_selector(self.labels))
            async for kind, pod in watch:
                self.observe(kind, pod.to_dict())
        finally:
            await client.close()

    def observe(self, kind: str, pod: dict[str, Any]) -> None:
        """Record the events one watch notice implies, against the pod's last state."""
        mono, wall = time.monotonic(), time.time()
        name = str((pod.get("metadata") or {}).get("name", ""))
        before = self._state.get(name)
        found: list[tuple[str, str]] = []
        if kind == "DELETED":
            self._state.pop(name, None)
            found.append(("removed", ""))
        else:
            now = _container_state(pod)
            self._state[name] = now
            if before is None:
                found.append(("created", str((pod.get("spec") or {}).get("nodeName") or "")))
                before = {"running": False, "terminated": False, "restarts": 0}
            if now["restarts"] > before["restarts"]:
                found.append(("restarted", f"restarts={now['restarts']}"))
            if now["running"] and not before["running"]:
                found.append(("started", ""))
            if now["terminated"] and not before["terminated"]:
                found.append(("died", now["reason"]))
        with self._lock:
            self._events += [EngineEvent(mono, wall, name, what, detail) for what, detail in found]


def _container_state(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    running = bool(statuses) and all((s.get("state") or {}).get("running") for s in statuses)
    ended = [(s.get("state") or {}).get("terminated") for s in statuses]
    terminated = [t for t in ended if t]
    reason = ""
    if terminated:
        first = terminated[0]
        reason = f"{first.get('reason') or 'exited'} (exit {first.get('exitCode')})"
    return {
        "running": running,
        "terminated": bool(terminated),
        "restarts": sum(int(s.get("restartCount") or 0) for s in statuses),
        "reason": reason,
    }
