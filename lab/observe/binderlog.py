"""WorkBinder's log lines (the stand-in writes the same) turned into job events.

Only the full log4j format carries what the lab needs (DEBUG lines, milliseconds), which
is why the deployment names its own log4j configuration. Lines are read as UTC: the
binder's container has no time zone set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) +([A-Z]+) +\[([^\]]*)\] \(([^)]*)\) (.*)$"
)
# Message patterns, in the order they are tried. Job ids are in some lines only: WorkBinder
# does not name the job when a new worker becomes READY or a client is matched.
EVENTS = (
    ("binder_up", re.compile(r"^Start listening on port: (\d+)\.")),
    ("submitted", re.compile(r"^Saving worker job ID = (\S+?)\.$")),
    ("ready", re.compile(r"^Adding worker job\.$")),
    ("reused", re.compile(r"^Reusing worker job JobID: (\S+?)(?::\d+)?\.$")),
    ("busy", re.compile(r"^Worker and client matched")),
    ("reusable", re.compile(r"^End exchanging data between")),
    ("refused", re.compile(r"^No ready jobs on CEs")),
    ("removed", re.compile(r"^CE: [^,]+, Job (\S+?)(?::\d+)? did not reconnect in time")),
    ("expired", re.compile(r"^CE: [^,]+, Job (\S+?)(?::\d+)? exceeded MaxWallClockTime")),
    ("aged_out", re.compile(r"aged->removed")),
    ("finished", re.compile(r"^WorkerJob \(JobID:(\S+?)\) informed that it has finished")),
    ("worker_refused", re.compile(r"^WorkerJob not added to the pool")),
    ("shutdown", re.compile(r"^Admin connected from localhost, shutting down")),
    ("start_failed", re.compile(r"^Could not listen on port")),
)


@dataclass(frozen=True)
class LogEvent:
    wall: float
    kind: str
    job: str
    line: str


def parse_line(text: str) -> LogEvent | None:
    """The job event a log line records, or None for any other line."""
    match = LINE.match(text)
    if match is None:
        return None
    stamp, millis, _level, _logger, _thread, message = match.groups()
    for kind, pattern in EVENTS:
        found = pattern.search(message)
        if found:
            job = found.group(1) if found.groups() and kind != "binder_up" else ""
            wall = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
            return LogEvent(wall + int(millis) / 1000, kind, job, message[:200])
    return None


class LogFollower:
    """Reads a growing log file from where it last stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = ""
        self.events: list[LogEvent] = []

    def poll(self) -> list[LogEvent]:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as log_file:
                log_file.seek(self.offset)
                chunk = log_file.read()
                self.offset = log_file.tell()
        except OSError:
            return []
        lines = (self.partial + chunk).split("\n")
        self.partial = lines.pop()
        fresh = [event for event in map(parse_line, lines) if event is not None]
        self.events.extend(fresh)
        return fresh
