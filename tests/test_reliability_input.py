"""Bad input: scenario files and binder answers the lab did not expect.

Whatever the bytes, the lab answers with a valid result or with one LabError whose
message is one line, and within its deadline: never a traceback, never a hang.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lab.errors import LabError, QueryFailed, ScenarioError
from lab.protocol import client, wire
from lab.scenarios.schema import Scenario, parse_scenario

# -- scenario files ------------------------------------------------------------------------

FIELDS = {
    "name": None,
    "description": None,
    "engine": None,
    "binder": ["ces", "pool", "status_interval_s", "properties", "port", "command"],
    "worker": ["command", "restart_policy"],
    "standin": ["first_submit_delay_ms", "refill_tick_ms", "worker_start_delay_ms"],
    "deadlines": ["bring_up_s", "pool_full_s", "recovery_s"],
    "refill": ["enabled", "repetitions", "drain_clients", "hold_s"],
    "failover": ["enabled", "repetitions", "kill_ready"],
    "throughput": ["enabled", "concurrency", "duration_s"],
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["podman", "kind", "Never", "{job}", "{nope}", "{", "2020-13-45", "0x1F"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(list(FIELDS))), inner),
    ),
    max_leaves=12,
)


@st.composite
def scenario_data(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed scenarios with a wrong part here and there."""
    data: dict[str, Any] = {"name": draw(st.one_of(st.just("fuzz"), values))}
    for key in draw(st.lists(st.sampled_from(list(FIELDS)), max_size=4, unique=True)):
        subfields = FIELDS[key]
        if subfields is None:
            data[key] = draw(values)
        else:
            data[key] = {sub: draw(values) for sub in draw(st.lists(st.sampled_from(subfields)))}
    if draw(st.booleans()):
        data[draw(st.text(max_size=10))] = draw(values)
    return data


def check_scenario_text(text: str) -> None:
    started = time.monotonic()
    try:
        result = parse_scenario(text, "fuzz.yaml")
    except ScenarioError as exc:
        message = str(exc)
        assert message.startswith("fuzz.yaml"), message
        assert "\n" not in message and "\r" not in message, repr(message)
        assert len(message) < 1000, message
    else:
        assert isinstance(result, Scenario)
    assert time.monotonic() - started < 2.0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario_data())
def test_generated_scenarios_are_valid_or_one_clear_error(data: dict[str, Any]) -> None:
    check_scenario_text(yaml.safe_dump(data, allow_unicode=True))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
@example("name: 2020-13-45")  # PyYAML reads it as a date and raises ValueError
@example('{"na\\nme": 1}')  # a key holding a newline, in the field path of the error
@example("[" * 5000)  # deeper than the YAML parser's recursion
@example("name: a\nbinder: {port: 80}")
@example("name: a\nworker: {command: [x, '{job']}")
@example("name: !!binary zz")
def test_any_text_is_a_scenario_or_one_clear_error(text: str) -> None:
    check_scenario_text(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario_data(), st.data())
def test_damaged_scenario_files_are_one_clear_error(
    data: dict[str, Any], draw: st.DataObject
) -> None:
    text = yaml.safe_dump(data, allow_unicode=True)
    cut = draw.draw(st.integers(min_value=0, max_value=len(text)))
    noise = draw.draw(st.text(alphabet=":{}[]-#&*!|>'\"%@`\t\n ", max_size=4))
    check_scenario_text(text[:cut] + noise + text[cut:])


# -- binder answers ------------------------------------------------------------------------

WORKER = wire.WorkerHeader(job_id="1700000000000-0", ce_name="ce.example:8443/queue")
VALID_ANSWERS = [
    wire.encode_ce_query_answer([wire.CeEntry("ce.example:8443/queue", "Site-A", 3, "any app")]),
    wire.REFUSAL,
    wire.encode_worker_header(WORKER)
    + wire.encode_worker_response(wire.WorkerResponse("routing"))
    + wire.encode_string("Binder ping"),
]
INT32 = struct.Struct(">i")
CLIENT_DEADLINE_S = 0.3
# What the client may take beyond its deadline: the event loop's own scheduling.
GRACE_S = 0.5


@st.composite
def garbled(draw: st.DrawFn) -> bytes:
    """Random bytes, or a real answer cut short, with bytes changed or lengths faked."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    data = bytearray(draw(st.sampled_from(VALID_ANSWERS)))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        at = draw(st.integers(min_value=0, max_value=max(0, len(data) - 1)))
        change = draw(st.sampled_from(["flip", "length", "cut", "insert"]))
        if change == "flip" and data:
            data[at] ^= draw(st.integers(min_value=1, max_value=255))
        elif change == "length":
            size = draw(st.sampled_from([-1, -(2**31), 2**31 - 1, 2**24, 2**24 + 1, 7]))
            data[at : at + 4] = INT32.pack(size)
        elif change == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


async def serve_once(answer: bytes, ending: str, run_client: Any) -> Any:
    """A loopback server that reads a request, sends `answer`, then ends as told."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.read(4096), 1.0)
            writer.write(answer)
            await writer.drain()
            if ending == "stall":
                await asyncio.sleep(CLIENT_DEADLINE_S + GRACE_S)
            elif ending == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        return await run_client(server.sockets[0].getsockname()[1])
    finally:
        server.close()


endings = st.sampled_from(["close", "close", "reset", "stall"])


@settings(max_examples=150, deadline=None)
@given(garbled(), endings)
def test_garbled_query_answers_are_a_result_or_one_clear_error(answer: bytes, ending: str) -> None:
    async def ask(port: int) -> client.QueryAnswer | QueryFailed:
        try:
            return await client.query("127.0.0.1", port, deadline=CLIENT_DEADLINE_S)
        except QueryFailed as exc:
            return exc

    started = time.monotonic()
    result = asyncio.run(serve_once(answer, ending, ask))
    took = time.monotonic() - started

    assert took < CLIENT_DEADLINE_S + GRACE_S, f"{took:.2f} s"
    if isinstance(result, LabError):
        assert "\n" not in str(result), repr(str(result))
    else:
        assert isinstance(result, client.QueryAnswer)
        assert all(isinstance(entry.ready_jobs, int) for entry in result.ces)


@settings(max_examples=150, deadline=None)
@given(garbled(), endings)
def test_garbled_job_answers_are_one_outcome(answer: bytes, ending: str) -> None:
    async def job(port: int) -> client.JobOutcome:
        return await client.test_job("127.0.0.1", port, ("ping",), deadline=CLIENT_DEADLINE_S)

    started = time.monotonic()
    outcome = asyncio.run(serve_once(answer, ending, job))
    took = time.monotonic() - started

    assert took < CLIENT_DEADLINE_S + GRACE_S, f"{took:.2f} s"
    kinds = (
        client.Success,
        client.Refused,
        client.ClosedWithoutData,
        client.ProtocolError,
        client.TimedOut,
        client.Unreachable,
    )
    assert isinstance(outcome, kinds), outcome
    if isinstance(outcome, client.ProtocolError):
        assert "\n" not in outcome.detail, repr(outcome.detail)
