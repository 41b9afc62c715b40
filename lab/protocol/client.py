"""The lab's asyncio client for a binder: CE queries, TEST jobs, and a closed-loop load.

Every call is bounded by `deadline` (seconds for the whole call) and returns or raises
within it. A TEST job never raises: each way it can end is a result type, because a load
run counts them. A query raises `QueryFailed`, because an observer cannot use half an answer.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from lab.errors import PeerClosed, QueryFailed, WireError
from lab.protocol import wire

DEFAULT_ROUTING = "\n\tClient => lab"


@dataclass(frozen=True, slots=True)
class QueryAnswer:
    """A binder's CE_QUERY answer: READY jobs per CE that cover the requested wall time."""

    ces: tuple[wire.CeEntry, ...]
    latency: float

    @property
    def ready(self) -> dict[str, int]:
        """READY counts keyed by full CE name."""
        return {entry.full_name: entry.ready_jobs for entry in self.ces}

    @property
    def total_ready(self) -> int:
        return sum(entry.ready_jobs for entry in self.ces)


@dataclass(frozen=True, slots=True)
class Success:
    """A TEST job served end to end: a reply per ball, then the binder closed after `enough`."""

    KIND: ClassVar[str] = "success"
    latency: float
    job_id: str
    ce: str
    replies: tuple[str, ...]
    started: float
    worker_routing: str = ""


@dataclass(frozen=True, slots=True)
class Refused:
    """The binder answered with an error instead of a worker (normally "No ready jobs available").

    The binder has no queue: a refused client must retry.
    """

    KIND: ClassVar[str] = "refused"
    latency: float
    reason: str
    started: float


@dataclass(frozen=True, slots=True)
class ClosedWithoutData:
    """The binder closed the connection before sending a byte: it matched a dead worker."""

    KIND: ClassVar[str] = "closed"
    latency: float
    started: float


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The exchange broke after it had started: malformed bytes, or a close mid-session."""

    KIND: ClassVar[str] = "protocol-error"
    latency: float
    detail: str
    started: float


@dataclass(frozen=True, slots=True)
class TimedOut:
    """The deadline ran out; `waiting_for` names the step that was still pending."""

    KIND: ClassVar[str] = "timeout"
    latency: float
    waiting_for: str
    received: int
    started: float


@dataclass(frozen=True, slots=True)
class Unreachable:
    """The TCP connection to the binder could not be opened."""

    KIND: ClassVar[str] = "unreachable"
    latency: float
    detail: str
    started: float


JobOutcome = Success | Refused | ClosedWithoutData | ProtocolError | TimedOut | Unreachable


class _Progress:
    """Where a call has got to, so a timeout can say what it was waiting for."""

    def __init__(self) -> None:
        self.step = "the TCP connection"
        self.source: wire.StreamSource | None = None

    @property
    def received(self) -> int:
        return self.source.received if self.source else 0


async def _connect(
    host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, wire.StreamSource]:
    reader, writer = await asyncio.open_connection(host, port)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # Headers are small and the next step waits for the answer.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer, wire.StreamSource(reader)


async def query(
    host: str,
    port: int,
    app: str = "TEST",
    candidate_ces: str = "",
    wallclock_ms: int = 1000,
    *,
    deadline: float = 2.0,
    routing_info: str = "lab-query",
) -> QueryAnswer:
    """Ask the binder how many READY jobs each CE has for `app`; raise QueryFailed otherwise."""
    header = wire.ClientHeader(
        candidate_ces=candidate_ces,
        application_id=app,
        required_wallclock_ms=wallclock_ms,
        routing_info=routing_info,
        connection_type=wire.ConnectionType.CE_QUERY,
    )
    progress = _Progress()
    started = time.monotonic()
    try:
        async with asyncio.timeout(deadline):
            ces = await _query_exchange(host, port, header, progress)
    except TimeoutError:
        raise QueryFailed(
            f"CE_QUERY to {host}:{port} got no answer within {deadline:.1f} s: still waiting "
            f"for {progress.step} after {progress.received} bytes; is the binder overloaded?"
        ) from None
    except (OSError, WireError) as exc:
        raise QueryFailed(
            f"CE_QUERY to {host}:{port} failed while waiting for {progress.step}: {exc}; "
            "check that a binder listens there"
        ) from exc
    return QueryAnswer(ces=ces, latency=time.monotonic() - started)


async def _query_exchange(
    host: str, port: int, header: wire.ClientHeader, progress: _Progress
) -> tuple[wire.CeEntry, ...]:
    reader, writer, progress.source = await _connect(host, port)
    try:
        progress.step = "the CE list"
        writer.write(wire.encode_client_header(header))
        await writer.drain()
        return await progress.source.read(wire.decode_ce_query_answer())
    finally:
        writer.close()


async def test_job(
    host: str,
    port: int,
    balls: Sequence[str] = ("ping",),
    *,
    deadline: float = 5.0,
    app: str = "TEST",
    candidate_ces: str = "",
    wallclock_ms: int = 1000,
    routing_info: str = DEFAULT_ROUTING,
) -> JobOutcome:
    """Run one TEST job: send each ball, expect "Binder <ball>" back, then send `enough`.

    Latency runs from the start of the TCP connect to the binder's close after `enough`
    (or to whatever ended the job). Non-ASCII arguments raise WireError before connecting.
    """
    header = wire.ClientHeader(
        candidate_ces=candidate_ces,
        application_id=app,
        required_wallclock_ms=wallclock_ms,
        routing_info=routing_info,
    )
    request = _JobRequest(
        header=wire.encode_client_header(header),
        balls=tuple(wire.encode_string(ball) for ball in balls),
    )
    progress = _Progress()
    started = time.monotonic()
    try:
        async with asyncio.timeout(deadline):
            return await _job_exchange(host, port, request, progress, started)
    except TimeoutError:
        return TimedOut(
            latency=time.monotonic() - started,
            waiting_for=progress.step,
            received=progress.received,
            started=started,
        )


# pytest would otherwise collect this public `test_*` coroutine from any test module that
# imports it by name.
test_job.__test__ = False  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class _JobRequest:
    """A TEST job's bytes, encoded before connecting so bad arguments fail early."""

    header: bytes
    balls: tuple[bytes, ...]


async def _job_exchange(
    host: str, port: int, request: _JobRequest, progress: _Progress, started: float
) -> JobOutcome:
    try:
        reader, writer, source = await _connect(host, port)
    except OSError as exc:
        return Unreachable(time.monotonic() - started, f"{host}:{port}: {exc}", started)
    progress.source = source
    try:
        return await _job_steps(writer, source, request, progress, started)
    except (OSError, WireError) as exc:
        latency = time.monotonic() - started
        if source.received == 0 and isinstance(exc, PeerClosed | ConnectionError):
            return ClosedWithoutData(latency, started)
        detail = f"{type(exc).__name__} while waiting for {progress.step}: {exc}"
        return ProtocolError(latency, f"{detail} ({source.received} bytes received)", started)
    finally:
        writer.close()


async def _job_steps(
    writer: asyncio.StreamWriter,
    source: wire.StreamSource,
    request: _JobRequest,
    progress: _Progress,
    started: float,
) -> JobOutcome:
    progress.step = "the worker header"
    writer.write(request.header)
    await writer.drain()
    worker = await source.read(wire.decode_worker_header())

    progress.step = "the worker response"
    response = await source.read(wire.decode_worker_response())
    if response.error_description:
        return Refused(time.monotonic() - started, response.error_description, started)

    replies = []
    for number, ball in enumerate(request.balls, start=1):
        progress.step = f"reply {number} of {len(request.balls)}"
        writer.write(ball)
        await writer.drain()
        replies.append(await source.read(wire.decode_string()))

    progress.step = "the binder to close after `enough`"
    writer.write(wire.encode_string("enough"))
    await writer.drain()
    extra = await source.reader.read(64)
    if extra:
        detail = f"the binder sent {len(extra)} bytes after `enough` instead of closing"
        return ProtocolError(time.monotonic() - started, detail, started)

    return Success(
        latency=time.monotonic() - started,
        job_id=worker.job_id,
        ce=worker.ce_name,
        replies=tuple(replies),
        started=started,
        worker_routing=response.routing_info,
    )


async def closed_loop(
    host: str,
    port: int,
    *,
    clients: int,
    duration: float,
    balls: Sequence[str] = ("ping",),
    retry_delay: float = 0.02,
    deadline: float = 5.0,
) -> list[JobOutcome]:
    """Run `clients` loops of back-to-back TEST jobs for `duration` seconds.

    A loop whose job did not succeed waits `retry_delay` before its next one, as a real
    client of a binder without a queue would. Jobs in flight at the end are completed.
    """
    outcomes: list[JobOutcome] = []
    stop_at = time.monotonic() + duration

    async def one_client() -> None:
        while time.monotonic() < stop_at:
            outcome = await test_job(host, port, balls, deadline=deadline)
            outcomes.append(outcome)
            if not isinstance(outcome, Success):
                await asyncio.sleep(retry_delay)

    async with asyncio.TaskGroup() as group:
        for _ in range(clients):
            group.create_task(one_client())
    return outcomes


def query_sync(
    host: str,
    port: int,
    app: str = "TEST",
    candidate_ces: str = "",
    wallclock_ms: int = 1000,
    *,
    deadline: float = 2.0,
) -> QueryAnswer:
    """`query` for code without an event loop (tests, the CLI)."""
    return asyncio.run(query(host, port, app, candidate_ces, wallclock_ms, deadline=deadline))


def test_job_sync(
    host: str,
    port: int,
    balls: Sequence[str] = ("ping",),
    *,
    deadline: float = 5.0,
    app: str = "TEST",
    candidate_ces: str = "",
) -> JobOutcome:
    """`test_job` for code without an event loop (tests, the CLI)."""
    return asyncio.run(
        test_job(host, port, balls, deadline=deadline, app=app, candidate_ces=candidate_ces)
    )


test_job_sync.__test__ = False  # type: ignore[attr-defined]
