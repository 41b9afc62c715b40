"""The lab as a pytest plugin: the `lab` marker, its options and a session-wide lab.

Under pytest-xdist the workers share one lab: the first to take the file lock brings it
up, the others attach to it, and the last one out tears it down. Tests that change the
lab (faults, timed scenarios) take `lab_exclusive`, so two never run at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock, Timeout

from lab.binder.tree import binder_home_from, check_tree
from lab.errors import LabError
from lab.lab import HOOK_RECORDS, Lab
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

    with _locked(shared / "lab.lock", "the session lab"):
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

    with _locked(shared / "lab.lock", "the session lab"):
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
    with _locked(shared / "lab-exclusive.lock", "the lab held alone"):
        yield lab


@pytest.fixture(scope="session")
def lab_timing_lock(tmp_path_factory: pytest.TempPathFactory, _lab_worker_id: str) -> Path:
    """A lock for work that must not overlap across xdist workers: timed measurements
    against known truth on one side, machine-wide load (interrupt storms) on the other."""
    return _shared_dir(tmp_path_factory, _lab_worker_id) / "lab-timing.lock"


@pytest.fixture
def lab_quiet(lab_timing_lock: Path) -> Iterator[None]:
    """Hold the timing lock for one test."""
    with _locked(lab_timing_lock, "the machine kept quiet for timing"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """A failed test that used the lab gets the lab's side of the story in its report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    funcargs = getattr(item, "funcargs", {})
    the_lab = funcargs.get("lab_exclusive") or funcargs.get("lab")
    if not report.failed or not isinstance(the_lab, Lab):
        return
    reports = item.config.invocation_params.dir / REPORTS
    dest = reports / the_lab.run_id / "failures" / _slug(f"{item.nodeid}-{report.when}")
    try:
        sections = save_artifacts(the_lab, dest)
    except Exception as exc:  # Gathering them must never hide why the test failed.
        report.sections.append(("lab artifacts", f"could not gather them: {exc!r}"))
        return
    for title, text in sections:
        report.sections.append((f"lab: {title}", text))
    report.user_properties.append(("lab_artifacts", str(dest)))


@contextmanager
def _locked(path: Path, what: str) -> Iterator[None]:
    """Hold a lock shared with the other xdist workers, waiting at most LOCK_TIMEOUT_S."""
    try:
        lock = FileLock(str(path), timeout=LOCK_TIMEOUT_S)
        lock.acquire()
    except Timeout:
        raise LabError(
            f"gave up after {LOCK_TIMEOUT_S:.0f} s waiting for {what} ({path}); last saw: "
            "another pytest-xdist worker holding it, bringing the lab up or running a test "
            "that holds the lab alone; see that worker's output"
        ) from None
    try:
        yield
    finally:
        lock.release()


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


# -- failure artifacts ---------------------------------------------------------------------

# Lines of each artifact shown in a failure's report; the copies under reports/ are whole.
SHOWN_LINES = 40
SHOWN_PODS = 8


def save_artifacts(the_lab: Lab, dest: Path) -> list[tuple[str, str]]:
    """Copy the binder's log, the hook's records, each pod's log and the engine's events
    into dest; return their tails, titled, for the test's report."""
    dest.mkdir(parents=True, exist_ok=True)
    logs = the_lab.binder.dirs["logs"]
    sections = []
    for title, name in (("binder log", "binder.log"), ("submit hook records", HOOK_RECORDS)):
        source = logs / name
        text = source.read_text(errors="replace") if source.exists() else ""
        (dest / name).write_text(text)
        sections.append((title, _tail(text) or f"(no {name})"))

    pods = the_lab.engine.pods()
    (dest / "pods").mkdir(exist_ok=True)
    listing = [
        f"{p.name} {p.labels.get('lab.role', '?')} {p.phase} restarts {p.restarts}" for p in pods
    ]
    shown: list[str] = []
    for pod in pods:
        try:
            text = the_lab.engine.logs(pod.name)
        except LabError as exc:  # Removed since it was listed, say.
            text = f"(no log: {exc})\n"
        (dest / "pods" / f"{pod.name}.log").write_text(text)
        if len(shown) < SHOWN_PODS:
            shown.append(f"[{pod.name}, {pod.phase}]\n{_tail(text, 10) or '(nothing)'}")
    sections.append(("pods", "\n".join(listing) or "(no pods)"))
    sections.append(("pod logs", "\n".join(shown) or "(no pods)"))

    events = [dataclasses.asdict(event) for event in the_lab.engine.events()]
    text = "".join(json.dumps(event) + "\n" for event in events)
    (dest / "events.jsonl").write_text(text)
    lines = [f"{e['wall']:.3f} {e['pod']} {e['kind']} {e['detail']}".rstrip() for e in events]
    sections.append(("engine events", _tail("\n".join(lines)) or "(no events)"))
    sections.append(("copies", str(dest.resolve())))
    return sections


def _tail(text: str, lines: int = SHOWN_LINES) -> str:
    kept = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join(kept)


def _slug(text: str) -> str:
    """A test's node id as one folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:150]
