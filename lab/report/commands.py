"""`lab report`, `lab baseline` and `lab gate`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from lab.errors import LabError
from lab.report.baseline import Baseline, make_baseline
from lab.report.gate import EXIT_BAD_INPUT, GateReport, bound_text, fmt, gate_verdict
from lab.report.html import write_comparison, write_report
from lab.report.output import write_whole
from lab.report.results import Metric, Results, comparison_cautions
from lab.report.runs import load_results, newest_run, run_dir

# Off a terminal (a CI log) rich would wrap at 80 columns and cut metric names short.
out = Console(
    highlight=False,
    width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120,
)
err = Console(stderr=True, highlight=False)

VERDICT_STYLE = {
    "pass": "green",
    "fail": "bold red",
    "invalid": "yellow",
    "missing": "yellow",
    "not gated": "dim",
}
# At this margin a time may grow by half, or a rate halve, and still pass the gate.
BLIND = 0.5
STATUS_STYLE = {"pass": "bold green", "regression": "bold red", "invalid": "bold yellow"}


def pick_run(ref: str | None) -> Path:
    return run_dir(ref) if ref else newest_run()


@click.command()
@click.argument("run", required=False)
@click.option(
    "--baseline",
    "baseline_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Show the gate's verdict against this baseline in the page.",
)
@click.option(
    "--compare",
    nargs=2,
    metavar="RUN_A RUN_B",
    help="Print how RUN_B differs from RUN_A instead of writing a run's report.",
)
@click.option(
    "--html",
    "html_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="With --compare: also write the comparison as a page here.",
)
def report(
    run: str | None,
    baseline_file: Path | None,
    compare: tuple[str, str] | None,
    html_file: Path | None,
) -> None:
    """Write a run's report.html, or compare two runs.

    RUN is a run folder or a run id under reports/; without it, the newest run.
    """
    if compare:
        if run:
            raise click.UsageError("give either RUN or --compare RUN_A RUN_B, not both")
        first, second = (load_results(run_dir(ref)) for ref in compare)
        out.print(comparison_table(first, second))
        for caution in comparison_cautions(first, second):
            out.print(f"[yellow]compare with care:[/] {caution}", soft_wrap=True)
        if html_file:
            write_comparison(html_file, first, second)
        return

    if html_file:
        raise click.UsageError("--html goes with --compare; a run's page is always report.html")
    folder = pick_run(run)
    baseline = Baseline.read(baseline_file) if baseline_file else None
    path = write_report(folder, load_results(folder), baseline=baseline)
    out.print(f"wrote {path}")


@click.command()
@click.argument("runs", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("baselines/baseline.json"),
    show_default=True,
    help="Where to write the baseline.",
)
def baseline(runs: tuple[str, ...], output: Path) -> None:
    """Write a baseline from five or more runs.

    RUNS are run folders or run ids under reports/, all valid runs of one scenario on one
    engine and binder.
    """
    results = [load_results(run_dir(ref)) for ref in runs]
    made = make_baseline(results)
    made.write(output)

    table = Table(title=f"baseline of {len(results)} runs", title_justify="left")
    for column in ("metric", "median", "spread", "runs", "gate sees"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    blind = []
    for name, metric in made.metrics.items():
        gated = made.policy.gated(name)
        sees = metric.smallest_visible_change(made.policy)
        if gated and sees >= BLIND:
            blind.append(name)
        table.add_row(
            name,
            fmt(metric.median, metric.unit),
            fmt(metric.spread, metric.unit),
            str(len(metric.medians)),
            f"> {sees:.0%}" if gated else "not gated",
        )
    out.print(table)
    out.print(f"wrote {output}")
    if blind:
        # Said once here, where more runs can still help, rather than at every gate.
        out.print(
            f"[yellow]{len(blind)} metric(s) vary so much between these runs that the gate "
            f"sees only changes over {BLIND:.0%} of their median: {', '.join(blind)}. "
            "More runs, or a quieter machine, make a tighter baseline.[/yellow]"
        )


class GateUsageError(click.UsageError):
    exit_code = EXIT_BAD_INPUT


class GateCommand(click.Command):
    """Usage errors exit with EXIT_BAD_INPUT: click's own 2 means an invalid run here."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise GateUsageError(exc.format_message(), exc.ctx) from exc


@click.command(cls=GateCommand)
@click.argument("run", required=False)
@click.option(
    "--baseline",
    "baseline_file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The file `lab baseline` wrote.",
)
@click.option(
    "--json",
    "json_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the verdict as JSON here.",
)
@click.pass_context
def gate(ctx: click.Context, run: str | None, baseline_file: Path, json_file: Path | None) -> None:
    """Judge a run against a baseline.

    RUN is a run folder or a run id under reports/; without it, the newest run.
    Exit status: 0 pass, 1 regression, 2 invalid run (its environment failed or it is not
    comparable with the baseline), 3 bad input (no such run, broken file).
    """
    try:
        results = load_results(pick_run(run))
        judged = gate_verdict(results, Baseline.read(baseline_file))
        if json_file:
            write_whole(json_file, judged.model_dump_json(indent=2) + "\n", "the verdict")
    except LabError as exc:
        # Not the group's exit 1: that would read as a regression to whoever runs the gate.
        err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        ctx.exit(EXIT_BAD_INPUT)

    out.print(gate_table(judged))
    out.print(judged.headline(), style=STATUS_STYLE[judged.status])
    for reason in judged.reasons[1:]:
        out.print(f"  also: {reason}")
    ctx.exit(judged.exit_code)


def gate_table(judged: GateReport) -> Table:
    table = Table(title=f"gate: run {judged.run_id}", title_justify="left")
    table.add_column("metric")
    # An invalid run is not judged; its rows still show where each metric fell, as the page does.
    verdict_column = "verdict if valid" if judged.status == "invalid" else "verdict"
    for column in ("baseline", "now", "bound", verdict_column):
        table.add_column(column, justify="right")

    for row in judged.rows:
        spread = f" ± {row.spread:.2g}" if row.spread else ""
        verdict = f"[{VERDICT_STYLE[row.verdict]}]{row.verdict}[/]"
        table.add_row(
            row.metric,
            fmt(row.baseline, row.unit) + spread,
            fmt(row.now, row.unit),
            bound_text(row),
            verdict,
        )
    return table


def comparison_table(first: Results, second: Results) -> Table:
    """Every metric of either run: both medians and the change, coloured by direction."""
    a, b = first.metrics(), second.metrics()
    table = Table(
        title=f"{second.meta.run_id} against {first.meta.run_id}",
        title_justify="left",
    )
    table.add_column("metric")
    for column in (first.meta.run_id, second.meta.run_id, "change"):
        table.add_column(column, justify="right")

    for name in [*a, *(name for name in b if name not in a)]:
        before, after = a.get(name), b.get(name)
        unit = (after or before or Metric(unit="")).unit
        table.add_row(
            name,
            fmt(before.median if before else None, unit),
            fmt(after.median if after else None, unit),
            change_text(before, after),
        )
    return table


def change_text(before: Metric | None, after: Metric | None) -> str:
    if not before or not after or before.median is None or after.median is None:
        return "—"
    if before.median == 0:
        return "—"
    change = (after.median - before.median) / abs(before.median)
    if abs(change) < 0.01:
        return f"[dim]{change:+.1%}[/]"
    improved = (change < 0) == (after.better == "lower")
    return f"[{'green' if improved else 'red'}]{change:+.1%}[/]"
