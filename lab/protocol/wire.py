"""WorkBinder's wire protocol, version 8: encoders, and one decoding core for every transport.

Each decoder is a generator that yields how many bytes it needs next and is sent exactly
that many back, so one body of decoding logic serves a blocking socket (`SocketSource`), an
asyncio stream (`StreamSource`) and a byte string (`decode_all`).

Standard library only: the stand-in binder and worker import this inside bare containers.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias, TypeVar

from lab.errors import PeerClosed, WireError

PROTOCOL_VERSION = 8
NO_READY_JOBS = "No ready jobs available"

# Java writes lengths without a limit; this bound only stops a garbled length from
# making us wait for gigabytes.
MAX_FIELD_BYTES = 16 * 1024 * 1024
MAX_CERTIFICATES = 64

T = TypeVar("T")
Decoder: TypeAlias = Generator[int, bytes, T]

_INT = struct.Struct(">i")
_LONG = struct.Struct(">q")


class ConnectionType(IntEnum):
    """Second int of every connection to the binder port; unknown values count as CLIENT."""

    CLIENT = 0
    WORKER = 1
    CE_QUERY = 2


class JobStatus(IntEnum):
    """Job states as numbered on the wire; a worker announces READY or FINISHED."""

    SUBMITTED = 0
    READY = 1
    BUSY = 2
    REUSABLE = 3
    FINISHED = 4


@dataclass(frozen=True, slots=True)
class Preamble:
    """The two ints that open every connection to the binder port."""

    version: int
    connection_type: int


@dataclass(frozen=True, slots=True)
class ClientHeader:
    """What a client sends first (job request or CE query); the binder forwards it to the worker."""

    candidate_ces: str = ""
    application_id: str = "TEST"
    access_string: str = ""
    required_wallclock_ms: int = 1000
    proxy_key: bytes = b""
    certificates: tuple[bytes, ...] = ()
    routing_info: str = ""
    connection_type: int = ConnectionType.CLIENT
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class WorkerHeader:
    """What a worker announces on connect; the binder relays it to the matched client."""

    job_id: str
    ce_name: str
    application_list: str = " TEST"
    access_string: str = ""
    max_wallclock_minutes: str = "1000"
    job_status: int = JobStatus.READY
    connection_type: int = ConnectionType.WORKER
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class WorkerResponse:
    """The worker's answer to a client header; an empty error means the job is on."""

    routing_info: str = ""
    error_description: str = ""


@dataclass(frozen=True, slots=True)
class CeEntry:
    """One CE in a CE_QUERY answer."""

    full_name: str
    short_name: str
    ready_jobs: int
    app_description: str


# The binder's "no worker for you" answer: an empty worker header, then the error.
REFUSAL_HEADER = WorkerHeader(
    job_id="",
    ce_name="",
    application_list="",
    access_string="",
    max_wallclock_minutes="",
    job_status=JobStatus.FINISHED,
    version=0,
)
REFUSAL_RESPONSE = WorkerResponse(routing_info="", error_description=NO_READY_JOBS)


# Encoding


def encode_int(value: int) -> bytes:
    """A 4-byte big-endian two's-complement int."""
    try:
        return _INT.pack(value)
    except struct.error as exc:
        raise WireError(f"{value} does not fit a 4-byte int") from exc


def encode_long(value: int) -> bytes:
    """An 8-byte big-endian two's-complement long."""
    try:
        return _LONG.pack(value)
    except struct.error as exc:
        raise WireError(f"{value} does not fit an 8-byte long") from exc


def encode_byte_array(data: bytes) -> bytes:
    """A 4-byte length, then the bytes."""
    return _INT.pack(len(data)) + data


def encode_string(text: str) -> bytes:
    """A 4-byte length, then ASCII bytes: Java sends one byte per character."""
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError as exc:
        raise WireError(
            f"{text[:40]!r} is not ASCII; WorkBinder mangles other characters, send ASCII only"
        ) from exc
    return _INT.pack(len(data)) + data


def encode_preamble(preamble: Preamble) -> bytes:
    return encode_int(preamble.version) + encode_int(preamble.connection_type)


def encode_client_header(header: ClientHeader) -> bytes:
    """Client header fields 1-9, certificates included."""
    parts = [
        encode_int(header.version),
        encode_int(header.connection_type),
        encode_string(header.candidate_ces),
        encode_string(header.application_id),
        encode_string(header.access_string),
        encode_long(header.required_wallclock_ms),
        encode_byte_array(header.proxy_key),
        encode_int(len(header.certificates)),
        *(encode_byte_array(cert) for cert in header.certificates),
        encode_string(header.routing_info),
    ]
    return b"".join(parts)


def encode_worker_header(header: WorkerHeader) -> bytes:
    parts = [
        encode_int(header.version),
        encode_int(header.connection_type),
        encode_string(header.job_id),
        encode_string(header.ce_name),
        encode_string(header.application_list),
        encode_string(header.access_string),
        encode_string(header.max_wallclock_minutes),
        encode_int(header.job_status),
    ]
    return b"".join(parts)


def encode_worker_response(response: WorkerResponse) -> bytes:
    return encode_string(response.routing_info) + encode_string(response.error_description)


def encode_ce_query_answer(entries: Sequence[CeEntry]) -> bytes:
    parts = [encode_int(len(entries))]
    for entry in entries:
        parts += [
            encode_string(entry.full_name),
            encode_string(entry.short_name),
            encode_int(entry.ready_jobs),
            encode_string(entry.app_description),
        ]
    return b"".join(parts)


REFUSAL = encode_worker_header(REFUSAL_HEADER) + encode_worker_response(REFUSAL_RESPONSE)


# Decoding: generators that yield a byte count and receive that many bytes.


def decode_int() -> Decoder[int]:
    data = yield 4
    value: int = _INT.unpack(data)[0]
    return value


def decode_long() -> Decoder[int]:
    data = yield 8
    value: int = _LONG.unpack(data)[0]
    return value


def _decode_length(field: str) -> Decoder[int]:
    length = yield from decode_int()
    if not 0 <= length <= MAX_FIELD_BYTES:
        raise WireError(f"{field} length {length} is outside 0..{MAX_FIELD_BYTES}")
    return length


def decode_byte_array() -> Decoder[bytes]:
    length = yield from _decode_length("byte array")
    data = yield length
    return data


def decode_string() -> Decoder[str]:
    """A length-prefixed string, decoded as UTF-8 like the Java reader does."""
    length = yield from _decode_length("string")
    data = yield length
    return data.decode("utf-8", errors="replace")


def decode_preamble() -> Decoder[Preamble]:
    version = yield from decode_int()
    connection_type = yield from decode_int()
    return Preamble(version, connection_type)


def decode_client_header(preamble: Preamble | None = None) -> Decoder[ClientHeader]:
    """A whole client header, or its rest when the binder has already read the preamble."""
    if preamble is None:
        preamble = yield from decode_preamble()
    candidate_ces = yield from decode_string()
    application_id = yield from decode_string()
    access_string = yield from decode_string()
    required_wallclock_ms = yield from decode_long()
    proxy_key = yield from decode_byte_array()

    count = yield from decode_int()
    if not 0 <= count <= MAX_CERTIFICATES:
        raise WireError(f"certificate count {count} is outside 0..{MAX_CERTIFICATES}")
    certificates = []
    for _ in range(count):
        certificates.append((yield from decode_byte_array()))

    routing_info = yield from decode_string()
    return ClientHeader(
        candidate_ces=candidate_ces,
        application_id=application_id,
        access_string=access_string,
        required_wallclock_ms=required_wallclock_ms,
        proxy_key=proxy_key,
        certificates=tuple(certificates),
        routing_info=routing_info,
        connection_type=preamble.connection_type,
        version=preamble.version,
    )


def decode_worker_header(preamble: Preamble | None = None) -> Decoder[WorkerHeader]:
    """A whole worker header, or its rest when the binder has already read the preamble."""
    if preamble is None:
        preamble = yield from decode_preamble()
    job_id = yield from decode_string()
    ce_name = yield from decode_string()
    application_list = yield from decode_string()
    access_string = yield from decode_string()
    max_wallclock_minutes = yield from decode_string()
    job_status = yield from decode_int()
    return WorkerHeader(
        job_id=job_id,
        ce_name=ce_name,
        application_list=application_list,
        access_string=access_string,
        max_wallclock_minutes=max_wallclock_minutes,
        job_status=job_status,
        connection_type=preamble.connection_type,
        version=preamble.version,
    )


def decode_worker_response() -> Decoder[WorkerResponse]:
    routing_info = yield from decode_string()
    error_description = yield from decode_string()
    return WorkerResponse(routing_info, error_description)


def decode_ce_query_answer() -> Decoder[tuple[CeEntry, ...]]:
    count = yield from decode_int()
    if count < 0:
        raise WireError(f"CE count {count} is negative")
    entries = []
    for _ in range(count):
        full_name = yield from decode_string()
        short_name = yield from decode_string()
        ready_jobs = yield from decode_int()
        app_description = yield from decode_string()
        entries.append(CeEntry(full_name, short_name, ready_jobs, app_description))
    return tuple(entries)


# Drivers: the only code that touches a transport.


def decode_all(decoder: Decoder[T], data: bytes) -> T:
    """Decode one message that must fill `data` exactly."""
    offset = 0
    try:
        wanted = next(decoder)
        while True:
            chunk = data[offset : offset + wanted]
            if len(chunk) < wanted:
                raise PeerClosed(wanted, chunk)
            offset += wanted
            wanted = decoder.send(chunk)
    except StopIteration as done:
        if offset != len(data):
            raise WireError(f"{len(data) - offset} bytes left over after the message") from None
        value: T = done.value
        return value


class SocketSource:
    """Reads messages from a blocking socket and counts the bytes it received."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = 0

    def read(self, decoder: Decoder[T]) -> T:
        try:
            wanted = next(decoder)
            while True:
                wanted = decoder.send(self._read_exactly(wanted))
        except StopIteration as done:
            value: T = done.value
            return value

    def _read_exactly(self, wanted: int) -> bytes:
        buffer = bytearray()
        while len(buffer) < wanted:
            chunk = self.sock.recv(wanted - len(buffer))
            if not chunk:
                raise PeerClosed(wanted, bytes(buffer))
            buffer += chunk
            self.received += len(chunk)
        return bytes(buffer)


class StreamSource:
    """Reads messages from an asyncio stream and counts the bytes it received."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.received = 0

    async def read(self, decoder: Decoder[T]) -> T:
        try:
            wanted = next(decoder)
            while True:
                try:
                    data = await self.reader.readexactly(wanted)
                except asyncio.IncompleteReadError as exc:
                    self.received += len(exc.partial)
                    raise PeerClosed(wanted, exc.partial) from None
                self.received += wanted
                wanted = decoder.send(data)
        except StopIteration as done:
            value: T = done.value
            return value
