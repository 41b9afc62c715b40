"""A stand-in for WorkBinder's binder and worker, in Python with the standard library only.

`python3 -m lab.standin.binder binder.properties` and `python3 -m lab.standin.worker …`
take the same files and arguments as the Java programs, speak the same protocol and write
the same log lines, with timings set by extra properties keys so that a measurement can be
checked against a known truth.

This module holds what both share: Java properties files and precise sleeps.
"""

from __future__ import annotations

import time

from lab.errors import StandinConfigError


def require_plain_tcp(props: dict[str, str]) -> None:
    """Refuse SSL, as WorkBinder's default turns it on when the key is missing."""
    if props.get("UseSSL", "yes").strip().lower() == "yes":
        raise StandinConfigError(
            "UseSSL is on (a missing key means on); the stand-in speaks plain TCP only: "
            "set `UseSSL = off`"
        )


def read_properties(path: str) -> dict[str, str]:
    """Parse a Java .properties file: `key = value`, `key: value` or `key value` lines.

    Comments (# or !), blank lines and backslash continuations are handled; unicode
    escapes are not, since WorkBinder's files have none.
    """
    try:
        with open(path, encoding="latin-1") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise StandinConfigError(f"cannot read properties file {path}: {exc.strerror}") from exc

    properties: dict[str, str] = {}
    pending = ""
    for raw in lines:
        line = pending + raw.lstrip()
        pending = ""
        if not line or line[0] in "#!":
            continue
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending = line[:-1]
            continue
        key, value = _split_property(line)
        properties[key] = value
    if pending:
        key, value = _split_property(pending)
        properties[key] = value
    return properties


def _split_property(line: str) -> tuple[str, str]:
    for index, char in enumerate(line):
        if char in "=: \t":
            key = line[:index]
            rest = line[index:].lstrip(" \t")
            if rest[:1] in ("=", ":") and char in " \t":
                rest = rest[1:]
            elif char in "=:":
                rest = rest[1:]
            return key, rest.strip()
    return line, ""


def int_property(properties: dict[str, str], key: str, default: int) -> int:
    """An integer value; a missing or malformed one falls back to `default`, as in WorkBinder."""
    value = properties.get(key, "").strip()
    try:
        return int(value)
    except ValueError:
        return default


def sleep_until(deadline: float) -> None:
    """Sleep until time.monotonic() reaches `deadline`, never waking early."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(remaining)
