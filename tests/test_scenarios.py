"""Each scenario as a test on the session lab, and the lab's measurements against known truth.

The known-truth tests set the stand-in's delays and check that the lab measures them
within 5 % or 50 ms, whichever is larger.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from lab.lab import Lab
from lab.observe.timeline import Observer
from lab.report.results import Results
from lab.scenarios.failover import run_failover
from lab.scenarios.refill import run_refill
from lab.scenarios.runner import measure
from lab.scenarios.schema import Scenario, load_scenario
from lab.scenarios.throughput import run_throughput
from tests.conftest import needs_podman

SCENARIOS = sorted((Path(__file__).resolve().parents[1] / "scenarios").glob("*.yaml"))


def within_truth(measured: float, truth: float) -> bool:
    return abs(measured - truth) <= max(0.05 * truth, 0.050)


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_shipped_scenario_files_are_valid(path: Path) -> None:
    scenario, digest = load_scenario(path)

    assert scenario.name == path.stem
    assert len(digest) == 16


@pytest.mark.lab
@needs_podman
def test_refill_scenario(lab_exclusive: Lab) -> None:
    outcomes: dict[str, str] = {}

    metrics = run_refill(
        lab_exclusive, Observer(lab_exclusive.run_dir, lab_exclusive.engine), outcomes
    )

    assert outcomes == {}
    assert metrics["cold_fill_s"].n == 1 and metrics["cold_fill_s"].median
    assert metrics["drain_refill_s"].n == 1
    assert metrics["job_submit_to_ready_s"].n >= lab_exclusive.scenario.binder.pool.min_pool_size
    assert 0 < metrics["job_submit_to_running_s"].median < metrics["job_submit_to_ready_s"].median  # type: ignore[operator]


@pytest.mark.lab
@needs_podman
def test_failover_scenario(lab_exclusive: Lab) -> None:
    outcomes: dict[str, str] = {}
    observer = Observer(lab_exclusive.run_dir, lab_exclusive.engine)

    metrics = run_failover(lab_exclusive, observer, outcomes)

    # With a 3 s reusable timeout every fault recovers well within the 30 s deadline.
    for name in (
        "kill_ready_recovery_s",
        "kill_busy_recovery_s",
        "binder_restart_answer_s",
        "binder_restart_pool_s",
    ):
        assert metrics[name].n == 1, (name, outcomes)
    assert (
        "Closed" in outcomes["failover.kill_busy.1.client_saw"]
        or "Peer" in outcomes["failover.kill_busy.1.client_saw"]
    )
    timeline = observer.timeline()
    faults = [e.detail for e in timeline if e.kind == "fault"]
    assert any(f.startswith("killed READY worker") for f in faults)
    assert "killed the binder" in faults

    # The READY worker's replacement: the binder forgets the dead entry, then adds a new
    # job, and the recovery ends at that addition, not at whenever the lab next looked.
    kill = next(e for e in timeline if e.detail.startswith("killed READY worker"))
    removed = next(e for e in timeline if e.kind == "removed" and e.t > kill.t)
    added = next(e for e in timeline if e.kind == "ready" and e.t > kill.t)
    assert removed.job == kill.job and removed.t < added.t, (removed, added)
    recovery = metrics["kill_ready_recovery_s"].values[0]
    assert abs(recovery - (added.t - kill.t)) < 0.05, (recovery, added.t - kill.t)

    # Counted before the kill: the pool's running workers, not the exited pods of the
    # earlier faults.
    pool = lab_exclusive.scenario.binder.pool.min_pool_size
    assert f" of {pool} worker pods" in outcomes["failover.binder_restart.1.old_workers"], outcomes

    # The old binder's workers, refused by the new one, are gone: only the new pool runs.
    running = [
        pod for pod in lab_exclusive.engine.pods({"lab.role": "worker"}) if pod.phase == "Running"
    ]
    assert len(running) == pool, running


@pytest.mark.lab
@needs_podman
def test_throughput_scenario(lab_exclusive: Lab) -> None:
    metrics, levels = run_throughput(
        lab_exclusive, Observer(lab_exclusive.run_dir, lab_exclusive.engine)
    )

    assert [level.concurrency for level in levels] == [1, 4]
    assert all(level.ok > 0 for level in levels)
    assert levels[1].refusals > 0  # 4 clients, 2 workers, no queue: some are refused.
    assert metrics["peak_rate_per_s"].median == max(level.rate for level in levels)
    assert all(0 <= level.loadgen_cpu < 1 for level in levels)


# -- known truth: a lab of its own with the stand-in's delays set ---------------------------

TRUTH = {"first_submit_delay_ms": 1500, "reconnect_delay_ms": 400}


@pytest.fixture(scope="module")
def truth_results(
    tmp_path_factory: pytest.TempPathFactory, lab_timing_lock: Path
) -> Iterator[Results]:
    if os.environ.get("LAB_BINDER_HOME"):
        pytest.skip("known-truth checks need the stand-in, whose delays the lab sets")
    scenario = Scenario.model_validate(
        {
            "name": "known-truth",
            "binder": {"pool": {"min_pool_size": 2, "min_jobs_on_ce": 2, "max_jobs_on_ce": 2}},
            "standin": {**TRUTH, "refill_tick_ms": 500},
            "refill": {"repetitions": 3, "drain_clients": 2, "hold_s": 0.2},
            "failover": {"enabled": False},
            "throughput": {"enabled": False},
        }
    )
    runs = tmp_path_factory.mktemp("truth")
    # Measured while no interrupt storm loads the machine; the results are kept after.
    with FileLock(str(lab_timing_lock), timeout=900), Lab(scenario, runs_root=runs) as the_lab:
        results = measure(the_lab, scenario_file="inline", scenario_hash="0", started="now")
    yield results


@pytest.mark.lab
@needs_podman
def test_refill_after_release_matches_the_reconnect_delay(truth_results: Results) -> None:
    metric = truth_results.refill["drain_refill_s"]

    assert metric.n == 3, truth_results.outcomes
    truth = TRUTH["reconnect_delay_ms"] / 1000
    assert all(within_truth(value, truth) for value in metric.values), metric.values


@pytest.mark.lab
@needs_podman
def test_start_to_first_submission_matches_the_set_delay(truth_results: Results) -> None:
    metric = truth_results.refill["listening_to_first_submit_s"]

    assert metric.n == 3
    truth = TRUTH["first_submit_delay_ms"] / 1000
    assert all(within_truth(value, truth) for value in metric.values), metric.values
