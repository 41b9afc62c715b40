"""Failover: a READY worker killed, a BUSY worker killed mid-request, the binder restarted.

A recovery that does not come before the scenario's deadline is a result, written down
with what was last seen, not a crash of the run.
"""

from __future__ import annotations

import asyncio
import logging
import time

from lab.binder.submit_hook import job_pod_name
from lab.errors import LabError, WireError
from lab.lab import Lab
from lab.observe.timeline import Observer
from lab.protocol.client import JobOutcome, test_job
from lab.report.results import Metric
from lab.scenarios.probes import HeldJob, wait_answering, wait_ready

log = logging.getLogger(__name__)


def _pod_of(lab: Lab, job: str) -> str:
    return job_pod_name(job, str(lab.engine.hook_target().get("name_prefix", "")))


def run_failover(lab: Lab, observer: Observer, outcomes: dict[str, str]) -> dict[str, Metric]:
    settings = lab.scenario.failover
    metrics: dict[str, list[float]] = {
        "kill_ready_recovery_s": [],
        "kill_busy_recovery_s": [],
        "binder_restart_answer_s": [],
        "binder_restart_pool_s": [],
    }
    for rep in range(1, settings.repetitions + 1):
        _settle(lab)
        if settings.kill_ready:
            log.info("failover %d/%d: killing a READY worker", rep, settings.repetitions)
            result = kill_ready(lab, observer)
            _record(
                metrics["kill_ready_recovery_s"], outcomes, f"failover.kill_ready.{rep}", result
            )
            _settle(lab)
        if settings.kill_busy:
            log.info("failover %d/%d: killing a BUSY worker mid-request", rep, settings.repetitions)
            result = kill_busy(lab, observer, outcomes, rep)
            _record(metrics["kill_busy_recovery_s"], outcomes, f"failover.kill_busy.{rep}", result)
            _settle(lab)
        if settings.restart_binder:
            log.info("failover %d/%d: killing and restarting the binder", rep, settings.repetitions)
            answer, pool = restart_binder(lab, observer, outcomes, rep)
            _record(
                metrics["binder_restart_answer_s"],
                outcomes,
                f"failover.binder_answer.{rep}",
                answer,
            )
            _record(metrics["binder_restart_pool_s"], outcomes, f"failover.binder_pool.{rep}", pool)
    return {name: Metric.of(values, "s") for name, values in metrics.items()}


def _record(values: list[float], outcomes: dict[str, str], key: str, result: float | str) -> None:
    if isinstance(result, float):
        values.append(result)
    else:
        outcomes[key] = result


def _settle(lab: Lab) -> None:
    """Start each fault from a full pool; a binder left broken is restarted first."""
    size = lab.scenario.binder.pool.min_pool_size
    if wait_ready(lab, size, lab.scenario.deadlines.recovery_s).reached is None:
        log.info("the pool did not come back; restarting the binder cold before going on")
        lab.binder.shutdown(timeout=3.0)
        for pod in lab.binder.worker_pods():
            lab.engine.delete(pod)
        lab.binder.start(lab.scenario.deadlines.bring_up_s)
        wait_ready(lab, size, lab.scenario.deadlines.pool_full_s)


def kill_ready(lab: Lab, observer: Observer) -> float | str:
    """Kill an idle worker while light client traffic goes on, as in real use.

    WorkBinder notices a dead READY worker only when a client is matched to it, and it
    always offers the first READY job of its table. So each second the probe sends as many
    requests at once as the pool holds: every READY entry, the dead one too, meets a client.

    The pool is whole again when the binder adds a new job: it adds none while the dead
    entry holds its place. That moment comes from the binder's log. Worker logs cannot give
    it: the probes keep the workers cycling through BUSY, and a worker's log shows READY
    only between two of its clients.
    """
    # Worker logs outlive their pods: a worker of the previous binder, removed after its
    # restart, may hold the newest READY line. Only a running pod can be killed.
    running = lab.binder.running_worker_pods()
    ready = {j: t for j, t in observer.ready_times().items() if _pod_of(lab, j) in running}
    if not ready:
        return "no running READY worker to kill"
    job = max(ready, key=lambda j: ready[j])
    killed_at = time.monotonic()
    try:
        lab.engine.kill(_pod_of(lab, job))
    except LabError as exc:
        return f"could not kill job {job}: {exc}"
    observer.note("fault", f"killed READY worker {job}", job=job, at=killed_at)
    deadline = killed_at + lab.scenario.deadlines.recovery_s
    seen: dict[str, int] = {}
    size = lab.scenario.binder.pool.min_pool_size
    while time.monotonic() < deadline:
        for outcome in asyncio.run(_probe_round(lab.binder.endpoint.port, size)):
            seen[outcome.KIND] = seen.get(outcome.KIND, 0) + 1
            if outcome.KIND not in ("success", "refused"):
                observer.note(outcome.KIND, "probe after killing a READY worker")
        replaced = observer.first_logged("ready", after=killed_at)
        if replaced is not None:
            # Confirmed by the binder's own count, with no probe in flight.
            waited = wait_ready(lab, size, max(0.1, deadline - time.monotonic()))
            if waited.reached is not None:
                return replaced - killed_at
            return (
                f"a new job joined {replaced - killed_at:.1f} s after the kill, but the pool "
                f"was not full again in {lab.scenario.deadlines.recovery_s:.0f} s: "
                f"{waited.last_seen}"
            )
        time.sleep(1.0)
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(seen.items()))
    return (
        f"not recovered in {lab.scenario.deadlines.recovery_s:.0f} s: no replacement job "
        f"READY; probes: {summary}"
    )


async def _probe_round(port: int, clients: int) -> list[JobOutcome]:
    return list(
        await asyncio.gather(
            *(test_job("127.0.0.1", port, ("probe",), deadline=5.0) for _ in range(clients))
        )
    )


def kill_busy(lab: Lab, observer: Observer, outcomes: dict[str, str], rep: int) -> float | str:
    """Kill the worker serving a request; note what the client saw."""
    try:
        held = HeldJob(lab.binder.endpoint.port)
    except LabError as exc:
        return str(exc)
    held.ball("before")
    killed_at = time.monotonic()
    try:
        lab.engine.kill(_pod_of(lab, held.job_id))
    except LabError as exc:
        held.close()
        return f"could not kill job {held.job_id}: {exc}"
    observer.note("fault", f"killed BUSY worker {held.job_id}", job=held.job_id, at=killed_at)
    try:
        held.sock.settimeout(5.0)
        reply = held.ball("after")
        seen = f"got a reply after the kill: {reply!r}"
    except (OSError, WireError) as exc:
        seen = f"{type(exc).__name__} {time.monotonic() - killed_at:.3f} s after the kill"
    finally:
        held.close()
    outcomes[f"failover.kill_busy.{rep}.client_saw"] = seen
    waited = wait_ready(
        lab, lab.scenario.binder.pool.min_pool_size, lab.scenario.deadlines.recovery_s
    )
    if waited.reached is None:
        return f"not recovered in {lab.scenario.deadlines.recovery_s:.0f} s: {waited.last_seen}"
    return waited.reached - killed_at


def restart_binder(
    lab: Lab, observer: Observer, outcomes: dict[str, str], rep: int
) -> tuple[float | str, float | str]:
    """SIGKILL the binder, start a new one at once: when does it answer, when is it full?"""
    # Only running pods: the exited pods of earlier faults would swell the count.
    before = lab.binder.running_worker_pods()
    killed_at = time.monotonic()
    lab.binder.kill()
    observer.note("fault", "killed the binder", at=killed_at)
    lab.binder.remove_pod()
    # Measured from the new binder's start: removing the old pod is the lab's own work.
    restarted = lab.binder.start_pod()
    answered = wait_answering(lab, lab.scenario.deadlines.recovery_s)
    answer: float | str = (
        answered.reached - restarted
        if answered.reached is not None
        else f"no answer in {lab.scenario.deadlines.recovery_s:.0f} s: {answered.last_seen}"
    )
    waited = wait_ready(
        lab, lab.scenario.binder.pool.min_pool_size, lab.scenario.deadlines.recovery_s
    )
    pool: float | str = (
        waited.reached - restarted
        if waited.reached is not None
        else f"not full in {lab.scenario.deadlines.recovery_s:.0f} s: {waited.last_seen}"
    )
    orphans = sorted(before & lab.binder.running_worker_pods())
    outcomes[f"failover.binder_restart.{rep}.old_workers"] = (
        f"{len(orphans)} of {len(before)} worker pods from before the kill still running "
        f"when the pool was back"
    )
    # The new binder refuses the old jobs, and their loops keep reconnecting until their runs
    # are used up: with many runs, for the rest of the suite. That storm is part of this
    # fault's recovery, measured above, but not of the measurements that follow.
    for pod in orphans:
        lab.engine.delete(pod)
    return answer, pool
