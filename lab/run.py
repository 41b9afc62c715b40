"""One run of the lab: its id, its folder, and who owns it.

Every object a run creates carries the label `lab.run=<run id>`. Ownership lives in a
state file outside the repository so that any later run, from any folder, can tell a
live lab from the leftovers of one whose owner process died.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUN_LABEL = "lab.run"


def state_dir() -> Path:
    """Where run ownership records live; shared by every checkout on this machine."""
    base = os.environ.get("LAB_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "workbinder-lab"
    )
    path = Path(base) / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """Where built base images are kept between runs."""
    base = os.environ.get("LAB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "workbinder-lab"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_run_id() -> str:
    """A run id that is a valid label value and DNS-1123 fragment: r<time>-<random>."""
    return f"r{time.strftime('%m%d%H%M%S')}-{secrets.token_hex(3)}"


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid`, to tell a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces, so fields are counted after its closing paren.
    return stat.rsplit(")", 1)[1].split()[19]


def is_alive(pid: int, start: str | None) -> bool:
    return pid > 0 and start is not None and process_start_time(pid) == start


@dataclass
class RunRecord:
    """What outlives the process that brought a run up."""

    run_id: str
    run_dir: str
    engine: str
    owner_pid: int
    owner_start: str | None
    created: float = field(default_factory=time.time)
    # Processes of the run on the host that are not containers (the engine's API service).
    host_pids: dict[str, list[str | int | None]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return state_dir() / f"{self.run_id}.json"

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(self.path)

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)

    def owner_alive(self) -> bool:
        return is_alive(self.owner_pid, self.owner_start)

    def hand_to(self, pid: int) -> None:
        """Make `pid` the owner: the lab lives as long as that process does."""
        self.owner_pid = pid
        self.owner_start = process_start_time(pid)
        self.save()

    @classmethod
    def create(cls, run_id: str, run_dir: Path, engine: str) -> RunRecord:
        record = cls(
            run_id=run_id,
            run_dir=str(run_dir),
            engine=engine,
            owner_pid=os.getpid(),
            owner_start=process_start_time(os.getpid()),
        )
        record.save()
        return record

    @classmethod
    def load(cls, run_id: str) -> RunRecord | None:
        path = state_dir() / f"{run_id}.json"
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def all_records() -> list[RunRecord]:
    records = []
    for path in sorted(state_dir().glob("*.json")):
        record = RunRecord.load(path.stem)
        if record is not None:
            records.append(record)
    return records
