"""The one small protocol every engine follows, and what it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class PodInfo:
    """A pod as the lab sees it, whatever engine runs it."""

    name: str
    phase: str  # Pending, Running, Succeeded, Failed or Unknown, as Kubernetes says
    restarts: int
    age_s: float
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineEvent:
    """Something the engine saw happen to a pod, on the lab's monotonic clock."""

    mono: float  # time.monotonic() of the event
    wall: float  # time.time() of the event
    pod: str
    kind: str  # started, died, restarted, removed, ...
    detail: str = ""


class Engine(Protocol):
    """Brings a cluster up for one run and runs Pod manifests on it."""

    name: str
    run_id: str
    run_dir: Path

    def up(self) -> None:
        """Bring the engine up; first remove leftovers of runs whose owner is gone."""

    def build_image(self, context: Path, tag: str, labels: dict[str, str]) -> str:
        """Build an image from a folder holding a Containerfile; return its id."""

    def apply(self, manifest: dict[str, Any]) -> None:
        """Create the pod a Pod manifest describes."""

    def pods(self, selector: dict[str, str] | None = None) -> list[PodInfo]:
        """The run's pods, optionally only those whose labels include `selector`."""

    def kill(self, pod: str) -> None:
        """Kill the main process of a pod's container, as a crash would."""

    def delete(self, pod: str) -> None:
        """Remove a pod and its containers."""

    def logs(self, pod: str) -> str:
        """What a pod's containers printed."""

    def events(self) -> list[EngineEvent]:
        """What the engine saw happen to the run's pods so far."""

    def hook_target(self) -> dict[str, Any]:
        """How a submit hook inside the binder's container reaches this engine's API."""

    def hook_mounts(self) -> dict[str, str]:
        """Host paths the binder's container needs mounted for its hook (host -> pod)."""

    def binder_address(self) -> str:
        """The address workers use to reach the binder."""

    def manifest_options(self, mounts: dict[str, str] | None = None) -> dict[str, Any]:
        """pod_manifest keywords that fit this engine, from host-path `mounts`."""

    def base_image(self) -> str:
        """The lab's base image (Debian with a JRE), built or loaded as this engine needs."""

    def detach(self) -> None:
        """Let the lab outlive this process (for `lab up`)."""

    def down(self) -> None:
        """Remove everything of this run; safe to call twice."""
