"""Bounded waits: a deadline on a monotonic clock, and a report of what was last seen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from lab.errors import WaitTimeout

T = TypeVar("T")


def wait_for(
    what: str,
    probe: Callable[[], tuple[bool, T]],
    *,
    timeout: float,
    interval: float = 0.1,
) -> T:
    """Call probe until it returns (True, value) or `timeout` seconds pass.

    probe returns (done, last_seen); last_seen goes into the timeout message so an
    operator can tell a slow start from a wrong one.
    """
    deadline = time.monotonic() + timeout
    last: object = "nothing yet"
    while True:
        done, seen = probe()
        last = seen
        if done:
            return seen
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"gave up after {timeout:.0f} s waiting for {what}; last saw: {last}")
        time.sleep(interval)
