"""Free ports for a run, and a clear word when one is taken."""

from __future__ import annotations

import re
import socket

from lab.errors import LabError, PortInUse
from lab.proc import run

# What `ss -p` prints of a socket's owners: ("name",pid=123,fd=4),("name",pid=...
HOLDER = re.compile(r'\("([^"]*)",pid=(\d+)')


def free_port() -> int:
    """A TCP port free on every interface (WorkBinder binds its port on all of them)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


def port_holder(port: int) -> str:
    """Who listens on `port`, as `ss` tells it ("python3 (pid 123)"), or '' when unknown."""
    try:
        done = run(["ss", "-Hltnp", f"sport = :{port}"], check=False, timeout=10)
    except LabError:  # No ss on this machine: the message goes without a holder.
        return ""
    holders = {f"{name} (pid {pid})" for name, pid in HOLDER.findall(done.stdout)}
    return ", ".join(sorted(holders))


def ensure_free(port: int, what: str, hint: str = "") -> None:
    """Raise PortInUse naming the port and its holder when `port` cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As a listener does: a connection of the past still closing must not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            holder = port_holder(port)
            held = f" (held by {holder})" if holder else ""
            raise PortInUse(
                f"port {port} for the {what} is in use{held}: "
                f"{hint or 'stop that program, or let the lab choose a free port'}"
            ) from exc
