"""The `lab` command: bring labs up and down, run scenarios, report and gate."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from lab.binder.tree import binder_home_from, check_tree
from lab.engines import ENGINES, make_engine
from lab.engines.base import Engine
from lab.errors import LabError, Terminated
from lab.lab import LAB_FILE, Lab, terminate_on_sigterm
from lab.proc import require_tool
from lab.protocol.client import query_sync
from lab.run import RunRecord, all_records
from lab.scenarios.runner import print_summary, run_suite
from lab.scenarios.schema import Scenario, load_scenario

console = Console(stderr=True)


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="%H:%M:%S",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    # Our own INFO lines are the operator's progress; libraries only speak up with -vv.
    logging.getLogger("lab").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


class LabGroup(click.Group):
    """Turns every LabError into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except LabError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except Terminated:
            console.print("[yellow]terminated[/]: the lab was cleaned up", highlight=False)
            sys.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: the lab was cleaned up", highlight=False)
            sys.exit(128 + signal.SIGINT)


@click.group(cls=LabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="-v for progress, -vv for every command run.")
def main(verbose: int) -> None:
    """A test lab for WorkBinder: stands up an engine, deploys the binder and its
    workers, runs scenario suites and reports pool refill, failover and throughput."""
    setup_logging(verbose)


DEFAULT_SCENARIO = Path("scenarios/smoke.yaml")
engine_option = click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default=None,
    help="Engine to run on (default: the scenario's, normally podman).",
)
binder_option = click.option(
    "--binder-home",
    type=click.Path(path_type=Path),
    default=None,
    envvar="LAB_BINDER_HOME",
    help="A built WorkBinder tree (bin/ and lib/); without it the stand-in binder runs.",
)
runs_option = click.option(
    "--run-dir",
    "runs_root",
    type=click.Path(path_type=Path),
    default=Path(".lab/runs"),
    show_default=True,
    help="Folder under which each run keeps its files.",
)


def _scenario(path: Path | None) -> tuple[Scenario, str, str]:
    if path is None:
        if not DEFAULT_SCENARIO.exists():
            raise LabError(
                f"no scenario named and no {DEFAULT_SCENARIO} here: run from the lab's folder "
                "or name a scenario file"
            )
        path = DEFAULT_SCENARIO
    scenario, digest = load_scenario(path)
    return scenario, str(path), digest


@main.command()
@click.argument("scenario", type=click.Path(path_type=Path), required=False)
@engine_option
@binder_option
@runs_option
def up(
    scenario: Path | None, engine: str | None, binder_home: Path | None, runs_root: Path
) -> None:
    """Bring a lab up and leave it running: engine, binder and a full pool.

    SCENARIO is a scenario file (default: scenarios/smoke.yaml) whose binder, pool and
    worker settings are used. `lab down` removes it again.
    """
    loaded, _source, _digest = _scenario(scenario)
    terminate_on_sigterm()
    home = binder_home_from(str(binder_home) if binder_home else None)
    if home is not None:
        check_tree(home)
    lab = Lab(loaded, binder_home=home, engine=engine, runs_root=runs_root, keep=True)
    with lab, console.status(f"bringing up run {lab.run_id}", spinner="dots"):
        lab.up()
    console.print(
        f"run [bold]{lab.run_id}[/] is up: {lab.binder.kind} binder on 127.0.0.1:"
        f"{lab.binder.endpoint.port}, pool full {lab.times.pool_full:.1f} s after the binder "
        f"started (engine {lab.times.engine_up:.1f} s, image {lab.times.binder_prepared:.1f} s)",
        highlight=False,
    )
    show_status([lab.run_id])


@main.command(name="run")
@click.argument("scenario", type=click.Path(path_type=Path), required=False)
@engine_option
@binder_option
@runs_option
@click.option(
    "--reports",
    "reports_root",
    type=click.Path(path_type=Path),
    default=Path("reports"),
    show_default=True,
    help="Folder under which each run writes <run id>/results.json.",
)
@click.option("--keep", is_flag=True, help="Leave the lab up afterwards (`lab down` removes it).")
def run_command(
    scenario: Path | None,
    engine: str | None,
    binder_home: Path | None,
    runs_root: Path,
    reports_root: Path,
    keep: bool,
) -> None:
    """Run a scenario suite on a fresh lab and print its measurements.

    SCENARIO is a scenario file (default: scenarios/smoke.yaml). Results go to
    reports/<run id>/results.json, with the binder's, hook's and workers' logs beside it.
    """
    loaded, source, digest = _scenario(scenario)
    terminate_on_sigterm()
    home = binder_home_from(str(binder_home) if binder_home else None)
    if home is not None:
        check_tree(home)
    console.print(
        f"running suite [bold]{loaded.name}[/] ({source}) with the "
        f"{'real' if home else 'stand-in'} binder",
        highlight=False,
    )
    results, path = run_suite(
        loaded,
        scenario_file=source,
        scenario_hash=digest,
        binder_home=home,
        engine=engine,
        runs_root=runs_root,
        reports_root=reports_root,
        keep=keep,
    )
    print_summary(results, path, Console())
    if not results.meta.valid:
        raise LabError(f"the run is invalid: {'; '.join(results.meta.invalid_reasons)}")


@main.command()
@click.argument("run_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every lab on this machine.")
def down(run_ids: tuple[str, ...], everything: bool) -> None:
    """Tear labs down: RUN_IDS, or the only lab up, or --all of them."""
    labs = _labs_up(run_ids)
    if not run_ids and len(labs) > 1 and not everything:
        names = ", ".join(record.run_id for record, _ in labs)
        raise LabError(f"{len(labs)} labs are up ({names}): name the runs, or use --all")
    if not labs:
        console.print("no lab is up")
    for record, engine in labs:
        engine.down()
        console.print(f"run {record.run_id}: down")


def _labs_up(run_ids: Sequence[str]) -> list[tuple[RunRecord, Engine]]:
    """The labs named (or every lab up), each with an engine to act on it."""
    records = {record.run_id: record for record in all_records()}
    labs = []
    for run_id in run_ids or sorted(records):
        record = records.get(run_id)
        if record is None:
            raise LabError(f"no lab with run id {run_id}: `lab status` lists the labs up")
        labs.append((record, make_engine(record.engine, run_id, Path(record.run_dir))))
    return labs


@main.command()
@click.argument("run_ids", nargs=-1)
def status(run_ids: tuple[str, ...]) -> None:
    """What runs: each lab's pods with phase, restarts and age, and its READY count."""
    show_status(list(run_ids) or None)


@main.command()
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Also remove labs whose owner is alive (labs kept up by `lab up`).",
)
def clean(everything: bool) -> None:
    """Remove leftovers of any run whose owner process is gone."""
    from lab.engines.podman import podman_env, sweep_leftovers

    require_tool("podman", "run `make setup`, or install podman and runc")
    scratch = Path(tempfile.mkdtemp(prefix="lab-clean-"))
    try:
        swept = sweep_leftovers(podman_env(scratch), everything=everything)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    console.print(f"removed {len(swept)} run(s): {', '.join(swept)}" if swept else "nothing left")


def show_status(run_ids: list[str] | None) -> None:
    labs = _labs_up(run_ids or [])
    if not labs:
        console.print("no lab is up")
        return
    for record, engine in labs:
        run_id = record.run_id
        info = _lab_info(Path(record.run_dir))
        ready = "?"
        if info.get("port"):
            try:
                port = int(str(info["port"]))
                ready = str(query_sync("127.0.0.1", port, deadline=2.0).total_ready)
            except LabError:
                ready = "no answer"
        owner = "alive" if record.owner_alive() else "gone"
        table = Table(
            title=f"run {run_id} ({record.engine}, {info.get('binder', '?')} binder, "
            f"port {info.get('port', '?')}, READY {ready}, owner {owner})"
        )
        for column in ("pod", "role", "phase", "restarts", "age"):
            table.add_column(column)
        for pod in engine.pods():
            table.add_row(
                pod.name,
                pod.labels.get("lab.role", ""),
                pod.phase,
                str(pod.restarts),
                f"{pod.age_s:.0f} s",
            )
        Console().print(table)


def _lab_info(run_dir: Path) -> dict[str, object]:
    try:
        return dict(json.loads((run_dir / LAB_FILE).read_text()))
    except (OSError, ValueError):
        return {}


from lab.report.commands import baseline, gate, report  # noqa: E402

main.add_command(report)
main.add_command(baseline)
main.add_command(gate)
