"""Interrupts: `lab run` stopped by Ctrl-C or SIGKILL at random moments leaves nothing.

Each run is a real `lab run` of a quick scenario (real containers, the stand-in binder),
started in its own session and hit at a random moment of its life with SIGINT sent to its
whole process group, as a terminal's Ctrl-C is, or with SIGKILL. After a SIGINT the run
must have removed everything itself; after a SIGKILL, `lab clean` must remove what the
killed run left. The moments are drawn from a seeded generator: set LAB_INTERRUPT_SEED
to replay a draw, LAB_INTERRUPT_RUNS to change how many runs of each kind are made.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import needs_podman
from tests.test_reliability import (
    LAB_CLI,
    cli_env,
    lab_cli,
    quick_scenario,
    run_ids_under,
    run_leftovers,
    short_folder,
)

pytestmark = [pytest.mark.lab, needs_podman]

log = logging.getLogger(__name__)

RUNS = int(os.environ.get("LAB_INTERRUPT_RUNS", "20"))
# Runs at a time: each run's bring-up also sweeps what killed runs of other lanes left.
LANES = int(os.environ.get("LAB_INTERRUPT_LANES", "3"))
SWEPT_BY_RUN = re.compile(r"removing leftovers of run (\S+)")
SWEPT_BY_CLEAN = re.compile(r"removed \d+ run\(s\): (.+)")
NICENESS = 10
# A whole quick run takes 10 to 25 s here; this only bounds a run that hangs.
RUN_S = 180.0
# How long a run may take to be gone after Ctrl-C: teardown of a pool of two is seconds.
SIGINT_EXIT_S = 60.0
SIGKILL_EXIT_S = 10.0
# What each phase of a run prints first (with -v), in the order they come.
PHASE_MARKERS = (
    ("bringing up the", "bring-up"),
    ("READY workers after", "scenario"),
    ("tearing down", "teardown"),
)


@dataclass
class Child:
    """One `lab -v run` in its own folder and session, its output read as it comes."""

    folder: Path
    scenario: Path
    lines: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.runs = self.folder / "runs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                # Niced, and its containers with it: the runs must not starve the timed
                # tests that other pytest-xdist workers run meanwhile.
                "nice",
                "-n",
                str(NICENESS),
                str(LAB_CLI),
                "-v",
                "run",
                str(self.scenario),
                "--run-dir",
                str(self.runs),
                "--reports",
                str(self.folder / "reports"),
            ],
            cwd=self.folder,
            env=cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            # A session of its own, so a signal to its group reaches it and its podman
            # commands, as Ctrl-C in a terminal would, and nothing of the test run.
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip()))

    def phase_at(self, moment: float) -> str:
        """The phase the run was in at `moment`, from the lines it had printed by then."""
        phase = "start"
        for at, line in self.lines:
            if at > moment:
                break
            for marker, name in PHASE_MARKERS:
                if marker in line:
                    phase = name
        return phase

    def seen(self, marker: str) -> float | None:
        """When the run printed a line holding `marker`, or None if it has not yet."""
        return next((at for at, line in self.lines if marker in line), None)

    def wait_for_line(self, marker: str, timeout: float) -> float | None:
        """Wait until the run prints `marker`; None when it exits first (or never does)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            at = self.seen(marker)
            if at is not None or self.proc.poll() is not None:
                return at
            time.sleep(0.01)
        raise AssertionError(
            f"`lab run` printed no {marker!r} within {timeout:.0f} s; it printed:\n"
            + "\n".join(line for _at, line in self.lines[-20:])
        )

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def output(self) -> str:
        self.reader.join(10)
        return "\n".join(line for _at, line in self.lines)


@dataclass
class Interrupted:
    """What one interrupted run did and left."""

    folder: Path
    number: int
    signal_name: str
    delay: float
    phase: str
    exit_status: int | None
    exit_s: float
    lived: float
    marks: dict[str, float]
    run_ids: list[str]
    left: list[str]  # what was left right after the run ended
    output: str
    left_after_clean: list[str] = field(default_factory=list)

    def spans(self) -> dict[str, float]:
        """How long each phase lasted, from the moments its first line was printed."""
        bring_up, scenario = self.marks["bring-up"], self.marks["scenario"]
        teardown = self.marks["teardown"]
        return {
            "bring-up": round(scenario - bring_up, 2),
            "scenario": round(teardown - scenario, 2),
            "teardown": round(self.lived - teardown, 2),
        }

    def line(self) -> str:
        return (
            f"{self.signal_name} #{self.number} at {self.delay:5.2f} s ({self.phase}): exit "
            f"{self.exit_status} after {self.exit_s:.1f} s, run {','.join(self.run_ids) or '-'}"
            f", left {len(self.left)}"
            + (
                f", after clean {len(self.left_after_clean)}"
                if self.signal_name == "SIGKILL"
                else ""
            )
        )


def interrupt_run(
    number: int, sig: signal.Signals, aim: tuple[str, float] | None, folder: Path, scenario: Path
) -> Interrupted:
    """Start a run, hit it `aim[1]` seconds into phase `aim[0]` (never, without an aim),
    wait until it is gone and count what it left."""
    child = Child(folder, scenario)
    if aim is None:
        exit_status = child.wait(RUN_S)
    else:
        phase_name, offset = aim
        marker = {name: mark for mark, name in PHASE_MARKERS}[phase_name]
        began = child.wait_for_line(marker, RUN_S)
        if began is None:  # It exited before the phase began: it failed.
            exit_status = child.wait(10)
        else:
            exit_status = child.wait(max(0.0, began + offset - time.monotonic()))
    hit_at = time.monotonic()
    delay = hit_at - child.started
    phase = child.phase_at(hit_at) if exit_status is None else "finished"
    if exit_status is None:
        try:
            os.killpg(child.proc.pid, sig)
        except ProcessLookupError:
            pass
        limit = SIGINT_EXIT_S if sig == signal.SIGINT else SIGKILL_EXIT_S
        exit_status = child.wait(limit)
        if exit_status is None:
            child.kill()
            raise AssertionError(
                f"{sig.name} #{number}: `lab run` still running {limit:.0f} s after the "
                f"signal ({phase}); its last lines:\n{child.output()[-2000:]}"
            )
    exit_s = time.monotonic() - hit_at
    lived = time.monotonic() - child.started
    output = child.output()
    marks = {
        name: at - child.started
        for mark, name in PHASE_MARKERS
        if (at := child.seen(mark)) is not None
    }

    run_ids = run_ids_under(child.runs)
    left = [item for run_id in run_ids for item in run_leftovers(run_id, child.runs / run_id)]
    return Interrupted(
        folder,
        number,
        sig.name,
        delay,
        phase,
        exit_status,
        exit_s,
        lived,
        marks,
        run_ids,
        left,
        output,
    )


def swept_runs(outputs: list[str]) -> set[str]:
    """Run ids that some bring-up or `lab clean` found left behind and removed."""
    found: set[str] = set()
    for text in outputs:
        found.update(SWEPT_BY_RUN.findall(text))
        for listed in SWEPT_BY_CLEAN.findall(text):
            found.update(part.strip() for part in listed.split(","))
    return found


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with short_folder() as folder:
        yield folder


@pytest.fixture
def seed() -> Iterator[int]:
    chosen = int(os.environ.get("LAB_INTERRUPT_SEED") or random.SystemRandom().randrange(10**6))
    yield chosen


def test_interrupted_runs_leave_nothing(
    short_dir: Path, seed: int, record_property: pytest.RecordProperty, lab_quiet: None
) -> None:
    scenario = quick_scenario(short_dir, name="interrupted", duration_s=1.0)
    record_property("seed", seed)

    # One run left alone: how long each phase of a run lasts on this machine now.
    calibration = interrupt_run(0, signal.SIGINT, None, short_dir / "run0", scenario)
    assert calibration.exit_status == 0, calibration.output[-3000:]
    assert calibration.left == [], calibration.left
    spans = calibration.spans()

    # Each run is aimed at a phase (bring-up counts from the start of the process) and hit
    # at a random moment of that phase's span as the calibration run measured it.
    rng = random.Random(seed)
    names = [name for _marker, name in PHASE_MARKERS]
    plan = [
        (sig, (names[k % len(names)], rng.uniform(0, spans[names[k % len(names)]])))
        for k in range(RUNS)
        for sig in (signal.SIGINT, signal.SIGKILL)
    ]
    rng.shuffle(plan)

    def one(number: int) -> Interrupted:
        sig, aim = plan[number - 1]
        return interrupt_run(number, sig, aim, short_dir / f"run{number}", scenario)

    started = time.monotonic()
    with ThreadPoolExecutor(LANES) as lanes:
        results = list(lanes.map(one, range(1, len(plan) + 1)))
    elapsed = time.monotonic() - started

    # What the SIGKILLed runs left: a later run's bring-up removed some; `lab clean` the rest.
    cleaned = lab_cli("-v", "clean", cwd=short_dir, timeout=300)
    assert cleaned.returncode == 0, cleaned.stderr
    killed = [r for r in results if r.signal_name == "SIGKILL"]
    for result in killed:
        result.left_after_clean = [
            item
            for run_id in result.run_ids
            for item in run_leftovers(run_id, result.folder / "runs" / run_id)
        ]
    by_next_run = swept_runs([r.output for r in results])
    by_clean = swept_runs([cleaned.stderr])
    killed_ids = {i for r in killed if r.left for i in r.run_ids}

    table = "\n".join(r.line() for r in results)
    summary = (
        f"seed {seed} (LAB_INTERRUPT_SEED={seed} replays it), phase spans {spans}, "
        f"{len(results)} interrupted runs, {LANES} at a time, in {elapsed:.0f} s; "
        f"{len(killed_ids)} SIGKILLed runs left something: {len(killed_ids & by_next_run)} "
        f"removed by a later run, {len(killed_ids & by_clean)} by `lab clean` (the rest by "
        f"runs outside this test):\n{table}"
    )
    record_property("interrupts", summary)
    log.info("%s", summary)
    sigint = [r for r in results if r.signal_name == "SIGINT"]
    left = {r.line(): r.left for r in sigint if r.left}
    left.update({r.line(): r.left_after_clean for r in killed if r.left_after_clean})
    assert left == {}, f"runs left something behind:\n{left}\n{summary}"
    # A leak of a Ctrl-C'd run that a sibling's bring-up swept before it was counted.
    swept = (by_next_run | by_clean) & {i for r in sigint for i in r.run_ids}
    assert swept == set(), f"Ctrl-C'd runs whose leftovers a later run removed: {swept}\n{summary}"
    assert killed_ids, f"no SIGKILLed run left anything to remove: the test saw nothing\n{summary}"
    phases = {r.phase for r in sigint}
    assert {"bring-up", "scenario", "teardown"} <= phases, f"phases hit: {phases}\n{summary}"
    for result in results:
        problem = f"{result.line()}\n{result.output[-3000:]}"
        if result.phase == "finished":
            assert result.exit_status == 0, f"a run failed on its own: {problem}"
        elif result.signal_name == "SIGINT" and result.phase != "start":
            assert "Traceback" not in result.output, problem
            # Ctrl-C is held during teardown; it may land after the run's last step, as
            # the process exits, when there is nothing left to interrupt.
            ended = (130, 0, -signal.SIGINT) if result.phase == "teardown" else (130,)
            assert result.exit_status in ended, problem


def test_sigterm_mid_scenario_tears_down_and_exits_143(short_dir: Path, lab_quiet: None) -> None:
    """A supervisor's SIGTERM, sent to the lab's process alone as CI runners and `kill` do,
    tears the lab down like Ctrl-C but exits with SIGTERM's own status."""
    scenario = quick_scenario(short_dir, name="terminated", duration_s=5.0)
    child = Child(short_dir / "run", scenario)
    scenario_mark = {name: mark for mark, name in PHASE_MARKERS}["scenario"]
    assert child.wait_for_line(scenario_mark, RUN_S) is not None, child.output()[-3000:]

    child.proc.send_signal(signal.SIGTERM)
    exit_status = child.wait(SIGINT_EXIT_S)
    if exit_status is None:
        child.kill()
    output = child.output()

    assert exit_status == 128 + signal.SIGTERM, output[-3000:]
    assert "terminated: the lab was cleaned up" in output
    assert "Traceback" not in output
    run_ids = run_ids_under(child.runs)
    assert run_ids, output[-3000:]
    left = [item for run_id in run_ids for item in run_leftovers(run_id, child.runs / run_id)]
    assert left == []
