"""Protocol version 8: round trips of every message, and the byte captures of the real binder."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.errors import PeerClosed, WireError
from lab.protocol import wire

H = bytes.fromhex

ascii_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=80)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
blobs = st.binary(max_size=64)

client_headers = st.builds(
    wire.ClientHeader,
    candidate_ces=ascii_text,
    application_id=ascii_text,
    access_string=ascii_text,
    required_wallclock_ms=int64,
    proxy_key=blobs,
    certificates=st.lists(blobs, max_size=4).map(tuple),
    routing_info=ascii_text,
    connection_type=int32,
    version=int32,
)
worker_headers = st.builds(
    wire.WorkerHeader,
    job_id=ascii_text,
    ce_name=ascii_text,
    application_list=ascii_text,
    access_string=ascii_text,
    max_wallclock_minutes=ascii_text,
    job_status=int32,
    connection_type=int32,
    version=int32,
)
worker_responses = st.builds(wire.WorkerResponse, ascii_text, ascii_text)
ce_entries = st.builds(wire.CeEntry, ascii_text, ascii_text, int32, ascii_text)

# Real binder captures (facts document, sections 5.2, 5.3 and 5.6).
QUERY_HEADER_CAPTURE = (
    H("00000008 00000002 00000000 00000004")
    + b"TEST"
    + H("00000000 00000000000003e8 00000000 00000000 00000008")
    + b"py-query"
)
FULL_CE = "cluster1.csk.kg.ac.rs:8443/cream-pbs-aegis"
APP_DESCRIPTION = (
    "CE: Site-A is filtered: [TEST, external-example, EXTERNAL, UPLOAD, EXTERNALXML, "
    "EXTERNALXMLSTDIO], currently supported apps: [TEST, EXTERNAL, UPLOAD, EXTERNALXML, "
    "EXTERNALXMLSTDIO]."
)
QUERY_ANSWER_CAPTURE = (
    H("00000001 0000002a")
    + FULL_CE.encode()
    + H("00000006")
    + b"Site-A"
    + H("00000003 000000b5")
    + APP_DESCRIPTION.encode()
)
REFUSAL_CAPTURE = (
    H("00000000 00000001 00000000 00000000 00000000 00000000 00000000 00000004 00000000 00000017")
    + b"No ready jobs available"
)
WORKER_HEADER_CAPTURE = (
    H("00000008 00000001 0000000f")
    + b"1796314304117-0"
    + H("0000002a")
    + FULL_CE.encode()
    + H("0000003b")
    + b" TEST TEST-SEC EXTERNAL UPLOAD EXTERNALXML EXTERNALXMLSTDIO"
    + H("00000000 00000004")
    + b"1000"
    + H("00000001")
)


@given(int32)
def test_int_round_trip(value: int) -> None:
    assert wire.decode_all(wire.decode_int(), wire.encode_int(value)) == value


@given(int64)
def test_long_round_trip(value: int) -> None:
    assert wire.decode_all(wire.decode_long(), wire.encode_long(value)) == value


@given(ascii_text)
def test_string_round_trip(text: str) -> None:
    data = wire.encode_string(text)
    assert data[:4] == len(text).to_bytes(4, "big")
    assert wire.decode_all(wire.decode_string(), data) == text


@given(blobs)
def test_byte_array_round_trip(data: bytes) -> None:
    assert wire.decode_all(wire.decode_byte_array(), wire.encode_byte_array(data)) == data


@given(client_headers)
def test_client_header_round_trip(header: wire.ClientHeader) -> None:
    data = wire.encode_client_header(header)
    assert wire.decode_all(wire.decode_client_header(), data) == header


@given(client_headers)
def test_client_header_rest_after_preamble(header: wire.ClientHeader) -> None:
    data = wire.encode_client_header(header)
    preamble = wire.decode_all(wire.decode_preamble(), data[:8])
    assert wire.decode_all(wire.decode_client_header(preamble), data[8:]) == header


@given(worker_headers)
def test_worker_header_round_trip(header: wire.WorkerHeader) -> None:
    data = wire.encode_worker_header(header)
    assert wire.decode_all(wire.decode_worker_header(), data) == header
    preamble = wire.decode_all(wire.decode_preamble(), data[:8])
    assert wire.decode_all(wire.decode_worker_header(preamble), data[8:]) == header


@given(worker_responses)
def test_worker_response_round_trip(response: wire.WorkerResponse) -> None:
    data = wire.encode_worker_response(response)
    assert wire.decode_all(wire.decode_worker_response(), data) == response


@given(st.lists(ce_entries, max_size=5).map(tuple))
def test_ce_query_answer_round_trip(entries: tuple[wire.CeEntry, ...]) -> None:
    data = wire.encode_ce_query_answer(entries)
    assert wire.decode_all(wire.decode_ce_query_answer(), data) == entries


def test_query_header_matches_capture() -> None:
    header = wire.ClientHeader(
        connection_type=wire.ConnectionType.CE_QUERY, routing_info="py-query"
    )
    assert wire.encode_client_header(header) == QUERY_HEADER_CAPTURE
    assert wire.decode_all(wire.decode_client_header(), QUERY_HEADER_CAPTURE) == header


def test_query_answer_matches_capture() -> None:
    entry = wire.CeEntry(FULL_CE, "Site-A", 3, APP_DESCRIPTION)
    assert wire.encode_ce_query_answer([entry]) == QUERY_ANSWER_CAPTURE
    assert wire.decode_all(wire.decode_ce_query_answer(), QUERY_ANSWER_CAPTURE) == (entry,)


def test_refusal_matches_capture() -> None:
    assert wire.REFUSAL == REFUSAL_CAPTURE
    header = wire.decode_worker_header()
    response = wire.decode_worker_response()
    assert wire.decode_all(header, REFUSAL_CAPTURE[:32]) == wire.REFUSAL_HEADER
    assert wire.decode_all(response, REFUSAL_CAPTURE[32:]).error_description == (
        "No ready jobs available"
    )


def test_worker_header_matches_capture() -> None:
    header = wire.WorkerHeader(
        job_id="1796314304117-0",
        ce_name=FULL_CE,
        application_list=" TEST TEST-SEC EXTERNAL UPLOAD EXTERNALXML EXTERNALXMLSTDIO",
    )
    assert wire.encode_worker_header(header) == WORKER_HEADER_CAPTURE
    assert wire.decode_all(wire.decode_worker_header(), WORKER_HEADER_CAPTURE) == header


def test_truncated_message_says_how_much_arrived() -> None:
    with pytest.raises(PeerClosed) as caught:
        wire.decode_all(wire.decode_worker_header(), WORKER_HEADER_CAPTURE[:15])
    assert caught.value.wanted == 15
    assert caught.value.partial == b"179"


def test_trailing_bytes_are_an_error() -> None:
    with pytest.raises(WireError, match="1 bytes left over"):
        wire.decode_all(wire.decode_int(), b"\x00\x00\x00\x01\x00")


@pytest.mark.parametrize("length", [-1, wire.MAX_FIELD_BYTES + 1])
def test_impossible_length_is_refused_before_reading(length: int) -> None:
    with pytest.raises(WireError, match="length"):
        wire.decode_all(wire.decode_string(), wire.encode_int(length))


def test_non_ascii_text_is_refused() -> None:
    with pytest.raises(WireError, match="not ASCII"):
        wire.encode_string("čvor")


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1])
def test_int_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(WireError, match="4-byte"):
        wire.encode_int(value)


@given(client_headers, st.lists(st.integers(min_value=1, max_value=7), min_size=1))
def test_socket_source_reads_exact_fields_from_any_split(
    header: wire.ClientHeader, splits: list[int]
) -> None:
    data = wire.encode_client_header(header) + wire.encode_string("next")
    left, right = socket.socketpair()
    with left, right:

        def send_in_pieces() -> None:
            offset, index = 0, 0
            while offset < len(data):
                size = splits[index % len(splits)]
                right.sendall(data[offset : offset + size])
                offset, index = offset + size, index + 1

        sender = threading.Thread(target=send_in_pieces)
        sender.start()
        source = wire.SocketSource(left)
        assert source.read(wire.decode_client_header()) == header
        assert source.read(wire.decode_string()) == "next"
        sender.join(timeout=10)
        assert source.received == len(data)


@given(worker_headers, st.lists(st.integers(min_value=1, max_value=7), min_size=1))
def test_stream_source_reads_exact_fields_from_any_split(
    header: wire.WorkerHeader, splits: list[int]
) -> None:
    data = wire.encode_worker_header(header) + wire.encode_worker_response(wire.WorkerResponse())

    async def read_back() -> tuple[wire.WorkerHeader, wire.WorkerResponse, int]:
        reader = asyncio.StreamReader()
        offset, index = 0, 0
        while offset < len(data):
            size = splits[index % len(splits)]
            reader.feed_data(data[offset : offset + size])
            offset, index = offset + size, index + 1
        reader.feed_eof()
        source = wire.StreamSource(reader)
        worker = await source.read(wire.decode_worker_header())
        response = await source.read(wire.decode_worker_response())
        return worker, response, source.received

    worker, response, received = asyncio.run(read_back())
    assert (worker, response, received) == (header, wire.WorkerResponse(), len(data))


def test_stream_source_reports_a_close_mid_field() -> None:
    async def read_truncated() -> tuple[PeerClosed, int]:
        reader = asyncio.StreamReader()
        reader.feed_data(WORKER_HEADER_CAPTURE[:10])
        reader.feed_eof()
        source = wire.StreamSource(reader)
        with pytest.raises(PeerClosed) as caught:
            await source.read(wire.decode_worker_header())
        return caught.value, source.received

    closed, received = asyncio.run(read_truncated())
    assert (closed.wanted, closed.partial, received) == (4, b"\x00\x00", 10)
