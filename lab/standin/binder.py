"""The stand-in binder: WorkBinder's pool, relay and log lines for the TEST application.

Run it as `python3 -m lab.standin.binder binder.properties` from the folder its `Script`
is relative to. It reads WorkBinder's own keys plus these stand-in keys, which WorkBinder
ignores:

* `LabStandinFirstSubmitDelayMs` (3000): from `Start listening` to the first refill tick;
* `LabStandinRefillTickMs` (3000): period of the refill (panic) tick;
* `LabStandinStatusTickMs` (5000): period of the per-CE timeout pass;
* `LabStandinBindAddress` (127.0.0.1): address of the client port.

Log lines go to stdout in WorkBinder's log4j layout, with the real message texts and logger
names, so the lab's observer reads both binders alike. Lines from the logger
`lab.standin.binder` exist only here (they name the job where WorkBinder does not).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import IO, Any

from lab.errors import PeerClosed, StandinConfigError, WireError
from lab.protocol import wire
from lab.protocol.wire import ConnectionType, JobStatus
from lab.standin import int_property, read_properties, require_plain_tcp

# Logger names are WorkBinder's class names: they are part of the log format the lab parses.
LOG_BINDER = logging.getLogger("yu.ac.bg.rcub.binder.Binder")
LOG_POOL = logging.getLogger("yu.ac.bg.rcub.binder.BinderPool")
LOG_CE = logging.getLogger("yu.ac.bg.rcub.binder.ComputingElement")
LOG_LISTENER = logging.getLogger("yu.ac.bg.rcub.binder.BinderListenerThread")
LOG_HANDLER = logging.getLogger("yu.ac.bg.rcub.binder.handler.BinderHandlerThread")
LOG_TEST = logging.getLogger("yu.ac.bg.rcub.binder.test.TestBinderHandler")
LOG_SUBMIT = logging.getLogger("yu.ac.bg.rcub.binder.job.submit.script.ScriptSubmit")
LOG_ADMIN = logging.getLogger("yu.ac.bg.rcub.binder.admin.AdminListener")
LOG_EXTRA = logging.getLogger("lab.standin.binder")

# The Java binder runs one thread per role; its log names the thread. Here each asyncio
# task says which thread it plays.
ACTOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("actor", default=None)

SCRIPT_OUTPUT_LINES = 16
LISTEN_BACKLOG = 50
ADMIN_READ_TIMEOUT = 10.0
ADMIN_MAX_CHARS = 1024
IDLE, ACTIVE = "IDLE", "ACTIVE"
REGULAR, FULL_THROTTLE = "REGULAR", "FULL_THROTTLE"


class Log4jFormatter(logging.Formatter):
    """`yyyy-mm-dd HH:MM:SS,mmm LEVEL [logger] (thread) message`, as WorkBinder's log4j.xml."""

    LEVELS = {"WARNING": "WARN", "CRITICAL": "FATAL"}

    def format(self, record: logging.LogRecord) -> str:
        level = self.LEVELS.get(record.levelname, record.levelname)
        thread = ACTOR.get() or record.threadName
        stamp = self.formatTime(record)
        return f"{stamp} {level:<5} [{record.name}] ({thread}) {record.getMessage()}"


def configure_logging(stream: IO[str]) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(Log4jFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # As WorkBinder's log4j.xml: everything at INFO, the binder's own loggers at DEBUG.
    root.setLevel(logging.INFO)
    for name in ("yu.ac.bg.rcub.binder", "lab.standin"):
        logging.getLogger(name).setLevel(logging.DEBUG)


# Configuration


@dataclass(frozen=True)
class CeConfig:
    """One CE from binder.properties, with its per-CE overrides applied."""

    short_name: str
    full_name: str
    min_jobs: int
    max_jobs: int
    esd_ms: int
    max_ready_s: int
    max_reusable_s: int
    coeff_ready_pct: int
    coeff_discarded_pct: int
    aged_multiplier: int
    app_filter: str | None  # "ANY", "NONE", a whitelist, or None when no key is set

    @classmethod
    def from_properties(cls, props: dict[str, str], short: str, full: str) -> CeConfig:
        def per_ce(key: str, default: int) -> int:
            fallback = int_property(props, f"Default{key}", default)
            return int_property(props, f"{short}_{key}", fallback)

        return cls(
            short_name=short,
            full_name=full,
            min_jobs=per_ce("MinJobsOnCE", 2),
            max_jobs=per_ce("MaxJobsOnCE", 5),
            esd_ms=per_ce("MaxSecsSubmittedJob", 1200) * 1000,
            max_ready_s=per_ce("MaxSecsReadyJob", 3600),
            max_reusable_s=per_ce("MaxSecsReusableJob", 30),
            coeff_ready_pct=per_ce("MaxSecsSubmittedJobCorrectiveCoefficientForReadyJobs", 5),
            coeff_discarded_pct=per_ce(
                "MaxSecsSubmittedJobCorrectiveCoefficientForDiscardedJobs", 30
            ),
            # WorkBinder reads the per-CE override of the multiplier from the ready-jobs
            # coefficient's key; the stand-in keeps that quirk.
            aged_multiplier=int_property(
                props,
                f"{short}_MaxSecsSubmittedJobCorrectiveCoefficientForReadyJobs",
                int_property(props, "DefaultMultiplicationCoefficientForMaxSecsAgedJobs", 5),
            ),
            app_filter=props.get(f"{short}_ApplicationList", props.get("DefaultApplicationList")),
        )


@dataclass(frozen=True)
class BinderConfig:
    """The binder.properties keys the stand-in uses."""

    listening_port: int
    admin_port: int
    shutdown_command: str
    bind_address: str
    min_pool_size: int
    ces: tuple[CeConfig, ...]
    script: str
    html_file: str
    html_interval_s: int
    gstat_url: str
    idle_timeout_s: int
    panic_ce_percent: int
    copy_script_output: bool
    first_submit_delay_s: float
    refill_tick_s: float
    status_tick_s: float

    @classmethod
    def from_properties(cls, props: dict[str, str]) -> BinderConfig:
        require_plain_tcp(props)
        submission = props.get("JobSubmissionType", "INTERNAL").strip()
        if submission.lower() == "internal":
            raise StandinConfigError(
                "JobSubmissionType is INTERNAL (a missing key means INTERNAL), which needs a "
                "grid: set `JobSubmissionType = script`"
            )
        short_names = props.get("CEs", "").split()
        if not short_names:
            raise StandinConfigError("no CEs: set `CEs = <short names>` and a `<short>_CE` each")
        ces = []
        for short in short_names:
            full = props.get(f"{short}_CE", "").strip()
            if not full:
                LOG_POOL.info(
                    "CE %s is skipped because it has invalid path name in binder properties.",
                    short,
                )
                continue
            ces.append(CeConfig.from_properties(props, short, full))

        def millis(key: str, default: int) -> float:
            return max(0, int_property(props, key, default)) / 1000

        return cls(
            listening_port=int_property(props, "ListeningPort", 8731),
            admin_port=int_property(props, "AdminPort", 5006),
            shutdown_command=props.get("ShutDownCommand", "SHUTDOWN"),
            bind_address=props.get("LabStandinBindAddress", "127.0.0.1"),
            min_pool_size=int_property(props, "MinPoolSize", 15),
            ces=tuple(ces),
            script=props.get("Script", "bin/submitRemoteJob.sh"),
            html_file=props.get("HtmlFileName", "PoolStatus.html"),
            html_interval_s=int_property(props, "HTMLFileCreationInterval", 120),
            gstat_url=props.get("gstatHomeURL", ""),
            idle_timeout_s=int_property(props, "IdleTimeout", 900),
            panic_ce_percent=int_property(props, "PanicModeCEPercent", 30),
            copy_script_output=props.get("PROCESS_TWEAK_ENABLED", "yes").lower() == "yes",
            first_submit_delay_s=millis("LabStandinFirstSubmitDelayMs", 3000),
            refill_tick_s=max(0.001, millis("LabStandinRefillTickMs", 3000)),
            status_tick_s=max(0.001, millis("LabStandinStatusTickMs", 5000)),
        )


# Pool state


@dataclass(eq=False)
class WorkerLink:
    """A READY worker's open connection, which nobody reads until a client is matched."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    header: wire.WorkerHeader
    peer: str


@dataclass(eq=False)
class Job:
    job_id: str
    status: JobStatus
    status_since: float  # time.monotonic() of the last state change
    active_since: float = 0.0  # first READY; the worker's wall time counts from here
    instance: int = 0
    max_wall_ms: int = 0
    link: WorkerLink | None = None


@dataclass(frozen=True)
class Counts:
    ready: int = 0
    busy: int = 0
    submitted: int = 0
    reusable: int = 0
    aged: int = 0

    @property
    def live(self) -> int:
        """Jobs that count against the CE cap: aged ones do not."""
        return self.ready + self.busy + self.submitted + self.reusable


class CeState:
    """One CE's job table, ESD and supported applications."""

    def __init__(self, config: CeConfig) -> None:
        self.config = config
        self.esd_ms = config.esd_ms
        self.jobs: dict[str, Job] = {}
        self.apps: list[str] | None = None  # none until the first worker announces its list

    def is_aged(self, job: Job, now: float) -> bool:
        return job.status == JobStatus.SUBMITTED and (now - job.status_since) * 1000 > self.esd_ms

    def counts(self, now: float) -> Counts:
        tally = dict.fromkeys(("ready", "busy", "submitted", "reusable", "aged"), 0)
        for job in self.jobs.values():
            if job.status == JobStatus.SUBMITTED:
                tally["aged" if self.is_aged(job, now) else "submitted"] += 1
            else:
                tally[job.status.name.lower()] += 1
        return Counts(**tally)

    def filter_kind(self) -> str:
        if self.config.app_filter is None:
            return "NONE"
        kind = self.config.app_filter.strip().upper()
        return kind if kind in ("ANY", "NONE") else "FILTERED"

    def whitelist(self) -> list[str]:
        return (self.config.app_filter or "").split()

    def update_apps(self, announced: str) -> None:
        kind = self.filter_kind()
        if kind == "ANY":
            self.apps = list(dict.fromkeys(announced.split()))
        elif kind == "FILTERED":
            allowed = set(self.whitelist())
            self.apps = [app for app in dict.fromkeys(announced.split()) if app in allowed]

    def supports(self, app: str) -> bool:
        return self.filter_kind() != "NONE" and self.apps is not None and app in self.apps

    def app_description(self) -> str:
        current = "[" + ", ".join(self.apps or []) + "]"
        prefix = f"CE: {self.config.short_name}"
        kind = self.filter_kind()
        if kind == "ANY":
            return f"{prefix} accepts any app, current list is: {current}."
        if kind == "NONE":
            return f"{prefix} is disabled in configuration (no app is allowed)."
        allowed = "[" + ", ".join(self.whitelist()) + "]"
        return f"{prefix} is filtered: {allowed}, currently supported apps: {current}."

    def can_perform(self, job: Job, now: float, required_ms: int) -> bool:
        used_ms = (now - job.active_since) * 1000
        return job.status == JobStatus.READY and used_ms + required_ms <= job.max_wall_ms

    def available(self, now: float, required_ms: int) -> int:
        return sum(self.can_perform(job, now, required_ms) for job in self.jobs.values())


def _peer(writer: asyncio.StreamWriter) -> str:
    address = writer.get_extra_info("peername")
    return f"{address[0]}:{address[1]}" if address else "?"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _wallclock_ms(minutes: str) -> int:
    try:
        return int(minutes.strip()) * 60_000
    except ValueError:
        return 0


class StandinBinder:
    """The pool, its timers and the connection handlers, all on one asyncio loop."""

    def __init__(self, config: BinderConfig) -> None:
        self.config = config
        self.ces = [CeState(ce) for ce in config.ces]
        self.by_name = {ce.config.full_name: ce for ce in self.ces}
        self.mode = IDLE
        self.strategy = REGULAR
        self.sessions = 0
        self.last_match = float("-inf")
        self.matched_in_interval = 0
        self.clients_per_interval = 0
        self.frequency = 0.0
        self.job_numbers = itertools.count()
        self.reader_threads = itertools.count(3)
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopped = asyncio.Event()

    async def run(self) -> int:
        """Serve until the admin port gets the shutdown command; return the exit status."""
        ACTOR.set("main")
        admin = await self._open_admin_port()
        if admin is None:
            return 1
        try:
            server = await asyncio.start_server(
                self._on_connection,
                self.config.bind_address,
                self.config.listening_port,
                backlog=LISTEN_BACKLOG,
            )
        except OSError as exc:
            LOG_BINDER.error("Could not listen on port: %d.", self.config.listening_port)
            LOG_EXTRA.error("stand-in: %s", _describe(exc))
            return 1
        LOG_BINDER.info("Start listening on port: %d.", self.config.listening_port)
        listening_since = time.monotonic()

        for ce in self.ces:
            LOG_POOL.info("Adding new CE to the pool %s...", ce.config.short_name)
        self._spawn(self._refill_loop(listening_since))
        self._spawn(self._status_loop())
        self._spawn(self._html_loop())

        await self.stopped.wait()
        server.close()
        admin.close()
        return 0

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # Admin port

    async def _open_admin_port(self) -> asyncio.Server | None:
        token = ACTOR.set("Thread-0")
        try:
            admin = await asyncio.start_server(
                self._on_admin, "127.0.0.1", self.config.admin_port, backlog=1
            )
            LOG_ADMIN.info("Admin listener thread started...")
            return admin
        except OSError as exc:
            LOG_ADMIN.error("Unable to listen on port: %d\n%s", self.config.admin_port, exc)
            return None
        finally:
            ACTOR.reset(token)

    async def _on_admin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ACTOR.set("Thread-0")
        command = bytearray()
        try:
            async with asyncio.timeout(ADMIN_READ_TIMEOUT):
                while len(command) < ADMIN_MAX_CHARS:
                    char = await reader.read(1)
                    if not char or char[0] < 32:  # a control character or EOF ends the command
                        break
                    command += char
        except (TimeoutError, OSError) as exc:
            LOG_ADMIN.warning("Admin command read error\n%s", _describe(exc))
        writer.close()

        text = command.decode("latin-1")
        if text != self.config.shutdown_command:
            LOG_ADMIN.warning("Invalid admin shutdown command '%s' received", text)
            return
        LOG_ADMIN.info("Admin connected from localhost, shutting down binder service...")
        self.stopped.set()

    # Client port: one connection, whatever its type

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        ACTOR.set("ListenerThread")
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        LOG_LISTENER.debug("Binder listener thread started...")
        source = wire.StreamSource(reader)
        try:
            preamble = await source.read(wire.decode_preamble())
            if preamble.version != wire.PROTOCOL_VERSION:
                LOG_LISTENER.warning("Protocol version not valid: %d", preamble.version)
            if preamble.connection_type == ConnectionType.WORKER:
                worker = await source.read(wire.decode_worker_header(preamble))
                self._on_worker(worker, reader, writer)
            else:
                client = await source.read(wire.decode_client_header(preamble))
                if preamble.connection_type == ConnectionType.CE_QUERY:
                    await self._on_query(client, writer)
                else:
                    await self._on_client(client, reader, writer)
        except PeerClosed:
            LOG_LISTENER.info("EOF reached, ending listener thread.")
            writer.close()
        except (OSError, WireError) as exc:
            LOG_LISTENER.error(
                "Error while reading protocol header. This request is skiped and socket is "
                "closed.\n%s",
                _describe(exc),
            )
            writer.close()
        LOG_LISTENER.debug("Binder listener thread ended.")

    async def _on_query(self, header: wire.ClientHeader, writer: asyncio.StreamWriter) -> None:
        LOG_LISTENER.info("Processing CE_QUERY for %s.", header.application_id)
        LOG_POOL.debug("Clients candidateCEs: '%s'.", header.candidate_ces)
        now = time.monotonic()
        entries = [
            wire.CeEntry(
                full_name=ce.config.full_name,
                short_name=ce.config.short_name,
                ready_jobs=ce.available(now, header.required_wallclock_ms),
                app_description=ce.app_description(),
            )
            for ce in self._candidates(header)
        ]
        writer.write(wire.encode_ce_query_answer(entries))
        await writer.drain()
        writer.close()

    async def _on_client(
        self,
        header: wire.ClientHeader,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        matched = self._match(header)
        if matched is None:
            LOG_LISTENER.warning("Client candidateCEs: %s.", header.candidate_ces)
            LOG_LISTENER.warning(
                "Could not find appropriate worker job in the pool. Client socket in closed."
            )
            LOG_LISTENER.warning(
                "yu.ac.bg.rcub.binder.BinderCommunicationException: %s", wire.NO_READY_JOBS
            )
            writer.write(wire.REFUSAL)
            await writer.drain()
            writer.close()
            return

        ce, job = matched
        LOG_LISTENER.debug("Worker and client matched. Starting handler thread...")
        self.sessions += 1
        self.matched_in_interval += 1
        self.last_match = time.monotonic()
        self.mode = ACTIVE
        self._spawn(self._session(header, ce, job, reader, writer))

    # Workers

    def _on_worker(
        self,
        header: wire.WorkerHeader,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if header.job_status == JobStatus.FINISHED:
            LOG_LISTENER.debug(
                "WorkerJob (JobID:%s) informed that it has finished, it will be removed.",
                header.job_id,
            )
            ce = self.by_name.get(header.ce_name)
            if ce is not None:
                self._remove_waiting(ce, header.job_id)
            writer.close()
            return

        link = WorkerLink(reader, writer, header, _peer(writer))
        if not self._add_worker(link):
            LOG_LISTENER.warning("WorkerJob not added to the pool. Worker socket is closed.")
            writer.close()

    def _add_worker(self, link: WorkerLink) -> bool:
        header = link.header
        ce = self.by_name.get(header.ce_name)
        if ce is None:
            LOG_POOL.debug("Error, no such CE %s", header.ce_name)
            return False

        now = time.monotonic()
        if ce.counts(now).ready >= self._cap(ce):
            LOG_POOL.debug(
                "Error, CE %s has already reached a maximum number of worker jobs.",
                header.ce_name,
            )
            self._remove_waiting(ce, header.job_id)
            return False

        LOG_POOL.debug("Trying to add worker job to CE %s", header.ce_name)
        ce.update_apps(header.application_list)
        LOG_POOL.debug("%s", ce.app_description())
        if self._submitted_to_ready(ce, link, now):
            return True
        return self._reusable_to_ready(ce, link, now)

    def _submitted_to_ready(self, ce: CeState, link: WorkerLink, now: float) -> bool:
        job = ce.jobs.get(link.header.job_id)
        if job is None or job.status != JobStatus.SUBMITTED:
            return False
        name = ce.config.full_name
        LOG_CE.debug("Adding worker job.")
        LOG_CE.debug("ComputingElement %s: submitted->ready old EMMSJ %dms.", name, ce.esd_ms)
        delay_ms = (now - job.status_since) * 1000
        ce.esd_ms += int((delay_ms - ce.esd_ms) * ce.config.coeff_ready_pct / 100)
        LOG_CE.debug("ComputingElement %s: submitted->ready new EMMSJ %dms.", name, ce.esd_ms)

        job.status = JobStatus.READY
        job.status_since = job.active_since = now
        job.max_wall_ms = _wallclock_ms(link.header.max_wallclock_minutes)
        job.link = link
        LOG_EXTRA.debug("Job %s is READY after %.0f ms on CE %s.", job.job_id, delay_ms, name)
        return True

    def _reusable_to_ready(self, ce: CeState, link: WorkerLink, now: float) -> bool:
        announced = link.header.job_id
        job_id = announced[: announced.rindex(":")] if announced.rfind(":") > 0 else announced
        job = ce.jobs.get(job_id)
        if job is None:
            LOG_CE.warning("Worker job %s does not exist in pool.", announced)
            return False
        if job.status != JobStatus.REUSABLE:
            LOG_CE.warning("Worker job %s is not in reusable state.", announced)
            return False

        job.status = JobStatus.READY
        job.status_since = now
        job.instance += 1
        job.max_wall_ms = _wallclock_ms(link.header.max_wallclock_minutes)
        job.link = link
        LOG_CE.debug("Reusing worker job JobID: %s:%d.", job.job_id, job.instance)
        return True

    def _remove_waiting(self, ce: CeState, job_id: str) -> None:
        """Forget a SUBMITTED or REUSABLE job, as WorkBinder does for a refused worker."""
        job = ce.jobs.get(job_id)
        if job is None:
            LOG_CE.warning("Worker job: %s not found.", job_id)
        elif job.status in (JobStatus.SUBMITTED, JobStatus.REUSABLE):
            del ce.jobs[job_id]
            LOG_CE.debug("Worker job: %s successfully removed.", job_id)

    # Matching and the session

    def _candidates(self, header: wire.ClientHeader) -> list[CeState]:
        app = header.application_id
        if header.candidate_ces == "":
            return [ce for ce in self.ces if ce.supports(app)]
        chosen = []
        for name in header.candidate_ces.split(" "):
            if not name:
                continue
            ce = self.by_name.get(name)
            if ce is not None and ce.supports(app):
                chosen.append(ce)
            else:
                LOG_POOL.warning("Specified CE: '%s' not found or app not supported.", name)
        return chosen

    def _match(self, header: wire.ClientHeader) -> tuple[CeState, Job] | None:
        """Pick a random candidate CE, then its first READY job that has the wall time."""
        LOG_POOL.debug("Clients candidateCEs: '%s'.", header.candidate_ces)
        candidates = self._candidates(header)
        random.shuffle(candidates)
        now = time.monotonic()
        for ce in candidates:
            for job in ce.jobs.values():
                if ce.can_perform(job, now, header.required_wallclock_ms):
                    job.status = JobStatus.BUSY
                    job.status_since = now
                    LOG_EXTRA.debug("Job %s is BUSY.", job.job_id)
                    return ce, job
        LOG_POOL.info("No ready jobs on CEs: %s.", header.candidate_ces)
        return None

    async def _session(
        self,
        header: wire.ClientHeader,
        ce: CeState,
        job: Job,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        client = _peer(writer)
        ACTOR.set(f"BinderHandlerThread-{client.rsplit(':', 1)[0]}-{header.application_id}")
        link = job.link
        assert link is not None, "a BUSY job always has its worker's connection"
        between = f"CLIENT {client} and WORKER {link.peer}"
        LOG_HANDLER.debug("Start exchanging data between %s.", between)
        try:
            await self._exchange_headers(header, link, writer)
            if header.access_string:
                LOG_HANDLER.error(
                    "Error while starting application handler!\nstand-in: access string %r "
                    "(direct or custom mode) is not supported",
                    header.access_string,
                )
            elif header.application_id == "TEST":
                await self._relay_test(reader, writer, link)
            else:
                LOG_HANDLER.error(
                    "Error while starting application handler!\nstand-in: only TEST is "
                    "relayed, not %s",
                    header.application_id,
                )
        except (OSError, WireError) as exc:
            LOG_HANDLER.error(
                "Error while transmitting data between %s.\n%s", between, _describe(exc)
            )
        finally:
            LOG_HANDLER.debug("End exchanging data between %s.", between)
            writer.close()
            LOG_HANDLER.debug("Client socket closed.")
            link.writer.close()
            self._busy_to_reusable(job)
            LOG_HANDLER.debug("Worker socket closed.")

    async def _exchange_headers(
        self, header: wire.ClientHeader, link: WorkerLink, client: asyncio.StreamWriter
    ) -> None:
        # The worker's answer is awaited before the client gets any byte, so a client
        # matched to a dead worker sees a close with no data, as with WorkBinder.
        link.writer.write(wire.encode_client_header(header))
        await link.writer.drain()
        response = await wire.StreamSource(link.reader).read(wire.decode_worker_response())

        client.write(wire.encode_worker_header(link.header) + wire.encode_worker_response(response))
        await client.drain()
        LOG_HANDLER.debug("Client routing info: %s", header.routing_info)
        error = response.error_description
        suffix = f"\nWorker error description: {error}" if error else ""
        LOG_HANDLER.debug("Worker routing info: %s%s", response.routing_info, suffix)
        LOG_HANDLER.debug("Headers exchanged.")

    async def _relay_test(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: WorkerLink
    ) -> None:
        """TestBinderHandler: each ball to the worker and its answer back, until `enough`."""
        LOG_TEST.info("Started TEST binder handler.")
        client = wire.StreamSource(reader)
        worker = wire.StreamSource(link.reader)
        try:
            while True:
                # Relayed as raw bytes (same framing as a string) so nothing is re-encoded.
                ball = await client.read(wire.decode_byte_array())
                text = ball.decode("utf-8", errors="replace")
                LOG_TEST.info("Received from client %s", text)
                link.writer.write(wire.encode_byte_array(ball))
                await link.writer.drain()
                LOG_TEST.info("Sent to worker %s", text)
                if text.lower() == "enough":
                    return

                answer = await worker.read(wire.decode_byte_array())
                text = answer.decode("utf-8", errors="replace")
                LOG_TEST.info("Received from worker %s", text)
                writer.write(wire.encode_byte_array(answer))
                await writer.drain()
                LOG_TEST.info("Sent to client %s", text)
        except (OSError, WireError) as exc:
            LOG_TEST.error("Unknown error occured!\n%s", _describe(exc))

    def _busy_to_reusable(self, job: Job) -> None:
        job.status = JobStatus.REUSABLE
        job.status_since = time.monotonic()
        job.link = None
        self.sessions -= 1
        LOG_EXTRA.debug("Job %s is REUSABLE.", job.job_id)

    # Refill

    def _cap(self, ce: CeState) -> int:
        return ce.config.min_jobs if self.mode == IDLE else ce.config.max_jobs

    async def _refill_loop(self, listening_since: float) -> None:
        """The 3-s clients tick: client frequency, IDLE/ACTIVE, and the refill."""
        ACTOR.set("Thread-2")
        tick = listening_since + self.config.first_submit_delay_s
        while True:
            await _sleep_until(tick)
            self._update_frequency()
            self._update_mode()
            self._refill()
            tick += self.config.refill_tick_s

    def _update_frequency(self) -> None:
        self.clients_per_interval = self.matched_in_interval
        self.matched_in_interval = 0
        self.frequency = 0.1 * self.frequency + 0.9 * self.clients_per_interval

    def _update_mode(self) -> None:
        idle_for = time.monotonic() - self.last_match
        if self.mode == ACTIVE and self.sessions == 0 and idle_for >= self.config.idle_timeout_s:
            self.mode = IDLE

    def _refill(self) -> None:
        """Top the pool up to MinPoolSize, counting READY, fresh SUBMITTED and REUSABLE jobs."""
        now = time.monotonic()
        have = 0
        for ce in self.ces:
            counts = ce.counts(now)
            have += counts.ready + counts.submitted + counts.reusable
        wanted = self.config.min_pool_size - have
        self.strategy = FULL_THROTTLE if wanted > 0 else REGULAR
        if wanted <= 0:
            return

        by_esd = sorted(self.ces, key=lambda ce: ce.esd_ms)
        best = by_esd[: len(by_esd) * self.config.panic_ce_percent // 100]
        on_best = 0
        for ce in reversed(best):
            on_best += self._submit_on(ce, wanted - on_best)
        LOG_POOL.debug("Submitted on best CEs = %d.", on_best)
        if wanted <= on_best:
            return
        on_all = 0
        for ce in by_esd:
            on_all += self._submit_on(ce, wanted - on_best - on_all)
        LOG_POOL.debug("Submitted on all CEs = %d.", on_all)
        if wanted > on_best + on_all:
            missing = wanted - on_best - on_all
            LOG_POOL.warning("Total of %d panic refill jobs could not be submitted.", missing)

    def _submit_on(self, ce: CeState, wanted: int) -> int:
        live = ce.counts(time.monotonic()).live
        allowed = min(wanted, self._cap(ce) - live)
        return sum(self._submit(ce) for _ in range(max(0, allowed)))

    def _submit(self, ce: CeState) -> bool:
        """Start `Script` for one new job without waiting for it; the job is then SUBMITTED."""
        epoch_ms = int(time.time() * 1000)
        job_id = f"{epoch_ms}-{next(self.job_numbers)}"
        routing = f"Started_at_{epoch_ms}"
        script = self.config.script
        argv = [script, ce.config.full_name, routing, job_id, job_id.replace(":", "_")]
        LOG_SUBMIT.debug("Executing script '%s %s %s %s'...", *argv[:4])
        output = subprocess.PIPE if self.config.copy_script_output else subprocess.DEVNULL
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )
        except OSError as exc:
            LOG_CE.error(
                'java.io.IOException: Cannot run program "%s": error=%s, %s',
                script,
                exc.errno,
                exc.strerror,
            )
            return False

        ce.jobs[job_id] = Job(job_id, JobStatus.SUBMITTED, status_since=time.monotonic())
        LOG_CE.debug("Saving worker job ID = %s.", job_id)
        LOG_CE.debug("Worker job saved.")
        threading.Thread(
            target=_copy_script_output,
            args=(process, job_id),
            name=f"Thread-{next(self.reader_threads)}",
            daemon=True,
        ).start()
        return True

    # Timeouts

    async def _status_loop(self) -> None:
        tick = time.monotonic() + self.config.status_tick_s
        while True:
            await _sleep_until(tick)
            for ce in self.ces:
                ACTOR.set(f"CEStatusThread-{ce.config.short_name}")
                self._check_jobs(ce, time.monotonic())
            tick += self.config.status_tick_s

    def _check_jobs(self, ce: CeState, now: float) -> None:
        """Forget aged submissions, expired READY jobs and REUSABLE jobs that did not return."""
        short = ce.config.short_name
        for job in list(ce.jobs.values()):
            age_ms = (now - job.status_since) * 1000
            named = f"CE: {short}, Job {job.job_id}:{job.instance}"
            if job.status == JobStatus.SUBMITTED:
                if ce.is_aged(job, now) and age_ms > ce.esd_ms * ce.config.aged_multiplier:
                    old = ce.esd_ms
                    LOG_CE.debug("CE: %s, JobID: %s; old EMMSJ: %dms.", short, job.job_id, old)
                    ce.esd_ms += int((age_ms - ce.esd_ms) * ce.config.coeff_discarded_pct / 100)
                    LOG_CE.debug("CE: %s: aged->removed, new EMMSJ: %dms.", short, ce.esd_ms)
                    del ce.jobs[job.job_id]
            elif job.status == JobStatus.READY:
                if (now - job.active_since) * 1000 > job.max_wall_ms:
                    LOG_CE.debug("%s exceeded MaxWallClockTime and is removed.", named)
                    self._drop_ready(ce, job)
                elif age_ms > ce.config.max_ready_s * 1000:
                    LOG_EXTRA.debug("Job %s was READY too long and is dropped.", job.job_id)
                    self._drop_ready(ce, job)
            elif job.status == JobStatus.REUSABLE:
                if age_ms > job.max_wall_ms:
                    LOG_CE.debug("%s exceeded MaxWallClockTime and is removed.", named)
                    del ce.jobs[job.job_id]
                elif age_ms > ce.config.max_reusable_s * 1000:
                    LOG_CE.debug("%s did not reconnect in time and is removed.", named)
                    del ce.jobs[job.job_id]

    def _drop_ready(self, ce: CeState, job: Job) -> None:
        if job.link is not None:
            job.link.writer.close()
        del ce.jobs[job.job_id]

    # Status page

    async def _html_loop(self) -> None:
        interval = self.config.html_interval_s
        if interval <= 0:
            return
        ACTOR.set("Thread-1")
        tick = time.monotonic() + 2 * interval
        while True:
            await _sleep_until(tick)
            LOG_POOL.debug(
                "Periodical status check of the BinderPool (operational mode is %s, "
                "operational strategy is %s).",
                self.mode,
                self.strategy,
            )
            self._write_html()
            tick += interval

    def _write_html(self) -> None:
        # Written to a temporary file and renamed, so a reader never sees it half written.
        path = self.config.html_file
        temporary = f"{path}.tmp"
        try:
            with open(temporary, "w", encoding="ascii", errors="replace") as page:
                page.write(self.html(time.monotonic()))
            os.replace(temporary, path)
        except OSError as exc:
            LOG_POOL.error("Error while writing to html file: %s\n%s", path, _describe(exc))

    def html(self, now: float) -> str:
        """PoolStatus.html in WorkBinder's layout."""
        parts = [
            '<html> <meta http-equiv="refresh" content="30" > <body>',
            f"<p>Working mode: {self.mode}, strategy: {self.strategy}.</p>",
            f"<p>Active clients: {self.sessions}, clients per interval: "
            f"{self.clients_per_interval}, client arrival frequency: {self.frequency:8.3f}.</p>",
            '<TABLE width="100%" align="right">',
            '<TR width="100%" align="center"><TH>Site</TH><TH>Supported Apps</TH><TH>Ready</TH>'
            "<TH>Busy</TH><TH>Submitted</TH><TH>Reusable</TH><TH>Aged</TH><TH>ESD (ms)</TH></TR>",
        ]
        totals = [0, 0, 0, 0, 0]
        active = 0
        for ce in sorted(self.ces, key=lambda ce: ce.config.short_name):
            counts = ce.counts(now)
            numbers = [counts.ready, counts.busy, counts.submitted, counts.reusable, counts.aged]
            totals = [total + number for total, number in zip(totals, numbers, strict=True)]
            active += counts.ready + counts.busy > 0
            parts.append(self._html_row(ce, numbers))
        cells = "".join(f"<td><B>{total}</B></td>" for total in totals)
        parts.append(
            f"<TR><TD><B>Total: {len(self.ces)} &nbsp; Active: {active}</B></TD>"
            f"<td><B>N/A</B></td>{cells}<td><B>N/A</B></td></TR>"
        )
        stamp = time.strftime("%d.%m.%Y. at %H:%M:%S")
        parts.append(f"<tr><td>Generated on {stamp}</td></tr></TABLE></body></html>")
        return "".join(parts)

    def _html_row(self, ce: CeState, numbers: list[int]) -> str:
        short = ce.config.short_name
        host = ce.config.full_name.split(":", 1)[0]
        name = f"<a href='{self.config.gstat_url}{short}/' target='_blank'>{short}</a> {host}"
        ready, busy = numbers[0], numbers[1]
        if ready + busy == 0:
            name = f"<i>{name}</i>"
        cells = "".join(f"<td>{number}</td>" for number in [*numbers, ce.esd_ms])
        return f"<tr><td>{name}</td><td>{ce.app_description()}</td>{cells}</tr>"


def _copy_script_output(process: subprocess.Popen[bytes], job_id: str) -> None:
    """Log the script's first 16 lines, then close the pipe (later writes hit EPIPE)."""
    if process.stdout is not None:
        try:
            for _ in range(SCRIPT_OUTPUT_LINES):
                line = process.stdout.readline()
                if not line:
                    break
                text = line.decode("utf-8", errors="replace").rstrip("\r\n")
                LOG_SUBMIT.debug("PROCESS JOBID: %s. Output: %s", job_id, text)
        finally:
            process.stdout.close()
    process.wait()


async def _sleep_until(deadline: float) -> None:
    """Sleep on the event loop until time.monotonic() reaches `deadline`."""
    while (remaining := deadline - time.monotonic()) > 0:
        await asyncio.sleep(remaining)


def main(argv: list[str]) -> int:
    configure_logging(sys.stdout)
    if len(argv) != 1:
        LOG_BINDER.info("Usage - BinderProperties.")
        return 1
    try:
        properties = read_properties(argv[0])
    except StandinConfigError as exc:
        LOG_EXTRA.error("stand-in: %s", exc)
        return 1
    try:
        config = BinderConfig.from_properties(properties)
    except StandinConfigError as exc:
        # WorkBinder reports every startup failure with this one line.
        port = int_property(properties, "ListeningPort", 8731)
        LOG_BINDER.error("Could not listen on port: %d.", port)
        LOG_EXTRA.error("stand-in: %s", exc)
        return 1

    loop = asyncio.new_event_loop()
    return loop.run_until_complete(StandinBinder(config).run())


if __name__ == "__main__":
    status = main(sys.argv[1:])
    logging.shutdown()
    # Leave at once, like WorkBinder's System.exit: sessions in flight get no tidy end.
    os._exit(status)
