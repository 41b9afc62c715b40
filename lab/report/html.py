"""report.html: one self-contained page per run, plots inlined as SVG, no network needed."""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import jinja2
import matplotlib
from markupsafe import Markup
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

from lab.report.baseline import Baseline, BaselineMetric
from lab.report.gate import GateRow, gate_verdict
from lab.report.output import write_whole
from lab.report.results import Metric, Results, ThroughputLevel, comparison_cautions

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
TEMPLATE = "report.html.j2"

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
COLOURS = {
    "ready": "#009E73",
    "busy": "#E69F00",
    "submitted": "#0072B2",
    "fault": "#D55E00",
    "run": "#0072B2",
    "reference": "#999999",
    "baseline": "#555555",
    "bound": "#CC3311",
    "p50": "#009E73",
    "p95": "#E69F00",
    "p99": "#D55E00",
}


@dataclass(frozen=True)
class Plot:
    name: str
    title: str
    caption: str
    svg: Markup


@dataclass(frozen=True)
class MetricRow:
    """One line of the metrics table, with the baseline's and the reference run's view."""

    name: str
    metric: Metric
    gate: GateRow | None
    reference: Metric | None

    @property
    def change(self) -> float | None:
        """Relative change from the reference run's median to this run's."""
        if self.reference is None or not self.reference.median or self.metric.median is None:
            return None
        return (self.metric.median - self.reference.median) / abs(self.reference.median)

    @property
    def improved(self) -> bool | None:
        change = self.change
        if change is None or change == 0:
            return None
        return (change < 0) == (self.metric.better == "lower")


def render_report(
    results: Results, *, baseline: Baseline | None = None, reference: Results | None = None
) -> str:
    """The page for one run; with a baseline it shows the gate, with a reference a comparison."""
    gate = gate_verdict(results, baseline) if baseline else None
    with plot_style():
        plots = [
            plot
            for plot in (
                pool_plot(results),
                distribution_plot(results, "refill", "Refill times", baseline, reference),
                distribution_plot(results, "failover", "Restart times", baseline, reference),
                throughput_plot(results, reference),
            )
            if plot is not None
        ]

    reference_metrics = reference.metrics() if reference else {}
    gate_rows = {row.metric: row for row in gate.rows} if gate else {}
    rows = [
        MetricRow(name, metric, gate_rows.get(name), reference_metrics.get(name))
        for name, metric in results.metrics().items()
    ]
    return (
        environment()
        .get_template(TEMPLATE)
        .render(
            results=results,
            meta=meta_items(results),
            plots=plots,
            rows=rows,
            gate=gate,
            baseline=baseline,
            reference=reference,
            cautions=comparison_cautions(reference, results) if reference else [],
            faults=[event for event in results.timeline if event.kind == "fault"],
        )
    )


def write_report(folder: Path, results: Results, *, baseline: Baseline | None = None) -> Path:
    """Write `folder/report.html` and return its path."""
    path = folder / REPORT_FILE
    write_page(path, render_report(results, baseline=baseline))
    log.info("wrote the report of run %s to %s", results.meta.run_id, path)
    return path


def write_comparison(path: Path, reference: Results, results: Results) -> Path:
    """Write a page showing `results` next to the `reference` run."""
    write_page(path, render_report(results, reference=reference))
    log.info(
        "wrote the comparison of %s with %s to %s",
        results.meta.run_id,
        reference.meta.run_id,
        path,
    )
    return path


def write_page(path: Path, html: str) -> None:
    write_whole(path, html, "the page")


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("lab.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = number
    env.filters["pct"] = percent
    return env


def number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:.4g} {unit}".strip()


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1%}"


def meta_items(results: Results) -> list[tuple[str, str]]:
    meta = results.meta
    machine = ", ".join(f"{key} {value}" for key, value in meta.machine.items())
    items = [
        ("run", meta.run_id),
        ("started", meta.started),
        ("finished", meta.finished or "—"),
        ("engine", f"{meta.engine} {meta.engine_version}".strip()),
        ("binder", f"{meta.binder} {meta.binder_version}".strip()),
        ("scenario", f"{meta.scenario_file} (hash {meta.scenario_hash})"),
        ("machine", machine or "—"),
        ("lab version", meta.lab_version or "—"),
        ("valid", "yes" if meta.valid else "NO: " + "; ".join(meta.invalid_reasons)),
    ]
    return items


def plot_style() -> AbstractContextManager[None]:
    """The look every plot shares, set for the rendering only, not for the process."""
    return matplotlib.rc_context(
        {
            "font.family": "DejaVu Sans",
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.color": "#e4e4e4",
            "grid.linewidth": 0.6,
            "legend.frameon": False,
            "svg.fonttype": "path",  # text as outlines: the page needs no font installed
            "text.parse_math": False,  # a `$` in a fault's detail is just a dollar sign
        }
    )


def new_figure(width: float, height: float) -> Figure:
    # A bare Figure, not pyplot: no global state and nothing to close afterwards.
    return Figure(figsize=(width, height), layout="constrained")


def to_svg(fig: Figure, salt: str) -> Markup:
    """Inline SVG markup; the salt keeps element ids unique across the page's plots."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    # Matplotlib writes and escapes this markup itself; run data only reaches it as text.
    return Markup(text[text.index("<svg") :])  # noqa: S704


def pool_plot(results: Results) -> Plot | None:
    """READY, BUSY and SUBMITTED jobs over time, with the faults marked."""
    if not results.pool:
        return None
    times = [sample.t for sample in results.pool]
    faults = [event for event in results.timeline if event.kind == "fault"]

    fig = new_figure(10, 3.4)
    ax = fig.add_subplot()
    # Stacked, so the top edge is every live job and no state's line hides another's.
    floor = [0] * len(times)
    for state in ("ready", "busy", "submitted"):
        top = [
            low + getattr(sample, state) for low, sample in zip(floor, results.pool, strict=True)
        ]
        ax.fill_between(
            times,
            floor,
            top,
            step="post",
            label=state.upper(),
            facecolor=COLOURS[state],
            alpha=0.8,
            linewidth=0,
        )
        floor = top
    # Numbers, not the details: a scenario's faults can be many and close together; the
    # table under the plot says what each number was.
    for number, event in enumerate(faults, start=1):
        ax.axvline(event.t, color=COLOURS["fault"], linestyle="--", linewidth=1.2)
        ax.text(
            event.t,
            1.01,
            str(number),
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            color=COLOURS["fault"],
            fontsize=8,
        )
    ax.grid(axis="x", visible=False)
    if times[-1] > times[0]:
        ax.set_xlim(times[0], times[-1])
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("jobs")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    svg = to_svg(fig, f"{results.meta.run_id}-pool")

    caption = (
        f"Jobs by state, stacked; {len(results.pool)} samples. "
        f"Dashed lines: the {len(faults)} injected fault(s), numbered as in the table below."
    )
    return Plot("pool", "Pool over time", caption, svg)


def distribution_plot(
    results: Results,
    group: str,
    title: str,
    baseline: Baseline | None,
    reference: Results | None,
) -> Plot | None:
    """One small box-and-dots panel per metric of the group, baseline bound drawn in."""
    metrics: dict[str, Metric] = getattr(results, group)
    shown = {key: metric for key, metric in metrics.items() if metric.values}
    if not shown:
        return None
    columns = min(len(shown), 3)
    rows = -(-len(shown) // columns)

    fig = new_figure(3.4 * columns, 2.7 * rows)
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax, (key, metric) in zip(axes, shown.items(), strict=False):
        name = f"{group}.{key}"
        other = getattr(reference, group).get(key) if reference else None
        expected = baseline.metrics.get(name) if baseline else None
        draw_distribution(ax, key, metric, other, expected, baseline)
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    svg = to_svg(fig, f"{results.meta.run_id}-{group}")

    caption = "Each dot is one repetition; the box spans the middle half, the bar the median."
    if baseline:
        caption += " Grey dashes: baseline median; red dots: the gate's bound."
    return Plot(group, title, caption, svg)


def draw_distribution(
    ax: Axes,
    key: str,
    metric: Metric,
    other: Metric | None,
    expected: BaselineMetric | None,
    baseline: Baseline | None,
) -> None:
    series = [("this run", metric.values, COLOURS["run"])]
    if other is not None and other.values:
        series.insert(0, ("reference", other.values, COLOURS["reference"]))
    jitter = random.Random(key)

    for position, (_, values, colour) in enumerate(series, start=1):
        ax.boxplot(
            values,
            positions=[position],
            widths=0.5,
            showfliers=False,
            medianprops={"color": colour, "linewidth": 2},
            boxprops={"color": colour},
            whiskerprops={"color": colour},
            capprops={"color": colour},
        )
        xs = [position + jitter.uniform(-0.14, 0.14) for _ in values]
        ax.scatter(xs, values, s=14, color=colour, alpha=0.75, zorder=3, linewidths=0)

    if expected is not None and baseline is not None:
        ax.axhline(expected.median, color=COLOURS["baseline"], linestyle="--", linewidth=1)
        ax.axhline(
            expected.bound(baseline.policy), color=COLOURS["bound"], linestyle=":", linewidth=1.4
        )

    ax.set_xticks(range(1, len(series) + 1), [label for label, _, _ in series])
    ax.set_xlim(0.4, len(series) + 0.6)
    ax.grid(axis="x", visible=False)
    ax.set_title(key + ("" if metric.valid else " (invalid)"))
    ax.set_ylabel(f"{metric.unit}, {metric.better} is better")


def throughput_plot(results: Results, reference: Results | None) -> Plot | None:
    """Requests per second, and latency percentiles, against client concurrency."""
    levels = sorted(results.throughput_levels, key=lambda level: level.concurrency)
    if not levels:
        return None
    others = reference.throughput_levels if reference else []

    fig = new_figure(10, 3.4)
    rate_ax, latency_ax = fig.subplots(1, 2)
    draw_rate(rate_ax, levels, sorted(others, key=lambda level: level.concurrency))
    draw_latency(latency_ax, levels)
    for ax in (rate_ax, latency_ax):
        concurrency_axis(ax, [level.concurrency for level in levels])
    svg = to_svg(fig, f"{results.meta.run_id}-throughput")

    caption = f"Closed-loop load, {levels[0].duration_s:.1f} s per concurrency level."
    return Plot("throughput", "Throughput against concurrency", caption, svg)


def draw_rate(ax: Axes, levels: list[ThroughputLevel], others: list[ThroughputLevel]) -> None:
    if others:
        ax.plot(
            [level.concurrency for level in others],
            [level.rate for level in others],
            marker="o",
            color=COLOURS["reference"],
            linestyle="--",
            label="reference",
        )
    ax.plot(
        [level.concurrency for level in levels],
        [level.rate for level in levels],
        marker="o",
        color=COLOURS["run"],
        label="this run",
    )

    saturated = [level for level in levels if level.saturated]
    if saturated:
        ax.scatter(
            [level.concurrency for level in saturated],
            [level.rate for level in saturated],
            s=90,
            facecolors="none",
            edgecolors=COLOURS["bound"],
            linewidths=1.5,
            zorder=4,
            label="load generator saturated",
        )
    ax.set_ylim(bottom=0)
    ax.set_ylabel("successful requests / s")
    ax.set_title("Throughput")
    ax.legend(loc="lower right")


def draw_latency(ax: Axes, levels: list[ThroughputLevel]) -> None:
    for pct in ("p50", "p95", "p99"):
        points = [(lv.concurrency, lv.latency_ms[pct]) for lv in levels if pct in lv.latency_ms]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", color=COLOURS[pct], label=pct)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("latency, ms")
    ax.set_title("Latency of successful requests")
    ax.legend(loc="upper left")


def concurrency_axis(ax: Axes, concurrency: Sequence[int]) -> None:
    # Concurrency levels usually double, so a log-2 axis spaces them evenly.
    if concurrency[0] > 0 and concurrency[-1] / concurrency[0] >= 8:
        ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(list(concurrency)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(value) for value in concurrency])
    ax.set_xlabel("concurrent clients")
