"""Reliability: what a run leaves behind, parallel runs, and failures that are one clear line.

`run_leftovers` is the one measure every reliability test uses: the pods, containers,
images and volumes carrying the run's label, the host processes that belong to the run,
the sockets it listens on and its ownership record. A clean run has none of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab.engines.podman import podman_env
from lab.errors import PortInUse
from lab.ports import ensure_free
from lab.run import state_dir
from tests.conftest import needs_podman

LAB_CLI = Path(sys.executable).parent / "lab"
# Wide enough that no log line or error line is wrapped by rich.
CLI_ENV = {"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}

# A lab that comes up in seconds: the stand-in binder, a pool of two, a short load level.
QUICK_SCENARIO = """\
name: {name}
binder:
  pool: {{min_pool_size: 2, min_jobs_on_ce: 2, max_jobs_on_ce: 2}}
standin: {{first_submit_delay_ms: 0, refill_tick_ms: 200}}
deadlines: {{bring_up_s: 60, pool_full_s: 60, recovery_s: 10}}
refill: {{enabled: false}}
failover: {{enabled: false}}
throughput: {{concurrency: [1], duration_s: {duration_s}}}
"""


def quick_scenario(
    folder: Path, name: str = "quick", duration_s: float = 1.0, **extra: str
) -> Path:
    """Write a quick scenario file (plus `extra` top-level YAML blocks) into folder."""
    text = QUICK_SCENARIO.format(name=name, duration_s=duration_s)
    text += "".join(f"{key}: {value}\n" for key, value in extra.items())
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


@contextmanager
def short_folder() -> Iterator[Path]:
    """A folder with a short path: a run's API socket lives in its folder, and unix
    socket paths are limited to 107 bytes, which pytest's tmp_path comes close to."""
    folder = Path(tempfile.mkdtemp(prefix="lab-rel-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with short_folder() as folder:
        yield folder


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **CLI_ENV, **extra}


# -- what a run leaves behind ------------------------------------------------------------


def run_processes(run_id: str) -> list[str]:
    """Host processes of a run: its id in their command line (the API service, conmon)
    or in their mounts (the binder and workers, which mount the run folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            mounts = "" if run_id in cmdline else (proc / "mountinfo").read_text(errors="replace")
        except OSError:  # Gone meanwhile, or a kernel thread.
            continue
        if run_id in cmdline or run_id in mounts:
            found.append(f"process {proc.name} ({cmdline.strip()[:80]})")
    return found


def listening(ports: list[int], run_id: str) -> list[str]:
    """TCP ports of `ports` that something listens on, and unix sockets under the run."""
    found = []
    tcp = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, timeout=30, check=True)
    for line in tcp.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3].rsplit(":", 1)[-1] in {str(p) for p in ports}:
            found.append(f"tcp listener {fields[3]}")
    unix = subprocess.run(["ss", "-Hlx"], capture_output=True, text=True, timeout=30, check=True)
    found += [
        f"unix listener {line.split()[4]}" for line in unix.stdout.splitlines() if run_id in line
    ]
    return found


def lab_ports(run_dir: Path) -> list[int]:
    """The binder's client and admin ports, as the run recorded them in lab.json."""
    try:
        info = json.loads((run_dir / "lab.json").read_text())
    except (OSError, ValueError):
        return []
    return [int(info[key]) for key in ("port", "admin_port") if int(info.get(key) or 0) > 0]


def podman_list(argv: list[str], env: dict[str, str]) -> list[str]:
    """What a podman listing prints, word by word; retried, as podman fails a listing
    when an object goes away meanwhile (another run removing its own)."""
    deadline = time.monotonic() + 30
    while True:
        done = subprocess.run(
            ["podman", *argv], env=env, capture_output=True, text=True, timeout=60
        )
        if done.returncode == 0:
            return done.stdout.split()
        if time.monotonic() > deadline:
            raise AssertionError(f"`podman {' '.join(argv)}` keeps failing: {done.stderr}")
        time.sleep(0.2)


def run_leftovers(run_id: str, run_dir: Path | None = None) -> list[str]:
    """Everything of run `run_id` still on this machine; [] when the run left nothing."""
    env = podman_env(Path(os.environ.get("TMPDIR", "/tmp")) / "lab-reliability-probe")
    label = f"label=lab.run={run_id}"
    found = []
    for kind, argv in (
        ("pod", ["pod", "ps", "-q"]),
        ("container", ["ps", "-aq"]),
        ("image", ["images", "-q"]),
        ("volume", ["volume", "ls", "-q"]),
    ):
        found += [f"{kind} {ident}" for ident in podman_list([*argv, "--filter", label], env)]
    found += run_processes(run_id)
    found += listening(lab_ports(run_dir) if run_dir else [], run_id)
    if (state_dir() / f"{run_id}.json").exists():
        found.append(f"ownership record {state_dir() / f'{run_id}.json'}")
    return found


def run_ids_under(runs_root: Path) -> list[str]:
    """The run ids that have a folder under runs_root."""
    if not runs_root.is_dir():
        return []
    return sorted(p.name for p in runs_root.iterdir() if p.is_dir())


@dataclass
class CliResult:
    """A finished `lab` command: exit status, output and how long it took."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.errors = [line for line in self.stderr.splitlines() if line.startswith("error:")]


def lab_cli(*args: str, cwd: Path, timeout: float = 180, **env: str) -> CliResult:
    """Run the `lab` command to completion (bounded), capturing what it printed."""
    argv = [str(LAB_CLI), *args]
    started = time.monotonic()
    done = subprocess.run(
        argv, cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=timeout
    )
    return CliResult(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def assert_one_error_line(result: CliResult, pattern: str) -> str:
    """Exit status 1, no traceback, exactly one `error:` line, matching pattern."""
    shown = f"{result.argv[1:]} exited {result.returncode}; stderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 1, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    assert len(result.errors) == 1, shown
    assert re.search(pattern, result.errors[0]), f"{pattern!r} not in {result.errors[0]!r}"
    return result.errors[0]


# -- failures that are one line, bounded, and leave nothing --------------------------------


def only_run(runs_root: Path) -> tuple[str, Path]:
    """The one run made under runs_root: its id and folder."""
    ids = run_ids_under(runs_root)
    assert len(ids) == 1, ids
    return ids[0], runs_root / ids[0]


def assert_failed_cleanly(result: CliResult, runs_root: Path, pattern: str, within: float) -> str:
    """One error line matching pattern, within `within` seconds, and nothing of the run left."""
    error = assert_one_error_line(result, pattern)
    assert result.seconds < within, f"took {result.seconds:.1f} s: {error}"
    for run_id in run_ids_under(runs_root):
        assert run_leftovers(run_id, runs_root / run_id) == [], error
    return error


def test_scenario_file_error_is_one_line_and_starts_nothing(short_dir: Path) -> None:
    scenario = short_dir / "typo.yaml"
    scenario.write_text("name: typo\nbinder:\n  pool: {min_pool_sise: 2}\n")

    result = lab_cli("run", str(scenario), "--run-dir", str(short_dir / "runs"), cwd=short_dir)

    assert_one_error_line(result, r"typo\.yaml: binder\.pool\.min_pool_sise: Extra inputs")
    assert run_ids_under(short_dir / "runs") == []


def test_binder_tree_missing_pieces_is_one_line_naming_them(short_dir: Path) -> None:
    tree = short_dir / "WorkBinder"
    (tree / "lib").mkdir(parents=True)
    (tree / "lib" / "log4j-1.2.15.jar").write_bytes(b"PK")
    (tree / "run_binder.sh").write_text("#!/bin/sh\n")

    scenario = quick_scenario(short_dir)

    result = lab_cli(
        "up",
        str(scenario),
        "--binder-home",
        str(tree),
        "--run-dir",
        str(short_dir / "runs"),
        cwd=short_dir,
    )

    error = assert_one_error_line(result, r"WorkBinder tree .* lacks bin/yu/ac/bg/rcub/binder/")
    assert "startBinderJobLocal.sh" in error and "binder.properties" in error
    assert "run_binder.sh" not in error.split("lacks", 1)[1]
    assert run_ids_under(short_dir / "runs") == []


def test_ensure_free_names_the_port_and_its_holder() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        with pytest.raises(PortInUse) as caught:
            ensure_free(port, "binder")

    message = str(caught.value)
    assert f"port {port} for the binder is in use" in message
    assert f"(pid {os.getpid()})" in message
    assert "\n" not in message
    ensure_free(port, "binder")  # Closed again: free.


@needs_podman
def test_too_deep_run_folder_is_one_line(short_dir: Path) -> None:
    deep = short_dir / ("d" * 60) / ("e" * 30)
    scenario = quick_scenario(short_dir)

    result = lab_cli("up", str(scenario), "--run-dir", str(deep), cwd=short_dir)

    assert_failed_cleanly(
        result, deep, r"too deep for the run's API socket .* use a shorter --run-dir", 30
    )


@pytest.mark.lab
@needs_podman
def test_scenario_port_in_use_is_one_line_naming_its_holder(short_dir: Path) -> None:
    runs = short_dir / "runs"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        scenario = quick_scenario(short_dir)
        scenario.write_text(scenario.read_text().replace("binder:\n", f"binder:\n  port: {port}\n"))

        result = lab_cli("up", str(scenario), "--run-dir", str(runs), cwd=short_dir)

    error = assert_failed_cleanly(result, runs, rf"port {port} for the binder is in use", 60)
    assert f"(pid {os.getpid()})" in error
    assert "binder.port" in error


@pytest.mark.lab
@needs_podman
def test_binder_that_never_answers_fails_at_its_deadline(short_dir: Path) -> None:
    runs = short_dir / "runs"
    # It listens and accepts, and never says a word.
    silent = (
        "import socket, sys, time; "
        "s = socket.create_server(('0.0.0.0', int(sys.argv[1]))); time.sleep(600)"
    )
    scenario = quick_scenario(short_dir)
    scenario.write_text(
        scenario.read_text()
        .replace("binder:\n", f'binder:\n  command: [python3, -c, "{silent}", "{{port}}"]\n')
        .replace("bring_up_s: 60", "bring_up_s: 5")
    )

    result = lab_cli("up", str(scenario), "--run-dir", str(runs), cwd=short_dir)

    error = assert_failed_cleanly(
        result, runs, r"gave up after 5 s waiting for the binder to answer a CE query", 60
    )
    assert "got no answer within" in error and "after 0 bytes" in error


@pytest.mark.lab
@needs_podman
def test_worker_program_missing_fails_fast_quoting_the_runtime(short_dir: Path) -> None:
    runs = short_dir / "runs"
    scenario = quick_scenario(short_dir, worker='{command: [/nonexistent/worker, "{job}"]}')
    scenario.write_text(scenario.read_text().replace("pool_full_s: 60", "pool_full_s: 120"))

    result = lab_cli("up", str(scenario), "--run-dir", str(runs), cwd=short_dir)

    # Well before the pool's 120 s deadline: the first failed jobs are enough to know.
    error = assert_failed_cleanly(result, runs, r"the submit hook failed for all \d+ jobs", 60)
    assert "did not start" in error and '"/nonexistent/worker"' in error


@pytest.mark.lab
@needs_podman
def test_workers_that_exit_fail_fast_quoting_their_log(short_dir: Path) -> None:
    runs = short_dir / "runs"
    scenario = quick_scenario(
        short_dir, worker='{command: [sh, -c, "echo no binder for job {job}; exit 3"]}'
    )
    scenario.write_text(scenario.read_text().replace("pool_full_s: 60", "pool_full_s: 120"))

    result = lab_cli("up", str(scenario), "--run-dir", str(runs), cwd=short_dir)

    error = assert_failed_cleanly(result, runs, r"no worker came up", 60)
    assert "0 READY of 2, 2 worker pods: 2 Failed" in error
    assert re.search(r"the last failed one says: no binder for job \d+-\d", error), error


@pytest.mark.lab
@needs_podman
def test_failing_submit_hook_is_named_with_its_error(short_dir: Path) -> None:
    runs = short_dir / "runs"
    # The binder's container points its hook at an API socket that is not there.
    breaks_hook = (
        "sed -i s#/run/lab/podman.sock#/run/lab/gone.sock# /lab/conf/hook.json && "
        "exec python3 -m lab.standin.binder binder.properties"
    )
    scenario = quick_scenario(short_dir)
    scenario.write_text(
        scenario.read_text()
        .replace("binder:\n", f'binder:\n  command: [bash, -c, "{breaks_hook}"]\n')
        .replace("pool_full_s: 60", "pool_full_s: 120")
    )

    # The command above starts the stand-in: this lab runs it even when WorkBinder is given.
    result = lab_cli("up", str(scenario), "--run-dir", str(runs), cwd=short_dir, LAB_BINDER_HOME="")

    error = assert_failed_cleanly(result, runs, r"the submit hook failed for all \d+ jobs", 60)
    assert "its last record says: FileNotFoundError" in error
    assert "submissions.jsonl" in error


# -- parallel runs -------------------------------------------------------------------------


@pytest.mark.lab
@needs_podman
def test_two_runs_at_once_do_not_collide(short_dir: Path) -> None:
    scenario = quick_scenario(short_dir, name="parallel", duration_s=2.0)
    folders = [short_dir / "a", short_dir / "b"]
    children = []
    for folder in folders:
        folder.mkdir()
        # Niced like the interrupted runs: other workers' timed tests come first.
        argv = ["nice", "-n", "10", str(LAB_CLI), "run", str(scenario), "--run-dir", "runs"]
        argv += ["--reports", "reports"]
        children.append(
            subprocess.Popen(
                argv,
                cwd=folder,
                env=cli_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [child.communicate(timeout=300) for child in children]

    for child, (_out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err[-3000:]
    runs = [only_run(folder / "runs") for folder in folders]
    assert runs[0][0] != runs[1][0]
    ports = [set(lab_ports(run_dir)) for _run_id, run_dir in runs]
    assert all(len(p) == 2 for p in ports) and not ports[0] & ports[1], ports
    for (run_id, run_dir), folder in zip(runs, folders, strict=True):
        results = json.loads((folder / "reports" / run_id / "results.json").read_text())
        assert results["meta"]["valid"], results["meta"]
        assert run_leftovers(run_id, run_dir) == []
