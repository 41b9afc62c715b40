"""The asyncio client against scripted fake binders: each way a job can end, and its deadline."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from lab.errors import QueryFailed, WireError
from lab.protocol import client, wire

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

WORKER = wire.WorkerHeader(job_id="1700000000000-0", ce_name="ce.example:8443/queue")
CAPTURED_ANSWER = wire.encode_ce_query_answer(
    [wire.CeEntry("ce.example:8443/queue", "Site-A", 3, "CE: Site-A accepts any app.")]
)


@asynccontextmanager
async def fake_binder(handler: Handler) -> AsyncIterator[int]:
    """A loopback server running `handler` per connection; yields its port."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0, backlog=1024)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def serve_test_job(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """What a binder and a healthy TEST worker look like from the client's side."""
    source = wire.StreamSource(reader)
    header = await source.read(wire.decode_client_header())
    assert (header.version, header.connection_type) == (8, wire.ConnectionType.CLIENT)
    writer.write(wire.encode_worker_header(WORKER))
    writer.write(wire.encode_worker_response(wire.WorkerResponse(header.routing_info + " w")))
    while (ball := await source.read(wire.decode_string())).lower() != "enough":
        writer.write(wire.encode_string("Binder " + ball))


def run_job(
    handler: Handler, balls: tuple[str, ...] = ("ping",), deadline: float = 5.0
) -> client.JobOutcome:
    async def scenario() -> client.JobOutcome:
        async with fake_binder(handler) as port:
            return await client.test_job("127.0.0.1", port, balls, deadline=deadline)

    return asyncio.run(scenario())


def test_served_job_is_a_success_with_every_reply() -> None:
    outcome = run_job(serve_test_job, balls=("hello", "world"))
    assert isinstance(outcome, client.Success), outcome
    assert outcome.replies == ("Binder hello", "Binder world")
    assert (outcome.job_id, outcome.ce) == (WORKER.job_id, WORKER.ce_name)
    assert outcome.worker_routing == client.DEFAULT_ROUTING + " w"
    assert outcome.latency > 0


def test_refusal_answer_is_refused() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await wire.StreamSource(reader).read(wire.decode_client_header())
        writer.write(wire.REFUSAL)

    outcome = run_job(refuse)
    assert isinstance(outcome, client.Refused), outcome
    assert outcome.reason == wire.NO_READY_JOBS


def test_close_without_a_byte_is_closed_without_data() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await wire.StreamSource(reader).read(wire.decode_client_header())

    outcome = run_job(hang_up)
    assert isinstance(outcome, client.ClosedWithoutData), outcome


def test_close_mid_header_is_a_protocol_error() -> None:
    async def half_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await wire.StreamSource(reader).read(wire.decode_client_header())
        writer.write(wire.encode_worker_header(WORKER)[:11])

    outcome = run_job(half_header)
    assert isinstance(outcome, client.ProtocolError), outcome
    assert "the worker header" in outcome.detail
    assert "11 bytes received" in outcome.detail


def test_garbled_length_is_a_protocol_error() -> None:
    async def garble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await wire.StreamSource(reader).read(wire.decode_client_header())
        writer.write(wire.encode_int(8) + wire.encode_int(1) + wire.encode_int(-7))

    outcome = run_job(garble)
    assert isinstance(outcome, client.ProtocolError), outcome
    assert "length -7" in outcome.detail


def test_data_after_enough_is_a_protocol_error() -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_test_job(reader, writer)
        writer.write(b"late")
        await writer.drain()

    outcome = run_job(chatty)
    assert isinstance(outcome, client.ProtocolError), outcome
    assert "after `enough`" in outcome.detail


def test_close_mid_session_is_a_protocol_error() -> None:
    async def worker_dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = wire.StreamSource(reader)
        await source.read(wire.decode_client_header())
        writer.write(
            wire.encode_worker_header(WORKER) + wire.encode_worker_response(wire.WorkerResponse())
        )
        await source.read(wire.decode_string())

    outcome = run_job(worker_dies, balls=("ping",))
    assert isinstance(outcome, client.ProtocolError), outcome
    assert "reply 1 of 1" in outcome.detail


def test_silent_binder_times_out_and_says_where() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await wire.StreamSource(reader).read(wire.decode_client_header())
        await asyncio.sleep(30)

    outcome = run_job(silent, deadline=0.3)
    assert isinstance(outcome, client.TimedOut), outcome
    assert outcome.waiting_for == "the worker header"
    assert outcome.received == 0


def test_closed_port_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        outcome = client.test_job_sync("127.0.0.1", port, deadline=2.0)
    assert isinstance(outcome, client.Unreachable), outcome
    assert str(port) in outcome.detail


def test_query_reads_ready_counts_per_ce() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = await wire.StreamSource(reader).read(wire.decode_client_header())
        assert header.connection_type == wire.ConnectionType.CE_QUERY
        assert (header.application_id, header.required_wallclock_ms) == ("APP", 70)
        writer.write(CAPTURED_ANSWER)

    async def scenario() -> client.QueryAnswer:
        async with fake_binder(answer) as port:
            return await client.query("127.0.0.1", port, app="APP", wallclock_ms=70)

    result = asyncio.run(scenario())
    assert result.ready == {"ce.example:8443/queue": 3}
    assert result.total_ready == 3
    assert result.ces[0].short_name == "Site-A"


def test_query_without_answer_fails_within_deadline() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async def scenario() -> None:
        async with fake_binder(silent) as port:
            await client.query("127.0.0.1", port, deadline=0.3)

    with pytest.raises(QueryFailed, match="still waiting for the CE list"):
        asyncio.run(scenario())


def test_query_on_a_closed_port_fails() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(QueryFailed, match="check that a binder listens"):
            client.query_sync("127.0.0.1", sock.getsockname()[1])


def test_sync_wrapper_runs_a_whole_job() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def refuse_once() -> None:
        connection, _ = listener.accept()
        with connection:
            wire.SocketSource(connection).read(wire.decode_client_header())
            connection.sendall(wire.REFUSAL)

    server = threading.Thread(target=refuse_once)
    server.start()
    try:
        outcome = client.test_job_sync("127.0.0.1", port, deadline=5.0)
    finally:
        server.join(timeout=5)
        listener.close()
    assert isinstance(outcome, client.Refused), outcome


def test_hundreds_of_concurrent_jobs_on_one_loop() -> None:
    async def scenario() -> list[client.JobOutcome]:
        async with fake_binder(serve_test_job) as port:
            jobs = [
                client.test_job("127.0.0.1", port, (f"ball {n}",), deadline=20.0)
                for n in range(400)
            ]
            return await asyncio.gather(*jobs)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(outcome, client.Success) for outcome in outcomes), {
        outcome.KIND for outcome in outcomes
    }
    sample = outcomes[123]
    assert isinstance(sample, client.Success) and sample.replies == ("Binder ball 123",)


def test_closed_loop_keeps_every_client_busy() -> None:
    async def scenario() -> list[client.JobOutcome]:
        async with fake_binder(serve_test_job) as port:
            return await client.closed_loop("127.0.0.1", port, clients=4, duration=0.3)

    outcomes = asyncio.run(scenario())
    assert len(outcomes) >= 4
    assert {outcome.KIND for outcome in outcomes} == {"success"}


def test_non_ascii_ball_fails_before_connecting() -> None:
    with pytest.raises(WireError, match="not ASCII"):
        client.test_job_sync("127.0.0.1", 9, ("čvor",))
