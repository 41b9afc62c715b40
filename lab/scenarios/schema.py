"""The scenario file's schema: every field, its default and what it allows."""

from __future__ import annotations

import hashlib
import string
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lab.errors import ScenarioError

DEFAULT_CE = {"Site-A": "site-a.lab.invalid:8443/lab-pool"}
WORKER_PLACEHOLDERS = ("ce", "routing", "job", "logfile")
BINDER_PLACEHOLDERS = ("port", "admin_port")
MAX_TEXT_CHARS = 1_000_000
MAX_FLOW_DEPTH = 64


class Strict(BaseModel):
    # A typo in a scenario must be an error, not a silently ignored key.
    model_config = ConfigDict(extra="forbid")


class PoolSettings(Strict):
    min_pool_size: int = Field(4, ge=1, le=64, description="MinPoolSize: the real pool size")
    min_jobs_on_ce: int = Field(4, ge=1, le=64, description="DefaultMinJobsOnCE (IDLE cap)")
    max_jobs_on_ce: int = Field(4, ge=1, le=64, description="DefaultMaxJobsOnCE (ACTIVE cap)")


class BinderSettings(Strict):
    ces: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_CE))
    pool: PoolSettings = PoolSettings()
    status_interval_s: int = Field(1, ge=1, le=600, description="HTMLFileCreationInterval")
    # Raw binder.properties keys; only keys WorkBinder knows are accepted.
    properties: dict[str, str | int | float] = Field(default_factory=dict)
    # None: a port free when the lab starts, so two labs never collide. A fixed port is
    # for reaching the binder from elsewhere; the lab refuses it when it is taken.
    port: int | None = Field(None, ge=1024, le=65535, description="ListeningPort")
    # None: WorkBinder's run_binder.sh (or the stand-in). Replaces how the binder's
    # container starts; {port} and {admin_port} are filled in.
    command: list[str] | None = None

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str] | None) -> list[str] | None:
        return _checked_command(value, BINDER_PLACEHOLDERS)

    @field_validator("ces")
    @classmethod
    def _ces(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("list at least one CE: short name -> full name")
        for short, full in value.items():
            if not short.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"CE short name {short!r} may hold letters, digits, - and _")
            if not full or any(ch.isspace() for ch in full):
                raise ValueError(f"CE full name {full!r} must be non-empty with no spaces")
        return value


class WorkerSettings(Strict):
    # None: WorkBinder's own start script (or the stand-in worker). Placeholders:
    # {ce} {routing} {job} {logfile}, the four arguments the binder gives the hook.
    command: list[str] | None = None
    restart_policy: Literal["Always", "OnFailure", "Never"] = "Never"

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str] | None) -> list[str] | None:
        return _checked_command(value, WORKER_PLACEHOLDERS)


def _checked_command(value: list[str] | None, allowed: tuple[str, ...]) -> list[str] | None:
    """Refuse an empty command and placeholders that would only fail once a pod starts."""
    if value is None:
        return None
    if not value or not value[0].strip():
        raise ValueError("give the program to run first, e.g. [sh, start.sh]")
    names = ", ".join("{" + name + "}" for name in allowed)
    for part in value:
        try:
            fields = [field for _text, field, _spec, _conv in string.Formatter().parse(part)]
        except ValueError as exc:
            raise ValueError(f"{part!r}: {exc}; write a literal brace as {{{{ or }}}}") from None
        for field in fields:
            if field is not None and field not in allowed:
                raise ValueError(f"{part!r}: unknown placeholder {{{field}}}; known: {names}")
    return value


class StandinSettings(Strict):
    """Timings of the stand-in binder: the known truth measurements are checked against."""

    first_submit_delay_ms: int = Field(3000, ge=0, le=600_000)
    refill_tick_ms: int = Field(3000, ge=50, le=600_000)
    worker_start_delay_ms: int = Field(0, ge=0, le=600_000)
    reconnect_delay_ms: int = Field(100, ge=0, le=600_000)
    worker_runs: int = Field(50, ge=1, le=1_000_000)


class Deadlines(Strict):
    bring_up_s: float = Field(300, gt=0, le=3600)
    pool_full_s: float = Field(120, gt=0, le=3600)
    recovery_s: float = Field(60, gt=0, le=3600)


class RefillSettings(Strict):
    enabled: bool = True
    repetitions: int = Field(3, ge=1, le=1000)
    drain_clients: int = Field(2, ge=1, le=64, description="K clients holding K workers")
    hold_s: float = Field(1.0, ge=0, le=600, description="how long the K clients hold")


class FailoverSettings(Strict):
    enabled: bool = True
    repetitions: int = Field(2, ge=1, le=1000)
    kill_ready: bool = True
    kill_busy: bool = True
    restart_binder: bool = True


class ThroughputSettings(Strict):
    enabled: bool = True
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16])
    duration_s: float = Field(10, gt=0, le=3600)
    retry_after_refusal_ms: int = Field(20, ge=0, le=10_000)

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, value: list[int]) -> list[int]:
        if not value or any(level < 1 or level > 2000 for level in value):
            raise ValueError("give concurrency levels between 1 and 2000")
        return value


class Scenario(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    description: str = ""
    engine: Literal["podman", "kind", "vbox"] = "podman"
    binder: BinderSettings = BinderSettings()
    worker: WorkerSettings = WorkerSettings()
    standin: StandinSettings = StandinSettings()
    deadlines: Deadlines = Deadlines()
    refill: RefillSettings = RefillSettings()
    failover: FailoverSettings = FailoverSettings()
    throughput: ThroughputSettings = ThroughputSettings()


def load_scenario(path: Path) -> tuple[Scenario, str]:
    """Read and check a scenario file; return it with the hash of its text."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read it ({exc.strerror}); check the path") from exc
    return parse_scenario(text, str(path)), hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_scenario(text: str, source: str = "<scenario>") -> Scenario:
    """Check a scenario's text; any fault is one ScenarioError line naming the field."""
    if len(text) > MAX_TEXT_CHARS:
        raise ScenarioError(f"{source}: {len(text)} characters; a scenario is a few hundred")
    if _flow_depth(text) > MAX_FLOW_DEPTH:
        # PyYAML takes seconds over thousands of open brackets before it gives up.
        raise ScenarioError(f"{source}: brackets nested deeper than {MAX_FLOW_DEPTH} levels")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise ScenarioError(f"{source}:{line} is not valid YAML: {_first_line(exc)}") from exc
    except (ValueError, TypeError, OverflowError) as exc:
        # PyYAML builds dates and numbers with Python's own constructors, which raise
        # these for text that only looks like one (a 13th month, say).
        raise ScenarioError(f"{source}: a value cannot be read: {_first_line(exc)}") from exc
    except RecursionError:
        raise ScenarioError(f"{source}: nested too deeply to be a scenario") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario is a mapping with at least `name:`")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(_one_line(str(part)) for part in error["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ScenarioError(f"{source}: {field}: {_one_line(error['msg'])}{more}") from exc
    except RecursionError:
        raise ScenarioError(f"{source}: nested too deeply to be a scenario") from None


def _flow_depth(text: str) -> int:
    """How deep [ and { nest outside quotes and comments: an upper bound, cheaply."""
    depth = deepest = 0
    quote = ""
    comment = False
    for char in text:
        if char == "\n":
            comment = False
        elif comment:
            continue
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#":
            comment = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest


def _one_line(text: str, limit: int = 200) -> str:
    """Text from the file, shown so that it cannot break the error's one line."""
    shown = text if text.isprintable() else repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return _one_line(text.splitlines()[0]) if text else type(exc).__name__
