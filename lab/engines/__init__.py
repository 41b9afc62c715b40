"""Engines: what brings a lab's cluster into being and runs its pods."""

from __future__ import annotations

from pathlib import Path

from lab.engines.base import Engine
from lab.errors import LabError

ENGINES = ("podman", "kind", "vbox")


def make_engine(name: str, run_id: str, run_dir: Path, **options: object) -> Engine:
    """The engine called `name`, for one run."""
    if name == "podman":
        from lab.engines.podman import PodmanEngine

        return PodmanEngine(run_id, run_dir, **options)  # type: ignore[arg-type]
    if name == "kind":
        from lab.engines.kind import KindEngine

        return KindEngine(run_id, run_dir, **options)  # type: ignore[arg-type]
    if name == "vbox":
        from lab.engines.vbox import VboxEngine

        return VboxEngine(run_id, run_dir, **options)  # type: ignore[arg-type]
    raise LabError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
