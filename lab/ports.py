"""Free ports for a run, and a clear word when one is taken."""

from __future__ import annotations

import socket

from lab.errors import PortInUse
from lab.proc import run


def free_port() -> int:
    """A TCP port free on every interface (WorkBinder binds its port on all of them)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


def port_holder(port: int) -> str:
    """Who listens on `port`, as `ss` tells it, or '' when it cannot tell."""
    try:
        done = run(["ss", "-Hltnp", f"sport = :{port}"], check=False, timeout=10)
    except Exception:
        return ""
    line = done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
    if "users:((" in line:
        return line.split("users:((", 1)[1].split(")", 1)[0]
    return ""


def ensure_free(port: int, what: str) -> None:
    """Raise PortInUse naming the port and its holder when `port` cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            holder = port_holder(port)
            held = f" (held by {holder})" if holder else ""
            raise PortInUse(
                f"port {port} for the {what} is in use{held}: stop that program or let the "
                "lab choose a free port"
            ) from exc
