"""Running a scenario suite: bring the lab up, measure, write results.json, summarize."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

import lab as lab_package
from lab.errors import LabError
from lab.lab import Lab
from lab.observe.timeline import Observer
from lab.proc import run
from lab.report.html import write_report
from lab.report.results import Metric, Results, RunMeta, ThroughputLevel
from lab.scenarios.failover import run_failover
from lab.scenarios.refill import run_refill
from lab.scenarios.schema import Scenario
from lab.scenarios.throughput import run_throughput

log = logging.getLogger(__name__)


def run_suite(
    scenario: Scenario,
    *,
    scenario_file: str,
    scenario_hash: str,
    binder_home: Path | None,
    engine: str | None = None,
    runs_root: Path = Path(".lab/runs"),
    reports_root: Path = Path("reports"),
    keep: bool = False,
) -> tuple[Results, Path]:
    """Run every enabled scenario of the suite on a fresh lab; return results and their path."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    with Lab(
        scenario, binder_home=binder_home, engine=engine, runs_root=runs_root, keep=keep
    ) as the_lab:
        results = measure(
            the_lab, scenario_file=scenario_file, scenario_hash=scenario_hash, started=started
        )
        report_dir = reports_root / the_lab.run_id
        path = results.write(report_dir)
        keep_artifacts(the_lab.run_dir, report_dir)
        write_report(report_dir, results)
    return results, path


def measure(lab: Lab, *, scenario_file: str, scenario_hash: str, started: str) -> Results:
    """Bring the lab up and run each enabled scenario on it."""
    observer = Observer(lab.run_dir, lab.engine)
    outcomes: dict[str, str] = {}
    meta = RunMeta(
        run_id=lab.run_id,
        started=started,
        engine=lab.engine.name,
        engine_version=engine_version(lab.engine.name),
        machine=machine(),
        binder="real" if lab.binder.kind == "real" else "standin",
        scenario_file=scenario_file,
        scenario_hash=scenario_hash,
        lab_version=lab_package.__version__,
    )
    refill: dict[str, Metric] = {}
    failover: dict[str, Metric] = {}
    throughput: dict[str, Metric] = {}
    levels: list[ThroughputLevel] = []
    try:
        lab.up()
        meta.binder_version = lab.binder.image_hash
        refill["bring_up_pool_full_s"] = Metric.of([lab.times.pool_full], "s")
        if lab.scenario.refill.enabled:
            refill.update(run_refill(lab, observer, outcomes))
        if lab.scenario.failover.enabled:
            failover = run_failover(lab, observer, outcomes)
        if lab.scenario.throughput.enabled:
            throughput, levels = run_throughput(lab, observer, outcomes)
    except LabError as exc:
        # The environment failed: the run is invalid, and says why, but its data is kept.
        meta.valid = False
        meta.invalid_reasons.append(str(exc))
        log.debug("run %s is invalid: %s", lab.run_id, exc)
    if any(level.saturated for level in levels):
        meta.invalid_reasons.append("the load generator saturated at some levels (marked)")
    meta.finished = datetime.now(UTC).isoformat(timespec="seconds")
    events = observer.timeline()
    return Results(
        meta=meta,
        refill=refill,
        failover=failover,
        throughput=throughput,
        throughput_levels=levels,
        outcomes=outcomes,
        timeline=events,
        pool=observer.pool(events),
    )


def keep_artifacts(run_dir: Path, report_dir: Path) -> None:
    """Copy the run's logs next to its results: the binder's, the hook's, the workers'."""
    source = run_dir / "logs"
    if source.is_dir():
        shutil.copytree(source, report_dir / "logs", dirs_exist_ok=True)


def engine_version(name: str) -> str:
    tool = {"podman": "podman", "kind": "kind", "vbox": "VBoxManage"}.get(name, name)
    try:
        return run([tool, "--version"], check=False, timeout=20).stdout.strip()[:80]
    except LabError:
        return "unknown"


def machine() -> dict[str, str | int | float]:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count() or 0,
        "memory_gib": round(pages / 2**30, 1),
        "python": platform.python_version(),
    }


def summary_table(results: Results) -> Table:
    meta = results.meta
    title = f"run {meta.run_id}: {meta.binder} binder on {meta.engine}"
    if not meta.valid:
        title += " (INVALID: see below)"
    table = Table(title=title)
    for column in ("metric", "n", "median", "p95", "max", "unit"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for name, metric in results.metrics().items():
        table.add_row(
            name,
            str(metric.n),
            _fmt(metric.median),
            _fmt(metric.p95),
            _fmt(metric.max),
            metric.unit,
        )
    return table


def levels_table(results: Results) -> Table:
    table = Table(title="throughput by concurrency")
    for column in (
        "clients",
        "ok/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "refused",
        "errors",
        "loadgen cpu",
    ):
        table.add_column(column, justify="right")
    for level in results.throughput_levels:
        errors = ", ".join(f"{k} {v}" for k, v in level.errors.items()) or "0"
        table.add_row(
            str(level.concurrency),
            f"{level.rate:.1f}",
            _fmt(level.latency_ms.get("p50")),
            _fmt(level.latency_ms.get("p95")),
            _fmt(level.latency_ms.get("p99")),
            str(level.refusals),
            errors,
            f"{level.loadgen_cpu:.0%}{' SATURATED' if level.saturated else ''}",
        )
    return table


def print_summary(results: Results, path: Path, console: Console) -> None:
    if not results.metrics():
        # Nothing was measured; the reason comes as the command's one error line.
        console.print(f"results: {path}", highlight=False)
        return
    console.print(summary_table(results))
    if results.throughput_levels:
        console.print(levels_table(results))
    for key, outcome in sorted(results.outcomes.items()):
        console.print(f"  {key}: {outcome}", highlight=False)
    console.print(f"results: {path}", highlight=False)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def elapsed_since(start: float) -> str:
    return f"{time.monotonic() - start:.0f} s"
