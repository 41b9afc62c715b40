"""A baseline: what normal looks like, as the median and spread of several runs' medians.

The spread reads like a standard deviation of one run's median, and errs on the wide side:
a gate that sits inside the noise fails unchanged code, and then nobody believes it. It is
the larger of two estimates. Between runs: not the runs' standard deviation itself, which
five runs that happen to agree understate, but its upper 90 % confidence limit, the largest
noise that runs agreeing this well are still consistent with; it shrinks as runs are added.
Within runs: the standard error of a median of the run's repetitions.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from statistics import NormalDist
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, ValidationError

from lab.errors import BaselineError
from lab.report.output import write_whole
from lab.report.results import Metric, Results
from lab.report.runs import first_problem

log = logging.getLogger(__name__)

BaselineFormat = Literal["workbinder-lab/baseline/1"]
BASELINE_FORMAT: BaselineFormat = "workbinder-lab/baseline/1"
MIN_RUNS = 5
# How sure the between-runs spread is not an understatement of the noise.
SPREAD_CONFIDENCE = 0.90
# The standard error of a sample median is about 1.2533 σ/√n for normal noise.
MEDIAN_SE = 1.2533

# Below these a difference is noise whatever the runs' spread says: timer resolution, a
# scheduler tick on a two-core machine, one request more or less in a closed loop.
ABSOLUTE_FLOORS: dict[str, float] = {
    "s": 0.05,
    "ms": 2.0,
    "us": 200.0,
    "req/s": 2.0,
    "1/s": 2.0,
    "count": 1.0,
    "jobs": 1.0,
    "%": 1.0,
    "ratio": 0.01,
}


class GatePolicy(BaseModel):
    """How far from the baseline a run may be before the gate calls it a regression."""

    # Teams edit this part of the file by hand: a misspelt key must not pass unnoticed.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    spread_factor: NonNegativeFloat = 3.5
    relative_floor: NonNegativeFloat = 0.10
    absolute_floors: dict[str, NonNegativeFloat] = Field(
        default_factory=lambda: dict(ABSOLUTE_FLOORS)
    )
    # Metrics shown beside the gate but not judged (shell-style patterns). Latency
    # percentiles of one load level swing several-fold between identical runs on a shared
    # machine; the request rates at the same levels are gated instead.
    shown_only: list[str] = Field(default_factory=lambda: ["throughput.latency_*"])

    def gated(self, metric: str) -> bool:
        return not any(fnmatch.fnmatchcase(metric, pattern) for pattern in self.shown_only)

    def margin(self, median: float, spread: float, unit: str) -> float:
        """The allowed distance from the baseline median, never below the noise floors."""
        return max(
            self.spread_factor * spread,
            self.relative_floor * abs(median),
            self.absolute_floors.get(unit, 0.0),
        )


class BaselineMetric(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    unit: str
    better: Literal["lower", "higher"]
    median: float  # the median of the runs' medians
    spread: float  # the larger of the two below: what the gate scales its margin by
    between_runs: float = 0.0  # upper confidence limit of the runs' medians' deviation
    within_run: float = 0.0  # typical standard error of one run's median
    medians: list[float]  # one per run that measured this metric validly

    def bound(self, policy: GatePolicy) -> float:
        """The worst value that still passes: above the median for lower-is-better metrics."""
        margin = policy.margin(self.median, self.spread, self.unit)
        return self.median + margin if self.better == "lower" else self.median - margin

    def smallest_visible_change(self, policy: GatePolicy) -> float:
        """The smallest change the gate can see, as a fraction of the median: its margin."""
        if not self.median:
            return math.inf
        return policy.margin(self.median, self.spread, self.unit) / abs(self.median)


class Baseline(BaseModel):
    """The file `lab baseline` writes and `lab gate` reads."""

    format: BaselineFormat
    created: str
    runs: list[str]
    engine: str
    binder: Literal["real", "standin"]
    binder_version: str = ""
    scenario_file: str
    scenario_hash: str
    policy: GatePolicy = Field(default_factory=GatePolicy)
    metrics: dict[str, BaselineMetric]

    def write(self, path: Path) -> Path:
        return write_whole(path, self.model_dump_json(indent=2) + "\n", "the baseline")

    @classmethod
    def read(cls, path: Path) -> Baseline:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise BaselineError(
                f"cannot read baseline {path} ({exc.strerror}): "
                "make one with `lab baseline RUN...` or fix the path"
            ) from exc
        except UnicodeDecodeError as exc:
            raise BaselineError(
                f"{path} is not a baseline file (not UTF-8 text at byte {exc.start}): "
                "give the file `lab baseline` wrote"
            ) from exc

        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BaselineError(
                f"{path} is not JSON ({exc.msg}, line {exc.lineno}): "
                "make it again with `lab baseline RUN...`"
            ) from exc
        if not isinstance(raw, dict) or raw.get("format") != BASELINE_FORMAT:
            raise BaselineError(
                f"{path} is not a baseline file (no format {BASELINE_FORMAT!r}): "
                "give the file `lab baseline` wrote, not a run's results.json"
            )

        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise BaselineError(
                f"{path} is not a valid baseline ({first_problem(exc)}): "
                "make it again with `lab baseline RUN...`"
            ) from exc


def make_baseline(runs: Sequence[Results], policy: GatePolicy | None = None) -> Baseline:
    """A baseline from at least MIN_RUNS valid runs of one scenario on one environment."""
    if len(runs) < MIN_RUNS:
        raise BaselineError(
            f"a baseline needs at least {MIN_RUNS} runs, got {len(runs)}: "
            f"run the scenario {MIN_RUNS - len(runs)} more time(s) and pass every run"
        )
    check_runs_agree(runs)

    metrics: dict[str, BaselineMetric] = {}
    names = sorted({name for run in runs for name in run.metrics()})
    for name in names:
        metric = summarize(name, runs)
        if metric is not None:
            metrics[name] = metric
    if not metrics:
        raise BaselineError(
            f"no metric was measured validly in {MIN_RUNS} or more of the runs: "
            "check the runs' reports for saturated or missing measurements"
        )

    first = runs[0].meta
    return Baseline(
        format=BASELINE_FORMAT,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        runs=[run.meta.run_id for run in runs],
        engine=first.engine,
        binder=first.binder,
        binder_version=first.binder_version,
        scenario_file=first.scenario_file,
        scenario_hash=first.scenario_hash,
        policy=policy or GatePolicy(),
        metrics=metrics,
    )


def check_runs_agree(runs: Sequence[Results]) -> None:
    """Refuse invalid runs and runs of different scenarios, binders or engines."""
    ids = [run.meta.run_id for run in runs]
    twice = sorted({run_id for run_id in ids if ids.count(run_id) > 1})
    if twice:
        raise BaselineError(
            f"run {', '.join(twice)} given more than once: pass each run once, "
            f"{MIN_RUNS} or more different runs"
        )

    for run in runs:
        if not run.meta.valid or run.meta.invalid_reasons:
            reasons = "; ".join(run.meta.invalid_reasons) or "marked invalid"
            raise BaselineError(
                f"run {run.meta.run_id} is invalid ({reasons}): leave it out of the baseline"
            )

    first = runs[0].meta
    for run in runs[1:]:
        for field in ("scenario_hash", "binder", "engine"):
            mine, theirs = getattr(run.meta, field), getattr(first, field)
            if mine != theirs:
                raise BaselineError(
                    f"run {run.meta.run_id} has {field} {mine!r} but run {first.run_id} has "
                    f"{theirs!r}: a baseline takes runs of one scenario on one environment"
                )


def summarize(name: str, runs: Sequence[Results]) -> BaselineMetric | None:
    """One metric's baseline, or None when too few runs measured it validly."""
    measured = [run.metrics()[name] for run in runs if name in run.metrics()]
    usable = [metric for metric in measured if metric.valid and metric.median is not None]
    if len(usable) < MIN_RUNS:
        log.warning(
            "%s left out of the baseline: valid in %d of %d runs, needs %d",
            name,
            len(usable),
            len(runs),
            MIN_RUNS,
        )
        return None

    kinds = {(metric.unit, metric.better) for metric in usable}
    if len(kinds) > 1:
        raise BaselineError(
            f"metric {name} has different units or directions across runs ({sorted(kinds)}): "
            "make the baseline from runs of one lab version"
        )

    medians = [metric.median for metric in usable if metric.median is not None]
    centre = statistics.median(medians)
    between = deviation_upper_limit(medians)
    within = statistics.median(median_error(metric) for metric in usable)
    return BaselineMetric(
        unit=usable[0].unit,
        better=usable[0].better,
        median=centre,
        spread=max(between, within),
        between_runs=between,
        within_run=within,
        medians=medians,
    )


def median_error(metric: Metric) -> float:
    """The standard error of the metric's median over its repetitions; 0 for one sample."""
    if metric.n < 2 or not metric.stdev:
        return 0.0
    return MEDIAN_SE * metric.stdev / math.sqrt(metric.n)


def deviation_upper_limit(values: Sequence[float], confidence: float = SPREAD_CONFIDENCE) -> float:
    """The upper `confidence` limit of the standard deviation the values were drawn with.

    For n normal samples, (n - 1) s² / σ² follows a χ² law with n - 1 degrees of freedom;
    its lower quantile, here by the Wilson-Hilferty approximation (within 0.2 % from five
    runs up), turns the sample's s into the largest σ still consistent with it.
    """
    if len(values) < 2:
        return 0.0
    freedom = len(values) - 1
    z = NormalDist().inv_cdf(1 - confidence)
    term = 2 / (9 * freedom)
    chi2_low = freedom * (1 - term + z * math.sqrt(term)) ** 3
    return statistics.stdev(values) * math.sqrt(freedom / chi2_low)
