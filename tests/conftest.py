"""Fixtures shared by the project's tests: a fresh podman engine per test, its base image."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.engines.podman import PodmanEngine, podman_env
from lab.run import new_run_id

needs_podman = pytest.mark.skipif(
    shutil.which("podman") is None, reason="podman is not installed: run `make setup`"
)


@pytest.fixture(scope="session")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The lab's base image, built once (cold: a few minutes; warm: cached)."""
    from lab.engines.images import debian_mirror, ensure_base_image

    scratch = tmp_path_factory.mktemp("base-image")
    return ensure_base_image(podman_env(scratch), debian_mirror(), progress=False)


@pytest.fixture
def engine(tmp_path: Path, base_image: str) -> Iterator[PodmanEngine]:
    """A podman engine brought up for this test alone, and torn down after it."""
    run_id = new_run_id()
    the_engine = PodmanEngine(run_id, tmp_path / run_id)
    the_engine.up()
    try:
        yield the_engine
    finally:
        the_engine.down()
