"""Pool refill: cold fill, drain and refill, and each job's way to READY."""

from __future__ import annotations

import logging
import time

from lab.lab import Lab
from lab.observe.timeline import Observer
from lab.report.results import Metric
from lab.scenarios.probes import HeldJob, wait_ready

log = logging.getLogger(__name__)


def restart_cold(lab: Lab) -> None:
    """A fresh binder with no workers: stop it, remove every worker pod."""
    lab.binder.shutdown(timeout=3.0)
    for pod in lab.binder.worker_pods():
        lab.engine.delete(pod)


def run_refill(lab: Lab, observer: Observer, outcomes: dict[str, str]) -> dict[str, Metric]:
    settings = lab.scenario.refill
    size = lab.scenario.binder.pool.min_pool_size
    deadline = lab.scenario.deadlines.pool_full_s
    cold: list[float] = []
    first_submit: list[float] = []
    drain: list[float] = []
    phases_submit_running: list[float] = []
    phases_running_ready: list[float] = []
    phases_submit_ready: list[float] = []

    for rep in range(1, settings.repetitions + 1):
        log.info("refill %d/%d: cold fill of a pool of %d", rep, settings.repetitions, size)
        restart_cold(lab)
        seen_jobs = set(observer.job_phases())
        observer.note("fault", "binder cold start")
        started = lab.binder.start(lab.scenario.deadlines.bring_up_s)
        waited = wait_ready(lab, size, deadline)
        if waited.reached is None:
            outcomes[f"refill.cold_fill.{rep}"] = (
                f"not full in {deadline:.0f} s: {waited.last_seen}"
            )
            continue
        cold.append(waited.reached - started)
        # Worker logs settle a moment after the binder counts them READY.
        time.sleep(0.2)
        fresh = {j: p for j, p in observer.job_phases().items() if j not in seen_jobs}
        submits = sorted(p.submitted for p in fresh.values() if p.submitted is not None)
        if submits:
            up = [e.t + observer.origin for e in observer.log_events() if e.kind == "binder_up"]
            listening = max((t for t in up if t <= submits[0]), default=started)
            first_submit.append(submits[0] - listening)
        for phase in fresh.values():
            if phase.submitted and phase.container_started:
                phases_submit_running.append(phase.container_started - phase.submitted)
            if phase.container_started and phase.ready:
                phases_running_ready.append(phase.ready - phase.container_started)
            if phase.submitted and phase.ready:
                phases_submit_ready.append(phase.ready - phase.submitted)

        drained = drain_and_refill(lab, observer, settings.drain_clients, settings.hold_s)
        if isinstance(drained, float):
            drain.append(drained)
        else:
            outcomes[f"refill.drain.{rep}"] = drained

    return {
        "cold_fill_s": Metric.of(cold, "s"),
        "listening_to_first_submit_s": Metric.of(first_submit, "s"),
        "drain_refill_s": Metric.of(drain, "s"),
        "job_submit_to_running_s": Metric.of(phases_submit_running, "s"),
        "job_running_to_ready_s": Metric.of(phases_running_ready, "s"),
        "job_submit_to_ready_s": Metric.of(phases_submit_ready, "s"),
    }


def drain_and_refill(lab: Lab, observer: Observer, clients: int, hold_s: float) -> float | str:
    """K clients hold K workers for hold_s, then let go: seconds until the pool is full."""
    size = lab.scenario.binder.pool.min_pool_size
    held: list[HeldJob] = []
    try:
        for _ in range(min(clients, size)):
            held.append(HeldJob(lab.binder.endpoint.port))
        observer.note("fault", f"{len(held)} clients hold workers")
        time.sleep(hold_s)
        released = [job.release() for job in held]
    finally:
        for job in held:
            job.close()
    observer.note("fault", f"{len(held)} clients let go", at=released[0] if held else None)
    waited = wait_ready(lab, size, lab.scenario.deadlines.recovery_s)
    if waited.reached is None:
        return (
            f"not refilled in {lab.scenario.deadlines.recovery_s:.0f} s after the clients "
            f"let go: {waited.last_seen}"
        )
    return waited.reached - max(released)
