"""The lab as a pytest plugin: the `lab` marker, its options and a session-wide lab.

Under pytest-xdist the workers share one lab: the first to take the file lock brings it
up, the others attach to it, and the last one out tears it down. Tests that change the
lab (faults, timed scenarios) take `lab_exclusive`, so two never run at once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from lab.binder.tree import binder_home_from, check_tree
from lab.lab import Lab
from lab.scenarios.schema import Scenario, load_scenario

SESSION_FILE = "lab-session.json"
SESSION_START = pytest.StashKey[float]()
REPORTS = Path("reports")
LOCK_TIMEOUT_S = 900.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lab", "workbinder-lab")
    group.addoption(
        "--lab-engine",
        default="podman",
        choices=("podman", "kind", "vbox"),
        help="engine the lab runs on (default: podman)",
    )
    group.addoption(
        "--lab-keep",
        action="store_true",
        help="leave the lab up after the session (remove it with `lab down`)",
    )
    group.addoption(
        "--lab-run-dir",
        default=".lab/runs",
        help="folder under which runs keep their files (default: .lab/runs)",
    )
    group.addoption(
        "--lab-binder-home",
        default=None,
        help="a built WorkBinder tree; default $LAB_BINDER_HOME, else the stand-in",
    )
    group.addoption(
        "--lab-scenario",
        default=None,
        help="scenario file whose binder settings the session lab uses",
    )
    group.addoption(
        "--lab-baseline",
        default=None,
        help="baseline file: gate every run this session writes against it",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[SESSION_START] = time.time()
    config.addinivalue_line(
        "markers", "lab: needs a running lab (real containers); select with -m lab"
    )


def lab_binder_home(config: pytest.Config) -> Path | None:
    home = binder_home_from(config.getoption("--lab-binder-home"))
    if home is not None:
        check_tree(home)
    return home


def session_scenario(config: pytest.Config) -> Scenario:
    path = config.getoption("--lab-scenario")
    if path:
        return load_scenario(Path(path))[0]
    # Quick timings for tests: a job whose worker died is forgotten after 3 s, not 30.
    return Scenario.model_validate(
        {
            "name": "pytest-session",
            "engine": config.getoption("--lab-engine"),
            "binder": {
                "pool": {"min_pool_size": 2, "min_jobs_on_ce": 2, "max_jobs_on_ce": 2},
                "properties": {"DefaultMaxSecsReusableJob": 3},
            },
            "standin": {"first_submit_delay_ms": 500, "refill_tick_ms": 500},
            "deadlines": {"recovery_s": 30, "pool_full_s": 60},
            "refill": {"repetitions": 1, "drain_clients": 1, "hold_s": 0.2},
            "failover": {"repetitions": 1},
            "throughput": {"concurrency": [1, 4], "duration_s": 2},
        }
    )


def _shared_dir(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    base = tmp_path_factory.getbasetemp()
    # xdist workers each get a subfolder of one session folder; share the parent.
    return base.parent if worker_id != "master" else base


@pytest.fixture(scope="session")
def _lab_worker_id(request: pytest.FixtureRequest) -> str:
    """The xdist worker's id, or "master" without xdist."""
    return str(getattr(request.config, "workerinput", {}).get("workerid", "master"))


@pytest.fixture(scope="session")
def lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, _lab_worker_id: str
) -> Iterator[Lab]:
    """One lab for the whole session (shared by xdist workers), torn down at the end."""
    config = request.config
    scenario = session_scenario(config)
    home = lab_binder_home(config)
    shared = _shared_dir(tmp_path_factory, _lab_worker_id)
    state_path = shared / SESSION_FILE
    keep = bool(config.getoption("--lab-keep"))
    runs_root = Path(config.getoption("--lab-run-dir")).resolve()

    with FileLock(str(shared / "lab.lock"), timeout=LOCK_TIMEOUT_S):
        state = json.loads(state_path.read_text()) if state_path.exists() else None
        if state is None:
            the_lab = Lab(scenario, binder_home=home, runs_root=runs_root, keep=keep)
            try:
                the_lab.up()
            except BaseException:
                the_lab.down()
                raise
            state = {"run_dir": str(the_lab.run_dir), "users": 1, "owner": os.getpid()}
        else:
            the_lab = Lab.attach(scenario, Path(state["run_dir"]), home)
            state["users"] += 1
        state_path.write_text(json.dumps(state))

    yield the_lab

    with FileLock(str(shared / "lab.lock"), timeout=LOCK_TIMEOUT_S):
        state = json.loads(state_path.read_text())
        state["users"] -= 1
        if state["users"] > 0:
            if state["owner"] == os.getpid():
                # Siblings still use it: the lab must outlive this process.
                the_lab.detach()
            state_path.write_text(json.dumps(state))
            return
        state_path.unlink()
    if keep:
        the_lab.detach()
    elif state["owner"] == os.getpid():
        the_lab.down()
    else:
        the_lab.engine.down()


@pytest.fixture
def lab_exclusive(
    lab: Lab, tmp_path_factory: pytest.TempPathFactory, _lab_worker_id: str
) -> Iterator[Lab]:
    """The session lab, held alone: no other test changes it meanwhile."""
    shared = _shared_dir(tmp_path_factory, _lab_worker_id)
    with FileLock(str(shared / "lab-exclusive.lock"), timeout=LOCK_TIMEOUT_S):
        yield lab


class _Lines:
    """Collects what the gate writes, to show it in the terminal summary later."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def write_sep(self, sep: str, title: str = "", **_markup: object) -> None:
        self.lines.append((sep, title))

    def write_line(self, line: str, **_markup: object) -> None:
        self.lines.append(("", line))


GATE_LINES = pytest.StashKey[_Lines]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With --lab-baseline, gate every run written under reports/ during this session."""
    config = session.config
    baseline = config.getoption("--lab-baseline")
    if not baseline or hasattr(config, "workerinput"):
        return
    from lab.report.gate import pytest_gate_summary

    since = config.stash.get(SESSION_START, 0.0)
    runs = sorted(
        path.parent for path in REPORTS.glob("*/results.json") if path.stat().st_mtime >= since
    )
    lines = _Lines()
    code = pytest_gate_summary(lines, runs, Path(baseline))
    config.stash[GATE_LINES] = lines
    if code and exitstatus == 0:
        session.exitstatus = code


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(GATE_LINES, None)
    for sep, text in lines.lines if lines else []:
        if sep:
            terminalreporter.write_sep(sep, text)
        else:
            terminalreporter.write_line(text)
