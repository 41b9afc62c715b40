"""The `lab` command: bring labs up and down, run scenarios, report and gate."""

from __future__ import annotations

import logging
import sys

import click
from rich.console import Console
from rich.logging import RichHandler

from lab.errors import LabError

console = Console(stderr=True)


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level, format="%(message)s", datefmt="%H:%M:%S",
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
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: the lab was cleaned up", highlight=False)
            sys.exit(130)


@click.group(cls=LabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="-v for progress, -vv for every command run.")
def main(verbose: int) -> None:
    """A test lab for WorkBinder: stands up an engine, deploys the binder and its
    workers, runs scenario suites and reports pool refill, failover and throughput."""
    setup_logging(verbose)
