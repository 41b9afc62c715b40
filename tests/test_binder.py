"""The binder on the lab: pool, TEST requests, refusals, the timeline, the submit hook.

These run against whatever binder the session lab deploys: the stand-in by default, a
real WorkBinder when LAB_BINDER_HOME (or --lab-binder-home) names one. Run them both
ways; that makes them the conformance suite of the stand-in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.binder.submit_hook import job_pod_name
from lab.engines.podman import PodmanEngine
from lab.lab import Lab
from lab.manifest import pod_manifest
from lab.observe.timeline import Observer
from lab.protocol.client import Refused, Success, query_sync, test_job_sync
from lab.scenarios.probes import HeldJob, wait_ready
from tests.conftest import needs_podman

pytestmark = [pytest.mark.lab, needs_podman]

HOOK = Path(__file__).resolve().parents[1] / "lab" / "binder" / "submit_hook.py"


def test_which_binder_runs(lab: Lab) -> None:
    if os.environ.get("LAB_BINDER_HOME"):
        assert lab.binder.kind == "real"
    else:
        assert lab.binder.kind == "standin"


def test_real_workbinder_conformance_is_available() -> None:
    if not os.environ.get("LAB_BINDER_HOME"):
        pytest.skip("no WorkBinder tree: set LAB_BINDER_HOME to run these tests against it")


def test_pool_reaches_its_minimum_in_containers(lab: Lab) -> None:
    size = lab.scenario.binder.pool.min_pool_size

    waited = wait_ready(lab, size, 60)

    assert waited.reached is not None, waited.last_seen
    workers = [p for p in lab.engine.pods({"lab.role": "worker"}) if p.phase == "Running"]
    assert len(workers) >= size
    assert all(p.labels["lab.run"] == lab.run_id for p in workers)


def test_status_command_shows_the_workers(lab: Lab) -> None:
    lab_cli = Path(sys.executable).parent / "lab"

    done = subprocess.run(
        [str(lab_cli), "status", lab.run_id],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )

    assert done.returncode == 0, done.stderr
    assert f"{lab.run_id}-binder" in done.stdout
    assert done.stdout.count(" worker ") >= lab.scenario.binder.pool.min_pool_size


def test_test_request_is_served_end_to_end(lab: Lab) -> None:
    wait_ready(lab, 1, 60)

    outcome = test_job_sync("127.0.0.1", lab.binder.endpoint.port, ["ping", "pong"])

    assert isinstance(outcome, Success), outcome
    assert outcome.replies == ("Binder ping", "Binder pong")
    assert outcome.ce == lab.scenario.binder.ces["Site-A"]


def test_refusal_when_every_worker_is_busy(lab_exclusive: Lab) -> None:
    lab = lab_exclusive
    size = lab.scenario.binder.pool.min_pool_size
    assert wait_ready(lab, size, 60).reached is not None
    held = [HeldJob(lab.binder.endpoint.port) for _ in range(size)]
    try:
        outcome = test_job_sync("127.0.0.1", lab.binder.endpoint.port)
    finally:
        for job in held:
            job.release()

    assert isinstance(outcome, Refused), outcome
    assert outcome.reason == "No ready jobs available"
    assert len({job.job_id for job in held}) == size


def test_timeline_orders_each_jobs_steps(lab: Lab) -> None:
    wait_ready(lab, lab.scenario.binder.pool.min_pool_size, 60)
    observer = Observer(lab.run_dir, lab.engine)
    time.sleep(0.3)

    phases = observer.job_phases()

    complete = [p for p in phases.values() if p.submitted and p.container_started and p.ready]
    assert complete, phases
    for phase in complete:
        assert phase.submitted < phase.container_started < phase.ready, phase  # type: ignore[operator]
    kinds = [e.kind for e in observer.timeline()]
    assert kinds.index("binder_up") < kinds.index("submitted") < kinds.index("ready")
    assert max(s.ready for s in observer.pool()) >= lab.scenario.binder.pool.min_pool_size


def test_the_query_counts_what_the_pool_holds(lab: Lab) -> None:
    wait_ready(lab, lab.scenario.binder.pool.min_pool_size, 60)

    answer = query_sync("127.0.0.1", lab.binder.endpoint.port)

    assert set(answer.ready) == set(lab.scenario.binder.ces.values())
    assert answer.total_ready >= lab.scenario.binder.pool.min_pool_size


# -- the submit hook, run as the binder runs it, against real podman ----------------------


def hook_config(engine: PodmanEngine, image: str, tmp_path: Path, socket: str) -> Path:
    template = pod_manifest(
        name="placeholder",
        run_id=engine.run_id,
        role="worker",
        image=image,
        command=["sleep", "{job}"],
    )
    template["spec"]["containers"][0]["command"] = ["sleep", "600"]
    config = {
        "target": {
            "kind": "podman",
            "socket": socket,
            "name_prefix": f"{engine.run_id}-",
            "timeout": 10,
        },
        "pod_template": template,
        "records": str(tmp_path / "submissions.jsonl"),
    }
    path = tmp_path / "hook.json"
    path.write_text(json.dumps(config))
    return path


def run_hook(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HOOK), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "LAB_HOOK_CONFIG": str(config)},
        timeout=60,
    )


def test_submit_hook_starts_the_jobs_pod(
    engine: PodmanEngine, base_image: str, tmp_path: Path
) -> None:
    config = hook_config(engine, base_image, tmp_path, str(engine.socket))
    job = "1796314185095-0"

    done = run_hook(config, "ce.lab:8443/pool", "Started_at_1796314185095", job, job)

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"lab submit hook: job {job} ok"]
    [pod] = engine.pods()
    assert pod.name == job_pod_name(job, f"{engine.run_id}-")
    assert pod.labels["lab.job"] == job and pod.labels["lab.run"] == engine.run_id
    [record] = [json.loads(line) for line in (tmp_path / "submissions.jsonl").open()]
    assert record["ok"] and record["job"] == job and record["applied_mono"] >= record["mono"]


def test_submit_hook_failure_is_recorded_and_quiet(
    engine: PodmanEngine, base_image: str, tmp_path: Path
) -> None:
    config = hook_config(engine, base_image, tmp_path, str(tmp_path / "no-such.sock"))

    done = run_hook(config, "ce", "Started_at_1", "1-0", "1-0")

    assert done.returncode == 1
    assert done.stdout.splitlines() == ["lab submit hook: job 1-0 FAILED"]
    [record] = [json.loads(line) for line in (tmp_path / "submissions.jsonl").open()]
    assert not record["ok"] and "FileNotFoundError" in record["error"]
    assert engine.pods() == []


def test_submit_hook_with_wrong_arguments(
    engine: PodmanEngine, base_image: str, tmp_path: Path
) -> None:
    config = hook_config(engine, base_image, tmp_path, str(engine.socket))

    done = run_hook(config, "only", "three", "args")

    assert done.returncode == 2
    assert len(done.stdout.splitlines()) == 1
