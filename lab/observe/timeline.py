"""One timeline of a run: every source's events on the lab's monotonic clock.

Sources: the binder's log, the submit hook's records (monotonic already: containers share
the host's clock), the engine's container events, the workers' log files (whose last
write marks their READY), and what the scenario runner itself did and saw.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab.engines.base import Engine
from lab.observe.binderlog import LogFollower
from lab.report.results import PoolSample, TimelineEvent

READY_LINE = "Job Status sent to the binder: READY."


@dataclass
class JobPhases:
    """When one job got through each step, on the monotonic clock (None: not seen)."""

    job: str
    submitted: float | None = None
    container_started: float | None = None
    ready: float | None = None


@dataclass
class Observer:
    """Collects a run's events as they happen, and answers questions about them."""

    run_dir: Path
    engine: Engine
    origin: float = field(default_factory=time.monotonic)
    # wall - mono, to put wall-clock stamps (logs, files, podman) on the monotonic clock.
    offset: float = field(default_factory=lambda: time.time() - time.monotonic())
    own: list[TimelineEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.binder_log = LogFollower(self.run_dir / "logs" / "binder.log")

    def mono(self, wall: float) -> float:
        return wall - self.offset

    def note(self, kind: str, detail: str = "", job: str = "", at: float | None = None) -> None:
        """Record something the runner did (a fault) or saw (a client's outcome)."""
        moment = time.monotonic() if at is None else at
        self.own.append(TimelineEvent(t=moment - self.origin, kind=kind, job=job, detail=detail))

    # -- sources -----------------------------------------------------------------------

    def log_events(self) -> list[TimelineEvent]:
        self.binder_log.poll()
        return [
            TimelineEvent(t=self.mono(e.wall) - self.origin, kind=e.kind, job=e.job, detail=e.line)
            for e in self.binder_log.events
        ]

    def first_logged(self, kind: str, after: float) -> float | None:
        """When the binder first logged an event of `kind` after `after` (both mono)."""
        self.binder_log.poll()
        for event in self.binder_log.events:
            moment = self.mono(event.wall)
            if event.kind == kind and moment > after:
                return moment
        return None

    def submissions(self) -> list[dict[str, object]]:
        path = self.run_dir / "logs" / "submissions.jsonl"
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # A record being written right now.
        return records

    def ready_times(self) -> dict[str, float]:
        """Each job's latest READY, from its worker log's last write (mono clock)."""
        found: dict[str, float] = {}
        folder = self.run_dir / "logs" / "workers"
        for path in folder.glob("*"):
            try:
                stat = path.stat()
                text = path.read_text(errors="replace")
            except OSError:
                continue
            # A READY worker's log ends where it waits for a client; that write is READY.
            if READY_LINE in text and "Disconnected from the binder." not in text:
                found[path.name] = self.mono(stat.st_mtime)
        return found

    def job_phases(self) -> dict[str, JobPhases]:
        self.binder_log.poll()
        phases: dict[str, JobPhases] = {}
        pods: dict[str, str] = {}
        for record in self.submissions():
            job = str(record.get("job", ""))
            if not job:
                continue
            phases[job] = JobPhases(job=job, submitted=float(str(record["mono"])))
            pods[str(record.get("pod", ""))] = job
        # The binder's own log line is the moment of submission; the hook starts later.
        for logged in self.binder_log.events:
            if logged.kind == "submitted" and logged.job in phases:
                phases[logged.job].submitted = self.mono(logged.wall)
        for event in self.engine.events():
            job = pods.get(event.pod, "")
            if job and event.kind in ("start", "init") and phases[job].container_started is None:
                phases[job].container_started = event.mono
        for job, ready in self.ready_times().items():
            if job in phases:
                phases[job].ready = ready
        return phases

    # -- the whole picture -------------------------------------------------------------

    def timeline(self) -> list[TimelineEvent]:
        events = list(self.own) + self.log_events()
        for record in self.submissions():
            if not record.get("ok", True):
                events.append(
                    TimelineEvent(
                        t=float(str(record["mono"])) - self.origin,
                        kind="hook_failed",
                        job=str(record.get("job", "")),
                        detail=str(record.get("error", ""))[:200],
                    )
                )
        for event in self.engine.events():
            if event.kind in ("start", "died"):
                events.append(
                    TimelineEvent(
                        t=event.mono - self.origin,
                        kind=f"container_{event.kind}",
                        detail=f"{event.pod} {event.detail}".strip(),
                    )
                )
        return sorted(events, key=lambda e: e.t)

    def pool(self, events: list[TimelineEvent] | None = None) -> list[PoolSample]:
        """Counts per state over time, as the binder's log tells them."""
        ready = busy = submitted = 0
        samples = [PoolSample(t=0.0, ready=0, busy=0, submitted=0)]
        for event in events if events is not None else self.timeline():
            if event.kind == "binder_up":
                ready = busy = submitted = 0
            elif event.kind == "submitted":
                submitted += 1
            elif event.kind == "ready":
                ready, submitted = ready + 1, max(0, submitted - 1)
            elif event.kind == "reused":
                ready += 1
            elif event.kind == "busy":
                ready, busy = max(0, ready - 1), busy + 1
            elif event.kind == "reusable":
                busy = max(0, busy - 1)
            elif event.kind == "aged_out":
                submitted = max(0, submitted - 1)
            else:
                continue
            samples.append(PoolSample(t=event.t, ready=ready, busy=busy, submitted=submitted))
        return samples
