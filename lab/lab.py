"""One lab: an engine brought up for a run, with the binder deployed on it.

A Lab is a context manager: whatever happens inside (an error, Ctrl-C, SIGTERM), leaving
it tears the run down, unless it was asked to keep the lab up.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from lab.binder.deploy import BinderDeployment
from lab.engines import make_engine
from lab.engines.base import Engine, PodInfo
from lab.errors import LabError, Terminated
from lab.proc import last_line
from lab.protocol.client import query_sync
from lab.run import new_run_id
from lab.scenarios.schema import Scenario
from lab.waits import wait_for

log = logging.getLogger(__name__)

LAB_FILE = "lab.json"
HOOK_RECORDS = "submissions.jsonl"  # the submit hook's records, in the run's logs folder


@dataclass
class HookRecords:
    """What the submit hook's records say: how many jobs it started, and why any failed."""

    ok: int = 0
    failed: int = 0
    last_error: str = ""

    @classmethod
    def read(cls, path: Path) -> HookRecords:
        records = cls()
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:  # The hook has not run yet.
            return records
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:  # A record being written right now.
                continue
            if not isinstance(record, dict):
                continue
            if record.get("ok"):
                records.ok += 1
            else:
                records.failed += 1
                records.last_error = " ".join(str(record.get("error", "no error given")).split())
        return records

    def summary(self) -> str:
        if not self.ok and not self.failed:
            return "no job submitted yet"
        text = f"submit hook {self.ok} ok, {self.failed} failed"
        return f"{text} (the last: {self.last_error})" if self.failed else text


def pod_phases(pods: list[PodInfo], what: str = "worker pods") -> str:
    """Pods counted by phase, e.g. `3 worker pods: 2 Running, 1 Failed (4 restarts)`."""
    if not pods:
        return f"no {what}"
    counts: dict[str, int] = {}
    for pod in pods:
        counts[pod.phase] = counts.get(pod.phase, 0) + 1
    phases = ", ".join(f"{n} {phase}" for phase, n in sorted(counts.items()))
    restarts = sum(pod.restarts for pod in pods)
    return f"{len(pods)} {what}: {phases}" + (f" ({restarts} restarts)" if restarts else "")


@dataclass
class LabTimes:
    """How long bring-up took, step by step, in seconds."""

    engine_up: float = 0.0
    binder_prepared: float = 0.0
    binder_listening: float = 0.0
    pool_full: float = 0.0


class Lab:
    """An engine and a binder for one run."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        binder_home: Path | None = None,
        engine: str | None = None,
        runs_root: Path = Path(".lab/runs"),
        run_id: str | None = None,
        keep: bool = False,
    ) -> None:
        self.scenario = scenario
        self.run_id = run_id or new_run_id()
        self.run_dir = (runs_root / self.run_id).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.engine: Engine = make_engine(engine or scenario.engine, self.run_id, self.run_dir)
        self.binder = BinderDeployment(self.engine, scenario, binder_home)
        self.times = LabTimes()
        self.started_mono = time.monotonic()
        self._is_up = False

    # -- bring-up --------------------------------------------------------------------

    def up(self, wait_pool: bool = True) -> Lab:
        """Engine up, binder prepared and started, and (by default) its pool full."""
        started = time.monotonic()
        log.info("run %s: bringing up the %s engine", self.run_id, self.engine.name)
        self._is_up = True
        self.engine.up()
        self.times.engine_up = time.monotonic() - started
        self.binder.prepare()
        self.times.binder_prepared = time.monotonic() - started
        self._save()
        binder_started = self.binder.start(self.scenario.deadlines.bring_up_s)
        self.times.binder_listening = time.monotonic() - binder_started
        if wait_pool:
            self.wait_pool_full(self.scenario.deadlines.pool_full_s)
            self.times.pool_full = time.monotonic() - binder_started
            log.info(
                "run %s: pool of %d READY workers after %.1f s",
                self.run_id,
                self.scenario.binder.pool.min_pool_size,
                self.times.pool_full,
            )
        return self

    def ready_count(self) -> int:
        """READY jobs as the binder reports them to a CE query (dead ones included)."""
        return query_sync("127.0.0.1", self.binder.endpoint.port, deadline=2.0).total_ready

    def wait_pool_full(self, timeout: float, size: int | None = None) -> float:
        """Wait until the binder reports at least `size` READY jobs; return when it did.

        Gives up before the deadline when the pool cannot fill: the submit hook failed for
        as many jobs as the pool needs and for none it started, or as many worker pods
        failed and none is left running.
        """
        wanted = size if size is not None else self.scenario.binder.pool.min_pool_size

        def full() -> tuple[bool, str]:
            try:
                ready = self.ready_count()
                answer = f"{ready} READY of {wanted}"
            except LabError as exc:
                ready, answer = 0, f"query failed: {exc}"
            workers = self.engine.pods({"lab.role": "worker"})
            hook = HookRecords.read(self.binder.dirs["logs"] / HOOK_RECORDS)
            seen = f"{answer}, {pod_phases(workers)}, {hook.summary()}"
            if ready >= wanted:
                return True, seen
            self._give_up_if_hopeless(wanted, workers, hook, seen)
            return False, seen

        wait_for(f"a pool of {wanted} READY workers", full, timeout=timeout, interval=0.05)
        return time.monotonic()

    def _give_up_if_hopeless(
        self, wanted: int, workers: list[PodInfo], hook: HookRecords, seen: str
    ) -> None:
        if hook.failed >= wanted and hook.ok == 0:
            raise LabError(
                f"the submit hook failed for all {hook.failed} jobs the binder submitted, "
                f"so no worker started; its last record says: {hook.last_error}; see "
                f"{self.binder.dirs['logs'] / HOOK_RECORDS}"
            )
        failed = [pod for pod in workers if pod.phase == "Failed"]
        alive = [pod for pod in workers if pod.phase in ("Running", "Pending")]
        if len(failed) >= wanted and not alive:
            try:
                said = last_line(self.engine.logs(failed[-1].name)) or "nothing"
            except LabError as exc:
                said = f"(its log cannot be read: {exc})"
            raise LabError(
                f"no worker came up ({seen}); the last failed one says: {said}; check "
                "worker.command in the scenario and the worker image"
            )

    @classmethod
    def attach(cls, scenario: Scenario, run_dir: Path, binder_home: Path | None) -> Lab:
        """A handle on a lab another process brought up (a pytest-xdist sibling)."""
        info = json.loads((run_dir / LAB_FILE).read_text())
        lab = cls(
            scenario,
            binder_home=binder_home,
            engine=info["engine"],
            runs_root=run_dir.parent,
            run_id=info["run_id"],
        )
        lab.binder.endpoint.port = int(info["port"])
        lab.binder.endpoint.admin_port = int(info["admin_port"])
        lab.binder.image = str(info["image"])
        lab._is_up = False  # Its owner tears it down, not this handle.
        return lab

    def _save(self) -> None:
        info = {
            "run_id": self.run_id,
            "engine": self.engine.name,
            "binder": self.binder.kind,
            "port": self.binder.endpoint.port,
            "admin_port": self.binder.endpoint.admin_port,
            "image": self.binder.image,
            "scenario": self.scenario.name,
        }
        (self.run_dir / LAB_FILE).write_text(json.dumps(info, indent=2))

    # -- teardown --------------------------------------------------------------------

    def down(self) -> None:
        """Remove everything of the run. Ctrl-C cannot cut this short."""
        if not self._is_up:
            return
        with _signals_deferred():
            log.info("run %s: tearing down", self.run_id)
            try:
                self.binder.shutdown(timeout=3.0)
            except LabError as exc:
                log.debug("binder shutdown: %s", exc)
            try:
                self.engine.down()
            except LabError as exc:
                # Teardown must not hide the error that caused it; `lab clean` finishes it.
                log.warning("run %s: teardown incomplete (%s); run `lab clean`", self.run_id, exc)
            self._is_up = False

    def detach(self) -> None:
        """Leave the lab running after this process exits (`lab up`)."""
        self.engine.detach()
        self._is_up = False

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.keep and kind is None:
            log.info("run %s: kept up (lab down %s removes it)", self.run_id, self.run_id)
            self.detach()
            return
        self.down()


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then act on them."""
    received: list[int] = []

    def remember(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    try:
        old = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # Not the main thread: signals cannot be handled here anyway.
        yield
        return
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if signal.SIGTERM in received:
            raise Terminated
        if received:
            raise KeyboardInterrupt


def terminate_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so context managers tear the lab down."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, interrupt)
