"""The stand-in binder and workers as real processes on loopback, driven by the lab's client.

Each binder runs in its own process group with `python -S` (no site-packages, so the
stand-in provably needs only the standard library); its submit script starts workers in
the same group, and every group is killed at teardown whatever the test's result.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from lab.errors import QueryFailed
from lab.protocol import client, wire
from lab.standin import read_properties
from lab.waits import wait_for

REPO = Path(__file__).resolve().parents[1]
FULL_CE = "cluster1.csk.kg.ac.rs:8443/cream-pbs-aegis"
LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (DEBUG|INFO |WARN |ERROR) \[[\w.]+\] \(.+?\) (.*)$"
)
JOB_ID = r"\d{13}-\d+"

SUBMIT_SCRIPT = """#!/bin/sh
# Starts one stand-in worker in the background and returns at once, as the binder expects.
"{python}" -S -m lab.standin.worker "{properties}" "$1" "$2" "$3" "$4" > "{outputs}/$3.out" 2>&1 &
echo $! > "{pids}/$3"
echo "worker for $3 started"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_properties(path: Path, values: dict[str, object]) -> None:
    path.write_text("".join(f"{key} = {value}\n" for key, value in values.items()))


@dataclass
class Standin:
    """One stand-in binder process, its folder and what its workers left there."""

    root: Path
    port: int
    admin_port: int
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> str:
        return (self.root / "binder.log").read_text(errors="replace")

    def messages(self) -> list[str]:
        return [m.group(3) for line in self.log.splitlines() if (m := LOG_LINE.match(line))]

    def tail(self) -> str:
        return "\n".join(self.log.splitlines()[-15:])

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        def probe() -> tuple[bool, str]:
            found = re.search(pattern, self.log)
            return found is not None, self.tail()

        wait_for(f"binder log line /{pattern}/", probe, timeout=timeout, interval=0.02)
        found = re.search(pattern, self.log)
        assert found is not None
        return found

    def wait_ready(self, count: int, timeout: float = 10.0) -> client.QueryAnswer:
        def probe() -> tuple[bool, client.QueryAnswer | str]:
            try:
                answer = client.query_sync("127.0.0.1", self.port)
            except QueryFailed as exc:
                return False, str(exc)
            return answer.total_ready == count, answer

        answer = wait_for(f"{count} READY jobs", probe, timeout=timeout, interval=0.02)
        assert isinstance(answer, client.QueryAnswer)
        return answer

    def job_ids(self) -> list[str]:
        return re.findall(rf"Saving worker job ID = ({JOB_ID})\.", self.log)

    def worker_pid(self, job_id: str) -> int:
        return int((self.root / "pids" / job_id).read_text())

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)


StartStandin = Callable[..., Standin]


@pytest.fixture
def start_standin(tmp_path: Path) -> Iterator[StartStandin]:
    """Start a stand-in binder with a pool of `pool` workers; binder/worker keys override."""
    started: list[Standin] = []

    def start(
        pool: int = 1,
        binder: dict[str, object] | None = None,
        worker: dict[str, object] | None = None,
    ) -> Standin:
        root = tmp_path / f"binder-{len(started)}"
        for folder in ("pids", "outputs", "reports"):
            (root / folder).mkdir(parents=True)
        port, admin_port = free_port(), free_port()

        write_properties(
            root / "WorkerDispatcher.properties",
            {
                "BinderAddress": "127.0.0.1",
                "BinderPort": port,
                "ReportsLocationDir": f"{root}/reports/",
                "UseSSL": "off",
                "LabStandinWorkerStartDelayMs": 0,
                "LabStandinReconnectDelayMs": 50,
                **(worker or {}),
            },
        )
        script = root / "submit.sh"
        script.write_text(
            SUBMIT_SCRIPT.format(
                python=sys.executable,
                properties=root / "WorkerDispatcher.properties",
                outputs=root / "outputs",
                pids=root / "pids",
            )
        )
        script.chmod(0o755)
        write_properties(
            root / "binder.properties",
            {
                "ListeningPort": port,
                "AdminPort": admin_port,
                "CEs": "Site-A",
                "Site-A_CE": FULL_CE,
                "Site-A_ApplicationList": "TEST EXTERNAL",
                "MinPoolSize": pool,
                "DefaultMinJobsOnCE": max(pool, 1),
                "DefaultMaxJobsOnCE": max(pool, 1),
                "HTMLFileCreationInterval": 1,
                "UseSSL": "off",
                "JobSubmissionType": "script",
                "Script": "./submit.sh",
                "LabStandinFirstSubmitDelayMs": 200,
                "LabStandinRefillTickMs": 200,
                "LabStandinStatusTickMs": 200,
                **(binder or {}),
            },
        )

        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(root / "binder.log", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-S", "-m", "lab.standin.binder", "binder.properties"],
                cwd=root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        standin = Standin(root, port, admin_port, process)
        started.append(standin)
        standin.wait_log(r"Start listening on port: \d+\.")
        return standin

    yield start
    for standin in started:
        standin.kill()


def wait_dead(pid: int, timeout: float = 5.0) -> None:
    """Wait until `pid` is gone or a zombie (it is not our child, so we cannot reap it)."""

    def probe() -> tuple[bool, str]:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True, "gone"
        return state == "Z", f"state {state}"

    wait_for(f"process {pid} to die", probe, timeout=timeout, interval=0.02)


def stamp(line_time: str) -> float:
    return datetime.strptime(line_time, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_pool_fills_to_min_pool_size(start_standin: StartStandin) -> None:
    standin = start_standin(pool=4)

    answer = standin.wait_ready(4)

    assert answer.ces[0].full_name == FULL_CE
    assert answer.ces[0].short_name == "Site-A"
    assert answer.ces[0].app_description == (
        "CE: Site-A is filtered: [TEST, EXTERNAL], currently supported apps: [TEST]."
    )
    job_ids = standin.job_ids()
    assert len(job_ids) == 4
    assert sorted(int(job.split("-")[1]) for job in job_ids) == [0, 1, 2, 3]
    for job in job_ids:
        millis = job.split("-")[0]
        assert (
            f"Executing script './submit.sh {FULL_CE} Started_at_{millis} {job}'..."
            in standin.messages()
        )
        assert f"PROCESS JOBID: {job}. Output: worker for {job} started" in standin.messages()
        report = (standin.root / "reports" / job).read_text()
        assert "Job Status sent to the binder: READY." in report
    assert standin.messages().count("Adding worker job.") == 4
    assert all(LOG_LINE.match(line) or line.startswith("\t") for line in standin.log.splitlines())


def test_test_job_is_relayed_end_to_end(start_standin: StartStandin) -> None:
    standin = start_standin(pool=2)
    standin.wait_ready(2)

    outcome = client.test_job_sync("127.0.0.1", standin.port, ("ping", "pong"))

    assert isinstance(outcome, client.Success), outcome
    assert outcome.replies == ("Binder ping", "Binder pong")
    assert outcome.ce == FULL_CE
    assert outcome.job_id in standin.job_ids()
    assert f"Started_at_{outcome.job_id.split('-')[0]}" in outcome.worker_routing
    standin.wait_log(rf"Reusing worker job JobID: {outcome.job_id}:1\.")
    messages = standin.messages()
    assert "Worker and client matched. Starting handler thread..." in messages
    assert "Received from client ping" in messages
    assert "Sent to client Binder pong" in messages
    assert any(m.startswith("End exchanging data between CLIENT 127.0.0.1:") for m in messages)
    standin.wait_ready(2)


def test_refusal_when_no_worker_exists(start_standin: StartStandin) -> None:
    standin = start_standin(pool=0)

    outcome = client.test_job_sync("127.0.0.1", standin.port)

    assert isinstance(outcome, client.Refused), outcome
    assert outcome.reason == wire.NO_READY_JOBS
    with socket.create_connection(("127.0.0.1", standin.port), timeout=5) as sock:
        sock.sendall(wire.encode_client_header(wire.ClientHeader()))
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer == wire.REFUSAL
    assert "No ready jobs on CEs: ." in standin.messages()
    assert client.query_sync("127.0.0.1", standin.port).ces == ()


def test_busy_pool_refuses_instead_of_queueing(start_standin: StartStandin) -> None:
    standin = start_standin(pool=1)
    standin.wait_ready(1)

    with socket.create_connection(("127.0.0.1", standin.port), timeout=5) as held:
        held.sendall(wire.encode_client_header(wire.ClientHeader()))
        source = wire.SocketSource(held)
        worker = source.read(wire.decode_worker_header())
        assert source.read(wire.decode_worker_response()).error_description == ""

        outcome = client.test_job_sync("127.0.0.1", standin.port)
        assert isinstance(outcome, client.Refused), outcome

        held.sendall(wire.encode_string("ping"))
        assert source.read(wire.decode_string()) == "Binder ping"
        held.sendall(wire.encode_string("ENOUGH"))
        assert held.recv(1) == b""
    standin.wait_log(rf"Reusing worker job JobID: {worker.job_id}:1\.")


def test_killed_ready_worker_is_found_only_by_a_client(start_standin: StartStandin) -> None:
    standin = start_standin(pool=1, binder={"DefaultMaxSecsReusableJob": 1})
    standin.wait_ready(1)
    (job,) = standin.job_ids()

    pid = standin.worker_pid(job)
    os.kill(pid, signal.SIGKILL)
    wait_dead(pid)

    assert standin.wait_ready(1).total_ready == 1  # the dead entry still counts
    outcome = client.test_job_sync("127.0.0.1", standin.port)
    assert isinstance(outcome, client.ClosedWithoutData), outcome
    standin.wait_log(r"Error while transmitting data between CLIENT")
    standin.wait_log(rf"CE: Site-A, Job {job}:0 did not reconnect in time and is removed\.")
    standin.wait_ready(1)
    assert len(standin.job_ids()) == 2


def test_worker_gives_up_after_its_runs(start_standin: StartStandin) -> None:
    standin = start_standin(
        pool=1, binder={"DefaultMaxSecsReusableJob": 1}, worker={"LabStandinWorkerRuns": 2}
    )
    standin.wait_ready(1)
    (job,) = standin.job_ids()

    for _ in range(2):
        standin.wait_ready(1)
        outcome = client.test_job_sync("127.0.0.1", standin.port)
        assert isinstance(outcome, client.Success) and outcome.job_id == job, outcome

    wait_dead(standin.worker_pid(job))
    standin.wait_log(rf"Job {job}:1 did not reconnect in time and is removed\.")
    standin.wait_ready(1)
    assert len(standin.job_ids()) == 2


def test_unknown_worker_is_refused_with_no_bytes(start_standin: StartStandin) -> None:
    standin = start_standin(pool=0)
    header = wire.WorkerHeader(job_id="1-0", ce_name=FULL_CE)

    with socket.create_connection(("127.0.0.1", standin.port), timeout=5) as sock:
        sock.sendall(wire.encode_worker_header(header))
        assert sock.recv(1) == b""

    standin.wait_log(r"Worker job 1-0 does not exist in pool\.")
    standin.wait_log(r"WorkerJob not added to the pool\. Worker socket is closed\.")


def test_admin_port_shuts_the_binder_down(start_standin: StartStandin) -> None:
    standin = start_standin(pool=0)

    with socket.create_connection(("127.0.0.1", standin.admin_port), timeout=5) as sock:
        sock.sendall(b"shutdown\n")
    standin.wait_log(r"Invalid admin shutdown command 'shutdown' received")
    assert client.query_sync("127.0.0.1", standin.port).ces == ()

    with socket.create_connection(("127.0.0.1", standin.admin_port), timeout=5) as sock:
        sock.sendall(b"SHUTDOWN\n")
    assert standin.process.wait(timeout=10) == 0
    assert "Admin connected from localhost, shutting down binder service..." in (standin.messages())
    with pytest.raises(QueryFailed):
        client.query_sync("127.0.0.1", standin.port)


def test_properties_are_read_like_java(tmp_path: Path) -> None:
    path = tmp_path / "binder.properties"
    path.write_text(
        "# comment\n! other comment\n\n"
        "ListeningPort = 4566\n"
        "DefaultMaxJobsOnCE=4\n"
        "Site-A_CE = cluster1.csk.kg.ac.rs:8443/cream-pbs-aegis\n"
        "gstatHomeURL: http://example/gstat/\n"
        "Site-A_ApplicationList = TEST \\\n    EXTERNAL\n"
        "Empty\n"
    )

    assert read_properties(str(path)) == {
        "ListeningPort": "4566",
        "DefaultMaxJobsOnCE": "4",
        "Site-A_CE": "cluster1.csk.kg.ac.rs:8443/cream-pbs-aegis",
        "gstatHomeURL": "http://example/gstat/",
        "Site-A_ApplicationList": "TEST EXTERNAL",
        "Empty": "",
    }


def test_binder_refuses_to_start_with_ssl_on(tmp_path: Path) -> None:
    write_properties(tmp_path / "binder.properties", {"ListeningPort": free_port(), "CEs": "A"})

    done = subprocess.run(
        [sys.executable, "-S", "-m", "lab.standin.binder", "binder.properties"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode == 1
    assert re.search(r"ERROR \[yu\.ac\.bg\.rcub\.binder\.Binder\] .* Could not listen", done.stdout)
    assert "set `UseSSL = off`" in done.stdout


def test_second_binder_on_a_taken_admin_port_exits(
    start_standin: StartStandin, tmp_path: Path
) -> None:
    first = start_standin(pool=0)
    properties = (first.root / "binder.properties").read_text()
    properties = properties.replace(
        f"ListeningPort = {first.port}", f"ListeningPort = {free_port()}"
    )
    (tmp_path / "binder.properties").write_text(properties)

    done = subprocess.run(
        [sys.executable, "-S", "-m", "lab.standin.binder", "binder.properties"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode == 1
    assert f"Unable to listen on port: {first.admin_port}" in done.stdout
    assert "Start listening" not in done.stdout


def test_many_concurrent_clients_get_an_answer_each(start_standin: StartStandin) -> None:
    standin = start_standin(pool=4, worker={"LabStandinReconnectDelayMs": 0})
    standin.wait_ready(4)

    async def crowd() -> list[client.JobOutcome]:
        jobs = [client.test_job("127.0.0.1", standin.port, deadline=30) for _ in range(200)]
        return await asyncio.gather(*jobs)

    kinds = [outcome.KIND for outcome in asyncio.run(crowd())]

    assert set(kinds) <= {"success", "refused"}, kinds
    assert "success" in kinds


def test_known_truth_reconnect_delay(start_standin: StartStandin) -> None:
    """A set reconnect delay is what the client measures, within 5 % or 50 ms."""
    delay = 0.6
    standin = start_standin(pool=1, worker={"LabStandinReconnectDelayMs": int(delay * 1000)})
    standin.wait_ready(1)

    outcome = client.test_job_sync("127.0.0.1", standin.port)
    assert isinstance(outcome, client.Success), outcome
    session_end = outcome.started + outcome.latency
    back = poll_until_ready(standin.port, timeout=delay + 5)
    measured = back - session_end

    assert abs(measured - delay) <= max(0.05 * delay, 0.05), f"measured {measured:.3f} s"


def poll_until_ready(port: int, timeout: float) -> float:
    """Query every 2 ms; return when (monotonic) the first READY answer was asked for."""
    deadline = time.monotonic() + timeout
    last: object = "no answer yet"
    while time.monotonic() < deadline:
        asked = time.monotonic()
        last = client.query_sync("127.0.0.1", port)
        if isinstance(last, client.QueryAnswer) and last.total_ready:
            return asked
        time.sleep(0.002)
    raise AssertionError(f"no READY job within {timeout} s; last answer: {last}")


def test_known_truth_first_submit_delay(start_standin: StartStandin) -> None:
    """The first submission follows `Start listening` by LabStandinFirstSubmitDelayMs."""
    delay = 1.0
    standin = start_standin(pool=1, binder={"LabStandinFirstSubmitDelayMs": int(delay * 1000)})
    standin.wait_ready(1)

    listening = standin.wait_log(r"(?m)^(\S+ \S+) INFO  \S+ \(main\) Start listening")
    submitted = standin.wait_log(r"(?m)^(\S+ \S+) DEBUG \S+ \(Thread-2\) Executing script")
    measured = stamp(submitted.group(1)) - stamp(listening.group(1))

    assert abs(measured - delay) <= max(0.05 * delay, 0.05), f"measured {measured:.3f} s"
