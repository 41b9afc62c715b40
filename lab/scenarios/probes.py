"""What scenarios use to poke the binder: held TEST sessions and bounded pool waits."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from lab.errors import LabError, WireError
from lab.lab import Lab
from lab.protocol import wire
from lab.protocol.client import query_sync

POLL_S = 0.01  # CE queries take about a millisecond; 10 ms keeps the error below 50 ms.


class HeldJob:
    """A TEST session kept open, so its worker stays BUSY until `release`."""

    def __init__(self, port: int, deadline: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=deadline)
        self.source = wire.SocketSource(self.sock)
        header = wire.ClientHeader(routing_info="\n\tClient => lab (held)")
        try:
            self.sock.sendall(wire.encode_client_header(header))
            self.worker = self.source.read(wire.decode_worker_header())
            response = self.source.read(wire.decode_worker_response())
        except (OSError, WireError) as exc:
            self.sock.close()
            raise LabError(f"could not hold a worker: {exc}") from exc
        if response.error_description:
            self.sock.close()
            raise LabError(f"could not hold a worker: the binder said {response.error_description}")
        self.job_id = self.worker.job_id

    def ball(self, text: str) -> str:
        self.sock.sendall(wire.encode_string(text))
        return self.source.read(wire.decode_string())

    def release(self) -> float:
        """Send `enough`; return when it was sent, after the binder closed the session."""
        sent = time.monotonic()
        try:
            self.sock.sendall(wire.encode_string("enough"))
            self.sock.recv(64)
        except OSError:
            pass
        finally:
            self.sock.close()
        return sent

    def close(self) -> None:
        self.sock.close()


@dataclass
class PoolWait:
    """The outcome of waiting for the pool: when it got there, or what was last seen."""

    reached: float | None
    last_seen: str

    def seconds_since(self, start: float) -> float | None:
        return None if self.reached is None else self.reached - start


def wait_ready(lab: Lab, at_least: int, timeout: float) -> PoolWait:
    """Poll CE queries until READY >= at_least; a timeout is a result, not an error."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            ready = query_sync("127.0.0.1", lab.binder.endpoint.port, deadline=1.0).total_ready
            last = f"{ready} READY of {at_least}"
            if ready >= at_least:
                return PoolWait(time.monotonic(), last)
        except LabError as exc:
            last = f"query failed: {exc}"
        time.sleep(POLL_S)
    return PoolWait(None, last)


def wait_answering(lab: Lab, timeout: float) -> PoolWait:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            query_sync("127.0.0.1", lab.binder.endpoint.port, deadline=0.5)
            return PoolWait(time.monotonic(), "answering")
        except LabError as exc:
            last = str(exc)
        time.sleep(POLL_S)
    return PoolWait(None, last)
