"""The stand-in worker: WorkerDispatcher's handshake and the TEST handler, looped like the script.

    python3 -m lab.standin.worker <WorkerDispatcher.properties> <fullCE> <routing> <jobid>
        <logfile> [<max wall minutes, default 1000>] [finished]

One process plays the whole `startBinderJobLocal.sh` loop: after `LabStandinWorkerStartDelayMs`
it connects, announces READY with the application list " TEST", serves one client, closes,
and after `LabStandinReconnectDelayMs` connects again with the same job id, up to
`LabStandinWorkerRuns` times. A refused or failed connection uses up a run, as a JVM would.

Keys read from the properties file: BinderAddress, BinderPort (required), UseSSL (must be
off), ReportsLocationDir, and the stand-in keys `LabStandinWorkerStartDelayMs` (150),
`LabStandinReconnectDelayMs` (100), `LabStandinWorkerRuns` (50) and
`LabStandinServiceDelayMs` (0, a pause before each TEST reply).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from lab.errors import StandinConfigError, WireError
from lab.protocol import wire
from lab.standin import int_property, read_properties, require_plain_tcp, sleep_until

USAGE = (
    "usage: python3 -m lab.standin.worker <WorkerDispatcher.properties> <fullCE> <routing> "
    "<jobid> <logfile> [<max wall minutes>] [finished]"
)
APPLICATION_LIST = " TEST"
CONNECT_TIMEOUT = 10.0
RULE = "=" * 78


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker takes from WorkerDispatcher.properties."""

    binder_address: str
    binder_port: int
    reports_dir: str
    start_delay_s: float
    reconnect_delay_s: float
    runs: int
    service_delay_s: float

    @classmethod
    def from_properties(cls, props: dict[str, str]) -> WorkerSettings:
        require_plain_tcp(props)
        port = int_property(props, "BinderPort", -1)
        if not 0 < port < 65536:
            raise StandinConfigError("BinderPort is missing or not a port number: set it")

        def seconds(key: str, default: int) -> float:
            return max(0, int_property(props, key, default)) / 1000

        return cls(
            binder_address=props.get("BinderAddress", "localhost"),
            binder_port=port,
            reports_dir=props.get("ReportsLocationDir", ""),
            start_delay_s=seconds("LabStandinWorkerStartDelayMs", 150),
            reconnect_delay_s=seconds("LabStandinReconnectDelayMs", 100),
            runs=max(1, int_property(props, "LabStandinWorkerRuns", 50)),
            service_delay_s=seconds("LabStandinServiceDelayMs", 0),
        )


@dataclass(frozen=True)
class JobArguments:
    """The dispatcher's positional arguments."""

    properties_path: str
    ce_name: str
    routing: str
    job_id: str
    log_file: str
    max_wall_minutes: str = "1000"
    finished: bool = False

    @classmethod
    def parse(cls, argv: list[str]) -> JobArguments:
        if not 5 <= len(argv) <= 7 or (len(argv) == 7 and argv[6].lower() != "finished"):
            raise StandinConfigError(USAGE)
        properties_path, ce_name, routing, job_id, log_file = argv[:5]
        return cls(
            properties_path,
            ce_name,
            routing,
            job_id,
            log_file,
            max_wall_minutes=argv[5] if len(argv) >= 6 else "1000",
            finished=len(argv) == 7,
        )


class RunLog:
    """The job's log file, rewritten by every run as the real dispatcher's JVM does."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: TextIO | None = None

    def open(self) -> None:
        self.close()
        try:
            self.file = open(self.path, "w", encoding="utf-8")
        except OSError as exc:
            print(f"Worker: cannot open log file {self.path}: {exc.strerror}", file=sys.stderr)

    def line(self, text: str) -> None:
        if self.file is not None:
            self.file.write(text + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def serve_once(args: JobArguments, settings: WorkerSettings, log: RunLog) -> None:
    """One run: connect, announce READY, serve one TEST client (or be refused), close."""
    log.line("Worker Dispatcher started...")
    log.line(
        f"CE full name: {args.ce_name}\nProperties path: {args.properties_path}\n"
        f"JobID: {args.job_id}"
    )
    log.line("Started new worker thread!")
    sock: socket.socket | None = None
    try:
        log.line(f"Binder adr = {settings.binder_address} Binder port = {settings.binder_port}")
        sock = socket.create_connection(
            (settings.binder_address, settings.binder_port), timeout=CONNECT_TIMEOUT
        )
        # A READY worker waits for its client as long as it takes, as the real one does.
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        source = wire.SocketSource(sock)

        status = wire.JobStatus.FINISHED if args.finished else wire.JobStatus.READY
        announce(sock, args, status, log)
        if args.finished:
            return
        client = await_client(sock, source, args, log)
        serve_test(sock, source, settings, log, client)
    except (OSError, WireError) as exc:
        log.line(f"*** ERR *** Error executing handler thread!\n{type(exc).__name__}: {exc}")
    finally:
        if sock is not None:
            sock.close()
            log.line("Disconnected from the binder.")
        log.line("Worker finished.")


def announce(sock: socket.socket, args: JobArguments, status: wire.JobStatus, log: RunLog) -> None:
    header = wire.WorkerHeader(
        job_id=args.job_id,
        ce_name=args.ce_name,
        application_list=APPLICATION_LIST,
        max_wallclock_minutes=args.max_wall_minutes,
        job_status=status,
    )
    log.line(f"Application list: {APPLICATION_LIST}")
    log.line(f"Job Status sent to the binder: {status.name}.")
    log.line("Access string: ''.")
    log.line(f"MaxWallClockTime: {args.max_wall_minutes}.")
    sock.sendall(wire.encode_worker_header(header))
    log.line("Worker started; starting header exchange.")


def await_client(
    sock: socket.socket, source: wire.SocketSource, args: JobArguments, log: RunLog
) -> wire.ClientHeader:
    """Block until the binder forwards a client header; answer with the worker response."""
    client = source.read(wire.decode_client_header())
    log.line(f"Client protocol version: {client.version}")
    log.line(f"Application ID: {client.application_id}")
    log.line(f"Routing info received from client: {client.routing_info}")

    host, port = sock.getsockname()[:2]
    routing = (
        f"{client.routing_info}\n\tWorker => {host} : {port}"
        f"\n\t\tReceived from starting script: {args.routing}"
    )
    sock.sendall(wire.encode_worker_response(wire.WorkerResponse(routing_info=routing)))
    log.line("Starting appropriate handler thread...")
    return client


def serve_test(
    sock: socket.socket,
    source: wire.SocketSource,
    settings: WorkerSettings,
    log: RunLog,
    client: wire.ClientHeader,
) -> None:
    """TestWorkerHandler: answer each ball with "Binder <ball>" until `enough`."""
    if client.access_string:
        log.line(f"Unsupported communication type chosen ({client.access_string!r}).")
        return
    log.line("Communication via binder chosen.")
    if client.application_id != "TEST":
        log.line(
            f"*** ERR *** Worker Handler class not found! (stand-in serves TEST only, "
            f"not {client.application_id})"
        )
        return
    log.line(RULE)
    log.line("Started a new TEST worker handler thread!")
    try:
        while True:
            ball = source.read(wire.decode_byte_array())
            text = ball.decode("utf-8", errors="replace")
            log.line(f"Received: {text}")
            if text.lower() == "enough":
                break
            if settings.service_delay_s:
                sleep_until(time.monotonic() + settings.service_delay_s)
            log.line(f"Returning: Binder {text}")
            sock.sendall(wire.encode_byte_array(b"Binder " + ball))
    except (OSError, WireError) as exc:
        log.line(f"*** ERROR ***   Unknown error occured.\n{type(exc).__name__}: {exc}")
    log.line("Test worker handler end.")
    log.line(RULE)


def main(argv: list[str]) -> int:
    started = time.monotonic()
    try:
        args = JobArguments.parse(argv)
        settings = WorkerSettings.from_properties(read_properties(args.properties_path))
    except StandinConfigError as exc:
        print(f"Worker: {exc}", file=sys.stderr)
        return 1

    if settings.reports_dir:
        os.makedirs(settings.reports_dir, exist_ok=True)
    # ReportsLocationDir and the file name are joined without a separator, as in WorkBinder.
    log = RunLog(settings.reports_dir + args.log_file)

    sleep_until(started + settings.start_delay_s)
    for run in range(settings.runs):
        log.open()
        serve_once(args, settings, log)
        ended = time.monotonic()
        if args.finished or run == settings.runs - 1:
            break
        sleep_until(ended + settings.reconnect_delay_s)
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
