"""results.json: what one run measured, with enough metadata to trust or refuse it."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RESULTS_FILE = "results.json"


# A NaN or infinity in a results file compares false with every bound, so it would pass the
# gate; the lab never writes one, so a file holding one is broken.
FINITE = ConfigDict(allow_inf_nan=False)


class Metric(BaseModel):
    """One measured quantity over n repetitions."""

    model_config = FINITE

    unit: str
    better: Literal["lower", "higher"] = "lower"
    n: int = 0
    values: list[float] = Field(default_factory=list)
    median: float | None = None
    p95: float | None = None
    max: float | None = None
    min: float | None = None
    mean: float | None = None
    stdev: float | None = None
    # A metric can be measured but not trustworthy (a saturated load generator, say).
    valid: bool = True
    note: str = ""

    @classmethod
    def of(
        cls,
        values: list[float],
        unit: str,
        better: Literal["lower", "higher"] = "lower",
        note: str = "",
        valid: bool = True,
    ) -> Metric:
        if not values:
            return cls(unit=unit, better=better, n=0, note=note or "no samples", valid=False)
        ordered = sorted(values)
        return cls(
            unit=unit,
            better=better,
            n=len(values),
            values=list(values),
            median=statistics.median(ordered),
            p95=percentile(ordered, 95),
            max=ordered[-1],
            min=ordered[0],
            mean=statistics.fmean(ordered),
            stdev=statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
            note=note,
            valid=valid,
        )


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        raise ValueError("percentile of no samples")
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.4999)))
    return ordered[rank - 1]


class ThroughputLevel(BaseModel):
    """Closed-loop load at one concurrency for a set duration."""

    model_config = FINITE

    concurrency: int
    duration_s: float
    ok: int
    rate: float  # successful requests per second
    latency_ms: dict[str, float]  # p50, p95, p99 of successful requests
    refusals: int
    errors: dict[str, int] = Field(default_factory=dict)  # by kind
    loadgen_cpu: float  # share of one core the load generator used, 0..1+
    saturated: bool = False  # the load generator, not the binder, was the limit


class TimelineEvent(BaseModel):
    t: float  # seconds since the run's start, monotonic clock
    kind: str  # submitted, started, ready, busy, reusable, finished, died, refused, fault
    job: str = ""
    detail: str = ""


class PoolSample(BaseModel):
    t: float
    ready: int
    busy: int
    submitted: int


class RunMeta(BaseModel):
    run_id: str
    started: str  # ISO 8601, UTC
    finished: str = ""
    engine: str
    engine_version: str = ""
    machine: dict[str, str | int | float] = Field(default_factory=dict)
    binder: Literal["real", "standin"]
    binder_version: str = ""  # the worker image's content hash: the binder inside
    scenario_file: str
    scenario_hash: str
    lab_version: str = ""
    valid: bool = True
    invalid_reasons: list[str] = Field(default_factory=list)


class Results(BaseModel):
    """Everything one run wrote; the gate and the report read only this."""

    meta: RunMeta
    refill: dict[str, Metric] = Field(default_factory=dict)
    failover: dict[str, Metric] = Field(default_factory=dict)
    throughput: dict[str, Metric] = Field(default_factory=dict)
    throughput_levels: list[ThroughputLevel] = Field(default_factory=list)
    outcomes: dict[str, str] = Field(default_factory=dict)  # e.g. "failover.kill_ready": "..."
    timeline: list[TimelineEvent] = Field(default_factory=list)
    pool: list[PoolSample] = Field(default_factory=list)

    def metrics(self) -> dict[str, Metric]:
        """Every metric under its dotted name, e.g. refill.cold_fill_s."""
        named: dict[str, Metric] = {}
        for group in ("refill", "failover", "throughput"):
            for key, metric in getattr(self, group).items():
                named[f"{group}.{key}"] = metric
        return named

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / RESULTS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, path: Path) -> Results:
        if path.is_dir():
            path = path / RESULTS_FILE
        return cls.model_validate(json.loads(path.read_text()))


def comparison_cautions(reference: Results, results: Results) -> list[str]:
    """Why two runs' numbers may differ for reasons other than the change under test.

    A comparison still shows them side by side: an operator comparing the stand-in with the
    real binder may mean to, but must not be able to miss that this is what they compare.
    """
    a, b = reference.meta, results.meta
    cautions = []
    if a.binder != b.binder:
        cautions.append(
            f"{a.run_id} ran the {binder_name(a.binder)}, {b.run_id} the {binder_name(b.binder)}"
        )
    elif a.binder_version != b.binder_version:
        cautions.append(f"the two runs ran different {binder_name(a.binder)} builds or settings")
    if a.scenario_hash != b.scenario_hash:
        cautions.append(
            f"the two runs ran different scenarios ({a.scenario_hash} against {b.scenario_hash})"
        )
    if a.engine != b.engine:
        cautions.append(f"{a.run_id} ran on {a.engine}, {b.run_id} on {b.engine}")
    return cautions


def binder_name(binder: str) -> str:
    return "stand-in" if binder == "standin" else "real WorkBinder"
