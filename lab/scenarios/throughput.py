"""Client throughput: closed-loop TEST load at a sweep of concurrency levels.

The load generator runs in this process. Its CPU time over each level is recorded; a
level where it used nearly a whole core measured the generator, not the binder, and is
marked saturated (and invalid) instead of being reported as the binder's limit.
"""

from __future__ import annotations

import asyncio
import logging
import time

from lab.lab import Lab
from lab.observe.timeline import Observer
from lab.protocol.client import Success, closed_loop
from lab.report.results import Metric, ThroughputLevel, percentile
from lab.scenarios.probes import wait_ready

log = logging.getLogger(__name__)

SATURATED_CPU = 0.9  # share of one core


def run_throughput(
    lab: Lab, observer: Observer, outcomes: dict[str, str] | None = None
) -> tuple[dict[str, Metric], list[ThroughputLevel]]:
    outcomes = {} if outcomes is None else outcomes
    settings = lab.scenario.throughput
    levels: list[ThroughputLevel] = []
    size = lab.scenario.binder.pool.min_pool_size
    for concurrency in settings.concurrency:
        # Each level starts from a full pool: a job that served its last client (WorkBinder's
        # loop allows 50) leaves a gap until the binder forgets and replaces it.
        waited = wait_ready(lab, size, lab.scenario.deadlines.recovery_s)
        if waited.reached is None:
            outcomes[f"throughput.{concurrency}.start"] = (
                f"started without a full pool: {waited.last_seen}"
            )
        log.info("throughput: %d clients for %.0f s", concurrency, settings.duration_s)
        observer.note("load", f"{concurrency} clients start")
        level = measure_level(
            lab, concurrency, settings.duration_s, settings.retry_after_refusal_ms / 1000
        )
        observer.note("load", f"{concurrency} clients stop: {level.rate:.1f} ok/s")
        levels.append(level)
    valid = [lv for lv in levels if not lv.saturated]
    best = max(valid, key=lambda lv: lv.rate, default=None)
    if best is None:
        peak_note = "every level saturated"
    else:
        peak_note = f"at {best.concurrency} client{'' if best.concurrency == 1 else 's'}"
    metrics = {
        "peak_rate_per_s": Metric.of(
            [best.rate] if best else [], "1/s", better="higher", note=peak_note
        ),
    }
    # One metric per level and quantity: a gate compares like with like.
    for level in levels:
        note = "the load generator saturated" if level.saturated else ""
        at = f"c{level.concurrency}"
        metrics[f"rate_{at}_per_s"] = Metric.of(
            [level.rate], "1/s", better="higher", note=note, valid=not level.saturated
        )
        for quantile in ("p50", "p99"):
            values = [level.latency_ms[quantile]] if quantile in level.latency_ms else []
            metrics[f"latency_{quantile}_{at}_ms"] = Metric.of(
                values, "ms", note=note, valid=not level.saturated
            )
    return metrics, levels


def measure_level(lab: Lab, concurrency: int, duration: float, retry: float) -> ThroughputLevel:
    cpu_before, wall_before = time.process_time(), time.monotonic()
    outcomes = asyncio.run(
        closed_loop(
            "127.0.0.1",
            lab.binder.endpoint.port,
            clients=concurrency,
            duration=duration,
            retry_delay=retry,
            deadline=5.0,
        )
    )
    elapsed = time.monotonic() - wall_before
    cpu = (time.process_time() - cpu_before) / elapsed if elapsed > 0 else 0.0
    ok = sorted(o.latency * 1000 for o in outcomes if isinstance(o, Success))
    errors: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.KIND not in ("success", "refused"):
            errors[outcome.KIND] = errors.get(outcome.KIND, 0) + 1
    latency = {f"p{p}": percentile(ok, p) for p in (50, 95, 99)} if ok else {}
    return ThroughputLevel(
        concurrency=concurrency,
        duration_s=elapsed,
        ok=len(ok),
        rate=len(ok) / elapsed,
        latency_ms=latency,
        refusals=sum(1 for o in outcomes if o.KIND == "refused"),
        errors=errors,
        loadgen_cpu=round(cpu, 3),
        saturated=cpu >= SATURATED_CPU,
    )
