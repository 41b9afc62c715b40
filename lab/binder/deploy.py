"""The binder on an engine: its files, its worker image, its pod, its start and stop.

The same path serves a real WorkBinder tree and the lab's stand-in: both read WorkBinder's
properties files, both run the lab's submit hook, both run from one worker image.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.binder import properties as props
from lab.binder.tree import copy_tree, tree_hash
from lab.engines.base import Engine
from lab.errors import LabError
from lab.manifest import pod_manifest
from lab.ports import ensure_free, free_port
from lab.protocol.client import query_sync
from lab.scenarios.schema import Scenario
from lab.waits import wait_for

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
TREE = "/opt/workbinder"  # the WorkBinder tree inside the image, and the binder's cwd
HOOK = "/opt/lab/submit_hook.py"
STANDIN_PYTHONPATH = "/opt/lab/py"
IN_POD = {"conf": "/lab/conf", "logs": "/lab/logs", "tmp": "/lab/tmp", "status": "/lab/status"}
REAL_WORKER = ["sh", "startBinderJobLocal.sh", "{ce}", "{routing}", "{job}", "{logfile}"]
STANDIN_WORKER = [
    "python3",
    "-m",
    "lab.standin.worker",
    f"{TREE}/WorkerDispatcher.properties",
    "{ce}",
    "{routing}",
    "{job}",
    "{logfile}",
]
SHUTDOWN = "SHUTDOWN"
# The stand-in's modules that go into its image: the standard library is all they use.
STANDIN_MODULES = ("__init__.py", "errors.py", "protocol", "standin")


@dataclass
class BinderEndpoint:
    """Where the lab's client and probes reach the binder."""

    host: str
    port: int
    admin_port: int
    ces: dict[str, str] = field(default_factory=dict)


SLOWDOWN_ENV = "LAB_STANDIN_SLOWDOWN"


def standin_slowdown() -> float:
    """A factor on every stand-in delay: a deliberate regression, to check the gate."""
    text = os.environ.get(SLOWDOWN_ENV, "1")
    try:
        factor = float(text)
    except ValueError:
        factor = 0.0
    if not 0.1 <= factor <= 10:
        raise LabError(f"{SLOWDOWN_ENV}={text!r}: give a factor between 0.1 and 10, e.g. 1.2")
    return factor


class BinderDeployment:
    """One binder (real or stand-in) and its worker pods on one engine."""

    def __init__(self, engine: Engine, scenario: Scenario, binder_home: Path | None) -> None:
        self.engine = engine
        self.scenario = scenario
        self.binder_home = binder_home
        self.kind = "real" if binder_home is not None else "standin"
        self.run_dir = engine.run_dir
        self.dirs = {name: self.run_dir / name for name in IN_POD}
        self.endpoint = BinderEndpoint("127.0.0.1", 0, 0, dict(scenario.binder.ces))
        self.listen_port = 0  # where the binder listens; endpoint.port is where clients go
        self.image = ""
        self.image_hash = ""
        self.pod_name = f"{engine.run_id}-binder"
        self.started_mono = 0.0
        self.starts = 0

    # -- preparing files and the image -----------------------------------------------

    def prepare(self) -> None:
        """Build the worker image, then write the run's properties and hook configuration."""
        fixed = self.scenario.binder.port
        if fixed is not None and self._on_host():
            ensure_free(
                fixed,
                "binder",
                "stop that program, or change or remove binder.port in the scenario",
            )
        for folder in self.dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        (self.dirs["logs"] / "workers").mkdir(exist_ok=True)
        context = self._image_context()
        shipped = self._shipped_properties(context)
        self.image_hash = tree_hash(context)
        self.image = f"localhost/lab-worker-{self.engine.run_id}:{self.image_hash}"
        self.engine.build_image(context, self.image, {"lab.binder": self.kind})
        # Ports are chosen last, just before the binder starts, so that no other program
        # has time to take them meanwhile; the image does not depend on them.
        self.listen_port = fixed or free_port()
        self.endpoint.admin_port = free_port()
        self._write_properties(shipped)
        self._write_hook_config()
        self.endpoint.host, self.endpoint.port = self._client_address()

    def _on_host(self) -> bool:
        """Whether the binder listens on this machine's own ports (podman's host network)."""
        return self.engine.name == "podman"

    def _client_address(self) -> tuple[str, int]:
        # On podman the binder listens on the host; on a cluster, behind a mapped port.
        address = getattr(self.engine, "client_address", None)
        if address is None:
            return "127.0.0.1", self.listen_port
        host, port = address(self.listen_port) if self.engine.name == "podman" else address()
        return str(host), int(port)

    def _image_context(self) -> Path:
        context = self.run_dir / "image"
        if context.exists():
            shutil.rmtree(context)
        (context / "lab").mkdir(parents=True)
        if self.binder_home is not None:
            copy_tree(self.binder_home, context / "workbinder")
        else:
            tree = context / "workbinder"
            tree.mkdir()
            # Mount points for the rendered files: the stand-in has no shipped ones.
            (tree / "binder.properties").write_text("")
            (tree / "WorkerDispatcher.properties").write_text("")
            py = context / "lab" / "py" / "lab"
            py.mkdir(parents=True)
            for name in STANDIN_MODULES:
                source = PACKAGE_ROOT / name
                if source.is_dir():
                    shutil.copytree(source, py / name, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(source, py / name)
        hook = context / "lab" / "submit_hook.py"
        shutil.copy2(PACKAGE_ROOT / "binder" / "submit_hook.py", hook)
        hook.chmod(0o755)
        base = self.engine.base_image()
        (context / "Containerfile").write_text(
            f"FROM {base}\n"
            f"COPY workbinder/ {TREE}/\n"
            "COPY lab/ /opt/lab/\n"
            f"ENV PYTHONPATH={STANDIN_PYTHONPATH}\n"
            f"WORKDIR {TREE}\n"
        )
        return context

    def _shipped_properties(self, context: Path) -> tuple[dict[str, str], dict[str, str]]:
        tree = context / "workbinder"
        binder = props.parse_properties((tree / "binder.properties").read_text())
        worker = props.parse_properties((tree / "WorkerDispatcher.properties").read_text())
        return binder, worker

    def _write_properties(self, shipped: tuple[dict[str, str], dict[str, str]]) -> None:
        binder, worker = dict(shipped[0]), dict(shipped[1])
        settings = self.scenario.binder
        overrides = {k: str(v) for k, v in settings.properties.items()}
        unknown = [k for k in overrides if k not in binder and not props.known_key(k)]
        if unknown:
            props.check_override_keys({k: "" for k in unknown})
        # WorkBinder's code default; the stand-in has no shipped file to take it from.
        binder.setdefault("DefaultApplicationList", "ANY")
        binder.update(overrides)
        binder.update(
            {
                "ListeningPort": str(self.listen_port),
                "AdminPort": str(self.endpoint.admin_port),
                "ShutDownCommand": SHUTDOWN,
                "CEs": " ".join(settings.ces),
                **{f"{short}_CE": full for short, full in settings.ces.items()},
                "MinPoolSize": str(settings.pool.min_pool_size),
                "DefaultMinJobsOnCE": str(settings.pool.min_jobs_on_ce),
                "DefaultMaxJobsOnCE": str(settings.pool.max_jobs_on_ce),
                "HtmlFileName": f"{IN_POD['status']}/PoolStatus.html",
                "HTMLFileCreationInterval": str(settings.status_interval_s),
                # WorkBinder turns SSL on when the key is missing; the lab has no certificates.
                "UseSSL": "off",
                "JobSubmissionType": "script",
                "Script": HOOK,
                "PROCESS_TWEAK_ENABLED": "yes",
                "RecoveryType": "none",
                "GeneratePerformanceMonitoringEvents": "false",
            }
        )
        standin = self.scenario.standin
        slow = standin_slowdown()
        if slow != 1.0:
            standin = standin.model_copy(
                update={
                    "first_submit_delay_ms": round(standin.first_submit_delay_ms * slow),
                    "refill_tick_ms": round(standin.refill_tick_ms * slow),
                    "worker_start_delay_ms": round(standin.worker_start_delay_ms * slow),
                    "reconnect_delay_ms": round(standin.reconnect_delay_ms * slow),
                }
            )
            log.warning(
                "the stand-in's delays are %.0f %% of the scenario's (%s)", slow * 100, SLOWDOWN_ENV
            )
        if self.kind == "standin":
            binder.update(
                {
                    "LabStandinFirstSubmitDelayMs": str(standin.first_submit_delay_ms),
                    "LabStandinRefillTickMs": str(standin.refill_tick_ms),
                }
            )
        worker.update(
            {
                "BinderAddress": self.engine.binder_address(),
                "BinderPort": str(self.listen_port),
                # WorkBinder appends the job id with no separator: keep the slash.
                "ReportsLocationDir": f"{IN_POD['logs']}/workers/",
                "UseSSL": "off",
            }
        )
        if self.kind == "standin":
            worker.update(
                {
                    "ApplicationList": "TEST",
                    "LabStandinWorkerStartDelayMs": str(standin.worker_start_delay_ms),
                    "LabStandinReconnectDelayMs": str(standin.reconnect_delay_ms),
                    "LabStandinWorkerRuns": str(standin.worker_runs),
                }
            )
        header = f"Rendered by workbinder-lab for run {self.engine.run_id}; do not edit."
        conf = self.dirs["conf"]
        (conf / "binder.properties").write_text(props.render_properties(binder, header))
        (conf / "WorkerDispatcher.properties").write_text(props.render_properties(worker, header))
        shutil.copy2(PACKAGE_ROOT / "binder" / "log4j.xml", conf / "log4j.xml")

    def _mounts(self) -> dict[str, str]:
        conf = self.dirs["conf"]
        mounts = {str(path): pod for name, pod in IN_POD.items() for path in [self.dirs[name]]}
        mounts[str(conf / "binder.properties")] = f"{TREE}/binder.properties"
        mounts[str(conf / "WorkerDispatcher.properties")] = f"{TREE}/WorkerDispatcher.properties"
        return mounts

    def worker_command(self) -> list[str]:
        if self.scenario.worker.command:
            return list(self.scenario.worker.command)
        return REAL_WORKER if self.kind == "real" else STANDIN_WORKER

    def _write_hook_config(self) -> None:
        template = pod_manifest(
            name="placeholder",
            run_id=self.engine.run_id,
            role="worker",
            image=self.image,
            command=self.worker_command(),
            restart_policy=self.scenario.worker.restart_policy,
            env={"TMPDIR": IN_POD["tmp"]},
            workdir=TREE,
            **self.engine.manifest_options(self._mounts()),
        )
        config = {
            "target": self.engine.hook_target(),
            "pod_template": template,
            "records": f"{IN_POD['logs']}/submissions.jsonl",
        }
        (self.dirs["conf"] / "hook.json").write_text(json.dumps(config, indent=2))

    # -- the binder's pod --------------------------------------------------------------

    def binder_command(self) -> list[str]:
        """How the binder's container starts; its output goes to the run's binder.log."""
        into_log = f">>{IN_POD['logs']}/binder.log 2>&1"
        override = self.scenario.binder.command
        if override:
            values = {"port": self.listen_port, "admin_port": self.endpoint.admin_port}
            argv = [part.format(**values) for part in override]
            return ["bash", "-c", f'exec "$@" {into_log}', "binder", *argv]
        if self.kind == "real":
            # run_binder.sh logs to stdout only; the lab keeps it in the run folder.
            return ["bash", "-c", f"exec bash run_binder.sh {into_log}"]
        return ["bash", "-c", f"exec python3 -m lab.standin.binder binder.properties {into_log}"]

    def binder_manifest(self) -> dict[str, Any]:
        mounts = {**self._mounts(), **self.engine.hook_mounts()}
        options = self.engine.manifest_options(mounts)
        if self.engine.name != "podman":
            # On a cluster the binder's port is published through its Service.
            options["ports"] = {"binder": self.listen_port}
        return pod_manifest(
            name=self.pod_name,
            run_id=self.engine.run_id,
            role="binder",
            image=self.image,
            command=self.binder_command(),
            restart_policy="Never",
            **options,
            env={
                "LAB_HOOK_CONFIG": f"{IN_POD['conf']}/hook.json",
                "TMPDIR": IN_POD["tmp"],
                # The full log line format, whatever log4j file the tree ships.
                "JAVA_TOOL_OPTIONS": f"-Dlog4j.configuration=file:{IN_POD['conf']}/log4j.xml",
            },
            workdir=TREE,
        )

    def start(self, timeout: float) -> float:
        """Start the binder's pod and wait until it listens; return the start's mono time."""
        self.start_pod()
        self.wait_listening(timeout)
        return self.started_mono

    def start_pod(self) -> float:
        """Start the binder's pod without waiting for it; return when it was started."""
        self.started_mono = time.monotonic()
        self.starts += 1
        marker = f"=== lab: binder start {self.starts} at {time.time():.3f} ===\n"
        with open(self.dirs["logs"] / "binder.log", "a") as binder_log:
            binder_log.write(marker)
        if self._on_host():
            # A taken port would only show as a binder that dies or never answers.
            hint = "another program took it since the lab chose it: run the lab again"
            if self.scenario.binder.port is not None:
                hint = "stop that program, or change or remove binder.port in the scenario"
            ensure_free(self.listen_port, "binder", hint)
            ensure_free(
                self.endpoint.admin_port,
                "binder's admin port",
                "another program took it since the lab chose it: run the lab again",
            )
        log.info("starting the %s binder on port %d", self.kind, self.listen_port)
        self.engine.apply(self.binder_manifest())
        return self.started_mono

    def wait_listening(self, timeout: float) -> None:
        def listening() -> tuple[bool, str]:
            phase = self._binder_phase()
            if phase in ("Failed", "Succeeded"):
                raise LabError(
                    f"the binder exited before listening ({phase}); its log says: {self.log_tail()}"
                )
            try:
                # A CE query, not a bare connect: WorkBinder logs a stack trace for those.
                query_sync("127.0.0.1", self.endpoint.port, deadline=1.0)
                return True, "answering"
            except LabError as exc:
                return False, f"binder pod {phase}, port {self.endpoint.port}: {exc}"

        wait_for(
            f"the binder to answer a CE query on port {self.endpoint.port}",
            listening,
            timeout=timeout,
            interval=0.05,
        )

    def _binder_phase(self) -> str:
        pods = self.engine.pods({"lab.role": "binder"})
        return pods[0].phase if pods else "absent"

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = (self.dirs["logs"] / "binder.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        tail = [line for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(tail) or "(empty)"

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the binder through its admin port, then remove its pod."""
        try:
            with socket.create_connection(("127.0.0.1", self.endpoint.admin_port), timeout=2) as s:
                s.sendall(f"{SHUTDOWN}\n".encode())
        except OSError:
            log.debug("admin port %d did not answer; removing the pod", self.endpoint.admin_port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._binder_phase() == "Running":
            time.sleep(0.1)
        self.engine.delete(self.pod_name)

    def kill(self) -> None:
        """SIGKILL the binder, as a crash would; its worker pods live on."""
        self.engine.kill(self.pod_name)

    def remove_pod(self) -> None:
        self.engine.delete(self.pod_name)

    def worker_pods(self) -> list[str]:
        return [pod.name for pod in self.engine.pods({"lab.role": "worker"})]

    def running_worker_pods(self) -> set[str]:
        """Worker pods still running: killed and exited ones stay listed until removed."""
        return {p.name for p in self.engine.pods({"lab.role": "worker"}) if p.phase == "Running"}
