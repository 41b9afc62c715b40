"""The regression gate: a run's medians against a baseline's bounds.

A run whose environment failed is INVALID, never a regression: its numbers say nothing
about the binder. Only a valid run, comparable with the baseline, can pass or regress.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from lab.report.baseline import Baseline, GatePolicy
from lab.report.results import Results
from lab.report.runs import load_results, run_dir

EXIT_PASS = 0
EXIT_REGRESSION = 1
EXIT_INVALID = 2
# A missing run, a broken results.json or a baseline of the wrong shape: neither verdict.
EXIT_BAD_INPUT = 3

Status = Literal["pass", "regression", "invalid"]
Verdict = Literal["pass", "fail", "invalid", "missing", "not gated"]


class GateRow(BaseModel):
    """One metric's comparison; `bound` is None for metrics the baseline does not know."""

    metric: str
    unit: str
    better: Literal["lower", "higher"]
    baseline: float | None
    spread: float | None
    now: float | None
    bound: float | None
    verdict: Verdict
    note: str = ""

    @property
    def change(self) -> float | None:
        """Relative change of the run's median from the baseline's, e.g. 0.2 for 20 % more."""
        if self.now is None or not self.baseline:
            return None
        return (self.now - self.baseline) / abs(self.baseline)


class GateReport(BaseModel):
    run_id: str
    status: Status
    reasons: list[str] = Field(default_factory=list)  # why the run is invalid
    rows: list[GateRow] = Field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"pass": EXIT_PASS, "regression": EXIT_REGRESSION, "invalid": EXIT_INVALID}[
            self.status
        ]

    @property
    def regressions(self) -> list[GateRow]:
        return [row for row in self.rows if row.verdict == "fail"]

    def headline(self) -> str:
        """The verdict in one line, for a terminal or a CI log."""
        if self.status == "invalid":
            return f"run {self.run_id} is INVALID, not judged: {self.reasons[0]}" + (
                f" (and {len(self.reasons) - 1} more)" if len(self.reasons) > 1 else ""
            )
        if self.status == "regression":
            names = ", ".join(row.metric for row in self.regressions)
            return f"run {self.run_id} REGRESSED on {names}"
        judged = sum(row.verdict == "pass" for row in self.rows)
        return f"run {self.run_id} passed the gate on {judged} metrics"

    def lines(self) -> list[str]:
        """Plain-text lines: the headline, then one per metric."""
        out = [self.headline()]
        out += [f"  invalid because: {reason}" for reason in self.reasons[1:]]
        for row in self.rows:
            out.append(
                f"  {row.verdict:>9}  {row.metric}: now {fmt(row.now, row.unit)}, "
                f"baseline {fmt(row.baseline, row.unit)}, bound {bound_text(row)}"
                + (f" ({row.note})" if row.note else "")
            )
        return out


def gate_verdict(
    results: Results, baseline: Baseline, policy: GatePolicy | None = None
) -> GateReport:
    """Judge one run against a baseline; the baseline's own policy unless one is given."""
    policy = policy or baseline.policy
    reasons = environment_problems(results, baseline)
    metrics = results.metrics()
    rows: list[GateRow] = []

    for name, expected in baseline.metrics.items():
        measured = metrics.get(name)
        bound = expected.bound(policy)
        row = GateRow(
            metric=name,
            unit=expected.unit,
            better=expected.better,
            baseline=expected.median,
            spread=expected.spread,
            now=measured.median if measured else None,
            bound=bound,
            verdict="pass",
        )
        if not policy.gated(name):
            row.verdict, row.note = "not gated", "shown only (the policy's shown_only)"
        elif measured is None or measured.median is None:
            row.verdict, row.note = "missing", "the run did not measure it"
            reasons.append(f"{name} was not measured")
        elif not measured.valid:
            row.verdict, row.note = "invalid", measured.note or "measurement marked invalid"
            reasons.append(f"{name}: {row.note}")
        elif (measured.unit, measured.better) != (expected.unit, expected.better):
            row.verdict, row.note = "invalid", f"unit {measured.unit}, {measured.better} is better"
            reasons.append(f"{name} changed unit or direction since the baseline")
        elif worse_than(measured.median, bound, expected.better):
            row.verdict = "fail"
        rows.append(row)

    for name, measured in metrics.items():
        if name not in baseline.metrics:
            rows.append(
                GateRow(
                    metric=name,
                    unit=measured.unit,
                    better=measured.better,
                    baseline=None,
                    spread=None,
                    now=measured.median,
                    bound=None,
                    verdict="not gated",
                    note="not in the baseline",
                )
            )

    status: Status = "invalid" if reasons else "regression" if any_fail(rows) else "pass"
    return GateReport(run_id=results.meta.run_id, status=status, reasons=reasons, rows=rows)


def environment_problems(results: Results, baseline: Baseline) -> list[str]:
    """Why this run cannot be compared with this baseline at all."""
    meta = results.meta
    problems = list(meta.invalid_reasons)
    if not meta.valid and not problems:
        problems.append("the run marked itself invalid")

    if meta.binder != baseline.binder:
        problems.append(f"binder is {meta.binder} but the baseline's is {baseline.binder}")
    if meta.scenario_hash != baseline.scenario_hash:
        problems.append(
            f"scenario hash {meta.scenario_hash} differs from the baseline's "
            f"{baseline.scenario_hash}: the scenario changed, make a new baseline"
        )
    if meta.engine != baseline.engine:
        problems.append(f"engine is {meta.engine} but the baseline's is {baseline.engine}")

    return problems


def worse_than(value: float, bound: float, better: Literal["lower", "higher"]) -> bool:
    return value > bound if better == "lower" else value < bound


def any_fail(rows: Sequence[GateRow]) -> bool:
    return any(row.verdict == "fail" for row in rows)


def fmt(value: float | None, unit: str) -> str:
    """A number with about four significant digits and its unit."""
    if value is None:
        return "—"
    return f"{value:.4g} {unit}".strip()


def bound_text(row: GateRow) -> str:
    if row.bound is None:
        return "—"
    sign = "≤" if row.better == "lower" else "≥"
    return f"{sign} {fmt(row.bound, row.unit)}"


class LineWriter(Protocol):
    """What pytest's terminal reporter offers; any object with these two methods will do."""

    def write_sep(self, sep: str, title: str) -> object: ...

    def write_line(self, line: str) -> object: ...


def pytest_gate_summary(
    writer: LineWriter, runs: Sequence[Path | Results], baseline_file: Path
) -> int:
    """Gate every run of a test session and write a summary section; returns the exit code.

    The worst verdict wins: any invalid run gives EXIT_INVALID, else any regression gives
    EXIT_REGRESSION. With no runs at all there is nothing to judge and the result is a pass.
    """
    baseline = Baseline.read(baseline_file)
    writer.write_sep("=", f"lab gate against {baseline_file}")
    worst = EXIT_PASS
    for run in runs:
        results = run if isinstance(run, Results) else load_results(run_dir(run))
        report = gate_verdict(results, baseline)
        for line in report.lines():
            writer.write_line(line)
        worst = max(worst, report.exit_code)
    if not runs:
        writer.write_line("no lab runs in this session: nothing to gate")
    return worst
