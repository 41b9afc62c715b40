"""Made-up but realistic results, for tests, demos and trying the report without a lab.

The pool timeline comes from a small simulation of a binder keeping four READY workers:
it submits jobs on a refill tick, jobs turn READY a couple of seconds later, clients bind
them, and three faults (a READY worker killed, a BUSY worker killed, the binder restarted)
knock the pool down so the refill shows.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from lab.report.results import (
    Metric,
    PoolSample,
    Results,
    RunMeta,
    ThroughputLevel,
    TimelineEvent,
)

Better = Literal["lower", "higher"]


@dataclass(frozen=True)
class SampleMetric:
    """How one sample metric is made: its typical value and its noise between repetitions."""

    unit: str
    better: Better
    typical: float
    jitter: float  # relative standard deviation of one repetition
    repetitions: int


SAMPLE_METRICS: dict[str, SampleMetric] = {
    "refill.cold_fill_s": SampleMetric("s", "lower", 6.4, 0.06, 7),
    "refill.drain_refill_s": SampleMetric("s", "lower", 3.3, 0.08, 9),
    "refill.job_submit_to_ready_s": SampleMetric("s", "lower", 2.1, 0.05, 12),
    "failover.kill_ready_recovery_s": SampleMetric("s", "lower", 4.4, 0.09, 5),
    "failover.kill_busy_recovery_s": SampleMetric("s", "lower", 5.2, 0.10, 5),
    "failover.binder_restart_pool_s": SampleMetric("s", "lower", 11.8, 0.05, 5),
    "throughput.peak_rate_per_s": SampleMetric("1/s", "higher", 178.0, 0.03, 3),
    "throughput.latency_p99_ms": SampleMetric("ms", "lower", 38.0, 0.07, 3),
}

CONCURRENCY = (1, 2, 4, 8, 16, 32)
POOL_TARGET = 4
START = datetime(2025, 1, 6, 2, 0, tzinfo=UTC)


def sample_results(
    seed: int = 0,
    *,
    run_id: str | None = None,
    scale: Mapping[str, float] | None = None,
    binder: Literal["real", "standin"] = "standin",
    engine: str = "embedded",
    scenario_hash: str = "3f9c2e1a7b44",
    saturated: bool = False,
    valid: bool = True,
) -> Results:
    """A whole run's results; `scale` multiplies the values of the named metrics.

    `saturated` makes the load generator the limit at the highest concurrency, which marks
    the throughput metrics invalid, as a real run would.
    """
    rng = random.Random(seed)
    scale = scale or {}
    levels = throughput_levels(rng, scale.get("throughput.peak_rate_per_s", 1.0), saturated)
    timeline, pool = simulate_pool(rng)

    groups: dict[str, dict[str, Metric]] = {"refill": {}, "failover": {}, "throughput": {}}
    for name, spec in SAMPLE_METRICS.items():
        group, key = name.split(".", 1)
        typical = spec.typical * scale.get(name, 1.0)
        values = [
            round(typical * max(0.2, rng.gauss(1.0, spec.jitter)), 4)
            for _ in range(spec.repetitions)
        ]
        trusted = not (saturated and group == "throughput")
        note = "" if trusted else "load generator saturated at the highest concurrency"
        groups[group][key] = Metric.of(values, spec.unit, spec.better, note=note, valid=trusted)

    started = START + timedelta(days=seed)
    meta = RunMeta(
        run_id=run_id or f"sample-{seed}",
        started=started.isoformat(),
        finished=(started + timedelta(minutes=14)).isoformat(),
        engine=engine,
        engine_version="sample",
        machine={"cpus": 2, "memory_gib": 24, "kernel": "6.1.0"},
        binder=binder,
        binder_version="6942690" if binder == "real" else "ready after 2.0 s",
        scenario_file="scenarios/nightly.yaml",
        scenario_hash=scenario_hash,
        lab_version="0.1.0",
        valid=valid,
        invalid_reasons=[] if valid else ["engine error: the kind node went NotReady"],
    )
    outcomes = {
        "failover.kill_ready": "pool back to 4 READY",
        "failover.kill_busy": "client saw a closed connection; pool back to 4 READY",
        "failover.binder_restart": "workers reconnected as new jobs; pool back to 4 READY",
    }
    return Results(
        meta=meta,
        refill=groups["refill"],
        failover=groups["failover"],
        throughput=groups["throughput"],
        throughput_levels=levels,
        outcomes=outcomes,
        timeline=timeline,
        pool=pool,
    )


def throughput_levels(rng: random.Random, scale: float, saturated: bool) -> list[ThroughputLevel]:
    """Closed-loop levels whose rate flattens as the binder's capacity is reached."""
    capacity = 200.0 * scale
    levels = []
    for concurrency in CONCURRENCY:
        rate = capacity * concurrency / (concurrency + 3.5) * rng.gauss(1.0, 0.02)
        median_ms = concurrency / rate * 1000
        cpu = rate / 420
        saturated_here = saturated and concurrency == CONCURRENCY[-1]
        levels.append(
            ThroughputLevel(
                concurrency=concurrency,
                duration_s=20.0,
                ok=int(rate * 20),
                rate=round(rate, 2),
                latency_ms={
                    "p50": round(median_ms, 2),
                    "p95": round(median_ms * 1.7, 2),
                    "p99": round(median_ms * 2.6, 2),
                },
                refusals=0 if concurrency < 16 else rng.randint(0, 4),
                errors={} if concurrency < 32 else {"timeout": rng.randint(0, 2)},
                loadgen_cpu=round(1.02 if saturated_here else cpu, 3),
                saturated=saturated_here,
            )
        )
    return levels


@dataclass
class Job:
    name: str
    state: Literal["submitted", "ready", "busy"]
    until: float  # when the current state ends on its own


def simulate_pool(rng: random.Random) -> tuple[list[TimelineEvent], list[PoolSample]]:
    """A binder keeping POOL_TARGET workers READY, with clients and three faults."""
    events: list[TimelineEvent] = []
    pool: list[PoolSample] = []
    jobs: dict[str, Job] = {}
    faults = {45.0: "kill_ready", 80.0: "kill_busy", 115.0: "binder_restart"}
    binder_back = 0.0
    counter = 0
    step = 0.25

    for tick in range(int(160 / step) + 1):
        now = round(tick * step, 2)

        for job in list(jobs.values()):
            if job.state == "submitted" and now >= job.until:
                job.state, job.until = "ready", float("inf")
                events.append(TimelineEvent(t=now, kind="ready", job=job.name))
            elif job.state == "busy" and now >= job.until:
                del jobs[job.name]
                events.append(TimelineEvent(t=now, kind="finished", job=job.name))

        if now in faults:
            binder_back = apply_fault(faults[now], now, jobs, events, binder_back)

        client_window = 20 <= now <= 140 and now >= binder_back
        ready = [job for job in jobs.values() if job.state == "ready"]
        if client_window and ready and rng.random() < 0.07:
            job = ready[0]
            job.state, job.until = "busy", now + rng.uniform(1.5, 5.0)
            events.append(TimelineEvent(t=now, kind="busy", job=job.name))

        # The binder tops the pool up on its own tick, every 3 s, once it is listening.
        if now >= max(3.0, binder_back) and now % 3 == 0:
            live = sum(job.state != "busy" for job in jobs.values())
            for _ in range(POOL_TARGET - live):
                name = f"{1736128800000 + int(now * 1000)}-{counter}"
                counter += 1
                jobs[name] = Job(name, "submitted", now + rng.lognormvariate(0.7, 0.15))
                events.append(TimelineEvent(t=now, kind="submitted", job=name))

        if tick % 2 == 0:
            states = [job.state for job in jobs.values()]
            pool.append(
                PoolSample(
                    t=now,
                    ready=states.count("ready"),
                    busy=states.count("busy"),
                    submitted=states.count("submitted"),
                )
            )

    return events, pool


def apply_fault(
    kind: str, now: float, jobs: dict[str, Job], events: list[TimelineEvent], binder_back: float
) -> float:
    """Inject one fault into the simulated pool; returns when the binder listens again."""
    if kind == "binder_restart":
        events.append(TimelineEvent(t=now, kind="fault", detail="killed the binder"))
        for name in list(jobs):
            events.append(TimelineEvent(t=now, kind="died", job=name))
        jobs.clear()
        return now + 3.0

    wanted = "ready" if kind == "kill_ready" else "busy"
    victims = [job for job in jobs.values() if job.state == wanted] or list(jobs.values())
    if victims:
        victim = victims[0]
        detail = f"killed {victim.state.upper()} worker {victim.name}"
        events.append(TimelineEvent(t=now, kind="fault", job=victim.name, detail=detail))
        del jobs[victim.name]
        events.append(TimelineEvent(t=now, kind="died", job=victim.name))
    return binder_back
