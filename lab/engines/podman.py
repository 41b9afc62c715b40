"""The embedded engine: podman with runc, Pod manifests played with `podman kube play`.

It needs no Docker daemon and no registry. Images are built through the Docker API that
`podman system service` serves on a unix socket in the run folder; the same socket is
mounted into the binder's container so its submit hook can start worker pods.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors

from lab.binder.submit_hook import apply_podman
from lab.engines.base import EngineEvent, PodInfo
from lab.engines.images import debian_mirror, ensure_base_image
from lab.errors import CommandFailed, LabError, ManifestError
from lab.manifest import check_pod_manifest
from lab.proc import child_env, last_line, require_tool, run
from lab.run import RUN_LABEL, RunRecord, all_records, is_alive, process_start_time, state_dir
from lab.waits import wait_for

log = logging.getLogger(__name__)

PODMAN_HINT = "run `make setup`, or install podman and runc (apt-get install podman runc)"
SERVICE_START_TIMEOUT_S = 30.0
# Removing a run's pods takes seconds each when podman is busy; this bounds the retries.
REMOVE_TIMEOUT_S = 120.0
SOCKET_NAME = "podman.sock"
SOCKET_PATH_MAX = 107  # a unix socket's path, in bytes, without its closing NUL
# Where the binder's container finds this run's podman API socket.
HOOK_SOCKET = "/run/lab/podman.sock"
# What a worker may ask for, capped below at the machine's hard limits (the default
# ulimits of podman ask for more than this machine grants, and containers then fail).
WANTED_ULIMITS = {"nofile": (65536, resource.RLIMIT_NOFILE), "nproc": (8192, resource.RLIMIT_NPROC)}
PHASES = {
    "running": "Running",
    "created": "Pending",
    "configured": "Pending",
    "initialized": "Pending",
    "paused": "Running",
    "stopping": "Running",
}


def containers_conf() -> str:
    """containers.conf for the lab: runc, host network, ulimits the machine can grant."""
    ulimits = []
    for name, (wanted, which) in WANTED_ULIMITS.items():
        _soft, hard = resource.getrlimit(which)
        value = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        ulimits.append(f'"{name}={value}:{value}"')
    return (
        "# Written by workbinder-lab for one run; named by CONTAINERS_CONF.\n"
        "[containers]\n"
        f"default_ulimits = [{', '.join(ulimits)}]\n"
        'netns = "host"\n'
        "[engine]\n"
        "# crun fails on hosts with hybrid cgroups; runc works there.\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )


def podman_env(run_dir: Path) -> dict[str, str]:
    """The environment every podman command of this run gets."""
    conf = run_dir / "containers.conf"
    if not conf.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        conf.write_text(containers_conf())
    return child_env({"CONTAINERS_CONF": str(conf)})


class PodmanEngine:
    """Runs a lab's pods as podman pods on this machine's host network."""

    name = "podman"

    def __init__(self, run_id: str, run_dir: Path, keep: bool = False) -> None:
        self.run_id = run_id
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.socket = self.run_dir / SOCKET_NAME
        self.env = podman_env(self.run_dir)
        self.record: RunRecord | None = None
        self._service: subprocess.Popen[bytes] | None = None
        self._client: docker.DockerClient | None = None
        # Engine event times are wall-clock; this maps them onto the monotonic clock.
        self._clock_offset = time.time() - time.monotonic()
        self._started_wall = time.time()

    # -- bring-up and teardown -------------------------------------------------------

    def up(self) -> None:
        require_tool("podman", PODMAN_HINT)
        require_tool("runc", PODMAN_HINT)
        if len(str(self.socket).encode()) > SOCKET_PATH_MAX:
            raise LabError(
                f"the run folder {self.run_dir} is too deep for the run's API socket "
                f"({len(str(self.socket).encode())} bytes, unix sockets allow "
                f"{SOCKET_PATH_MAX}): use a shorter --run-dir, e.g. /tmp/lab-runs"
            )
        sweep_leftovers(self.env)
        self.record = RunRecord.create(self.run_id, self.run_dir, self.name)
        log.info("starting the podman API service for run %s", self.run_id)
        self._start_service()

    def _start_service(self) -> None:
        self.socket.unlink(missing_ok=True)
        service_log = open(self.run_dir / "podman-service.log", "ab")  # noqa: SIM115
        self._service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
            env=self.env,
            stdout=service_log,
            stderr=subprocess.STDOUT,
            # Its own session: Ctrl-C reaches the lab, which then stops it in order.
            start_new_session=True,
        )
        service_log.close()
        assert self.record is not None
        pid = self._service.pid
        self.record.host_pids["podman-service"] = [pid, process_start_time(pid)]
        self.record.save()

        def answering() -> tuple[bool, str]:
            if self._service is not None and self._service.poll() is not None:
                raise CommandFailed(
                    ["podman", "system", "service"],
                    self._service.returncode,
                    (self.run_dir / "podman-service.log").read_text(),
                    PODMAN_HINT,
                )
            try:
                self.client.ping()
                return True, "answering"
            except Exception as exc:  # The socket appears before the API answers.
                return False, f"{type(exc).__name__}"

        wait_for("the podman API socket", answering, timeout=SERVICE_START_TIMEOUT_S)

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = docker.DockerClient(base_url=f"unix://{self.socket}", timeout=300)
        return self._client

    def base_image(self) -> str:
        """The cached base image (Debian + JRE), built on first use."""
        return ensure_base_image(self.env, debian_mirror())

    def down(self) -> None:
        """Stop the API service, then remove every pod, container, volume and image of the run.

        The service goes first: through it the binder's submit hook starts new worker pods,
        which would otherwise appear behind the removal.
        """
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._service is not None:
            _stop_process(self._service.pid)
            self._service = None
        record = self.record or RunRecord.load(self.run_id)
        stop_run_processes(self.run_id, record)
        remove_run(self.env, self.run_id)
        if record is not None:
            record.forget()
        self.record = None

    def detach(self) -> None:
        """Leave the lab up after this process exits: the API service becomes its owner."""
        if self.record is not None and self._service is not None:
            self.record.hand_to(self._service.pid)

    # -- images and pods -------------------------------------------------------------

    def build_image(self, context: Path, tag: str, labels: dict[str, str]) -> str:
        labels = {RUN_LABEL: self.run_id, **labels}
        log.info("building image %s", tag)
        try:
            image, _logs = self.client.images.build(
                path=str(context),
                dockerfile="Containerfile",
                tag=tag,
                labels=labels,
                rm=True,
                # Cached layers are shared between runs, and removing one run's image
                # removes the cached layers under it, in the middle of another run's build.
                nocache=True,
                network_mode="host",
                pull=False,
            )
        except docker.errors.BuildError as exc:
            tail = "".join(str(part.get("stream", "")) for part in exc.build_log)[-800:]
            raise LabError(f"building image {tag} failed: {exc.msg}; last output: {tail}") from exc
        except docker.errors.APIError as exc:
            raise LabError(f"building image {tag} failed: {exc.explanation}") from exc
        return str(image.id)

    def apply(self, manifest: dict[str, Any]) -> None:
        check_pod_manifest(manifest)
        name = manifest["metadata"]["name"]
        log.debug("playing pod %s", name)
        try:
            apply_podman({"socket": str(self.socket)}, manifest)
        except RuntimeError as exc:
            raise ManifestError(f"podman refused pod {name}: {exc}") from exc

    def hook_target(self) -> dict[str, Any]:
        return {"kind": "podman", "socket": HOOK_SOCKET, "name_prefix": f"{self.run_id}-"}

    def hook_mounts(self) -> dict[str, str]:
        """What the binder's container needs mounted for its submit hook to reach podman."""
        return {str(self.socket): HOOK_SOCKET}

    def binder_address(self) -> str:
        """Where workers reach the binder: everything shares the host's loopback."""
        return "127.0.0.1"

    def manifest_options(self, mounts: dict[str, str] | None = None) -> dict[str, Any]:
        """pod_manifest keywords for this engine: host network, host paths mounted."""
        return {"mounts": dict(mounts or {})}

    def client_address(self, listen_port: int) -> tuple[str, int]:
        """Where the host's clients reach a binder listening on `listen_port`."""
        return "127.0.0.1", listen_port

    def pods(self, selector: dict[str, str] | None = None) -> list[PodInfo]:
        filters = [f"--filter=label={RUN_LABEL}={self.run_id}"]
        filters += [f"--filter=label={k}={v}" for k, v in (selector or {}).items()]
        listed = run(["podman", "pod", "ps", "--format", "json", *filters], env=self.env)
        pods = json.loads(listed.stdout or "[]") or []
        containers = self._containers()
        now = time.time()
        infos = []
        for pod in pods:
            members = [c for c in containers if c["Pod"] == pod["Id"] and not c["IsInfra"]]
            infos.append(
                PodInfo(
                    name=pod["Name"],
                    phase=_phase(members),
                    restarts=sum(int(c["RestartCount"]) for c in members),
                    age_s=max(0.0, now - _parse_time(pod["Created"])),
                    labels=dict(pod.get("Labels") or {}),
                )
            )
        return sorted(infos, key=lambda p: p.name)

    def _containers(self) -> list[dict[str, Any]]:
        ids = run(
            ["podman", "ps", "-a", "-q", "--filter", f"label={RUN_LABEL}={self.run_id}"],
            env=self.env,
        ).stdout.split()
        if not ids:
            return []
        inspected = run(["podman", "container", "inspect", *ids], env=self.env, check=False)
        details = json.loads(inspected.stdout or "[]") or []
        return [
            {
                "Name": c["Name"],
                "Pod": c.get("Pod", ""),
                "IsInfra": c.get("IsInfra", False),
                "RestartCount": c.get("RestartCount", 0),
                "State": c["State"],
            }
            for c in details
        ]

    def _workload_container(self, pod: str) -> dict[str, Any]:
        found = run(["podman", "pod", "inspect", pod], env=self.env, check=False)
        if found.returncode != 0:
            raise LabError(f"no pod {pod} in run {self.run_id}: see `lab status`")
        data = json.loads(found.stdout)
        data = data[0] if isinstance(data, list) else data
        infra = data.get("InfraContainerID", "")
        for member in data.get("Containers", []):
            if member["Id"] != infra:
                return dict(member)
        raise LabError(f"pod {pod} has no workload container")

    def kill(self, pod: str) -> None:
        """SIGKILL the container's main process from outside, as a crash would.

        `podman kill` counts as a deliberate stop and suppresses the restart policy;
        a crash must not.
        """
        member = self._workload_container(pod)
        pid_text = run(
            ["podman", "inspect", "--format", "{{.State.Pid}}", member["Id"]], env=self.env
        ).stdout.strip()
        pid = int(pid_text or 0)
        if pid <= 0:
            raise LabError(f"pod {pod} has no running process to kill (state: {member['State']})")
        log.info("killing pod %s (pid %d) with SIGKILL", pod, pid)
        os.kill(pid, signal.SIGKILL)

    def delete(self, pod: str) -> None:
        run(["podman", "pod", "stop", "-t", "0", pod], env=self.env, check=False)
        run(["podman", "pod", "rm", "-f", "-t", "0", pod], env=self.env, check=False)

    def logs(self, pod: str) -> str:
        member = self._workload_container(pod)
        done = run(["podman", "logs", member["Id"]], env=self.env, check=False)
        return done.stdout + done.stderr

    def events(self) -> list[EngineEvent]:
        since = datetime.fromtimestamp(self._started_wall - 1).strftime("%Y-%m-%dT%H:%M:%S")
        done = run(
            [
                "podman",
                "events",
                "--since",
                since,
                "--stream=false",
                "--format",
                "json",
                "--filter",
                f"label={RUN_LABEL}={self.run_id}",
                "--filter",
                "type=container",
            ],
            env=self.env,
            check=False,
            timeout=60,
        )
        events = []
        for line in done.stdout.splitlines():
            try:
                raw = json.loads(line)
            except ValueError:
                continue
            wall = _parse_time(raw["Time"])
            exit_code = raw.get("ContainerExitCode")
            events.append(
                EngineEvent(
                    mono=wall - self._clock_offset,
                    wall=wall,
                    pod=str(raw.get("Name", "")).rsplit("-", 1)[0],
                    kind=str(raw.get("Status", "")),
                    detail="" if exit_code is None else f"exit {exit_code}",
                )
            )
        return events


# -- helpers shared by bring-up, teardown and `lab clean` ---------------------------------


def _phase(members: list[dict[str, Any]]) -> str:
    if not members:
        return "Unknown"
    states = [m["State"] for m in members]
    if any(s.get("Status") == "running" for s in states):
        return "Running"
    if all(s.get("Status") == "exited" for s in states):
        return "Succeeded" if all(s.get("ExitCode") == 0 for s in states) else "Failed"
    return PHASES.get(str(states[0].get("Status")), "Unknown")


TIME_PATTERN = re.compile(
    r"^(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)(?:\.(\d+))?\s*(Z|[+-]\d\d:?\d\d)?"
)


def _parse_time(text: str | int | float) -> float:
    """Seconds since the epoch from podman's times (RFC 3339 with nanoseconds, or epoch)."""
    if isinstance(text, int | float):
        return float(text)
    match = TIME_PATTERN.match(text.strip())
    if match is None:
        raise LabError(f"podman printed a time the lab cannot read: {text!r}")
    day, clock, fraction, zone = match.groups()
    # Python reads at most microseconds; podman prints nanoseconds.
    micro = (fraction or "0")[:6].ljust(6, "0")
    zone = "+00:00" if zone in (None, "Z") else zone
    return datetime.fromisoformat(f"{day}T{clock}.{micro}{zone}").timestamp()


def _stop_process(pid: int, grace_s: float = 5.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return
        except ChildProcessError:
            if not Path(f"/proc/{pid}").exists():
                return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def service_pids(run_id: str) -> list[int]:
    """The run's API services still alive, found by their socket's path.

    The ownership record names the service once it has started; this also finds one whose
    start was cut short, by Ctrl-C or SIGKILL, before the record was written.
    """
    suffix = f"/{run_id}/{SOCKET_NAME}"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # It exited meanwhile.
            continue
        if (
            Path(argv[0]).name == "podman"
            and argv[1:3] == ["system", "service"]
            and any(arg.endswith(suffix) for arg in argv)
        ):
            found.append(int(proc.name))
    return found


def stop_run_processes(run_id: str, record: RunRecord | None) -> None:
    """Stop the host processes of a run: those its record names and its API services."""
    if record is not None:
        for pid, start in record.host_pids.values():
            if isinstance(pid, int) and is_alive(pid, start if isinstance(start, str) else None):
                _stop_process(pid)
    for pid in service_pids(run_id):
        _stop_process(pid)


def run_objects(env: dict[str, str], run_id: str) -> list[str]:
    """Every pod, container, volume and image labeled with the run, as `kind id`."""
    label = f"label={RUN_LABEL}={run_id}"
    found = []
    for kind, argv in (
        ("pod", ["pod", "ps", "-q"]),
        ("container", ["ps", "-aq"]),
        ("volume", ["volume", "ls", "-q"]),
        ("image", ["images", "-q"]),
    ):
        listed = run(["podman", *argv, "--filter", label], env=env, check=False)
        if listed.returncode != 0:
            # Podman fails a listing when an object goes away while it lists: unknown
            # counts as not yet removed, so the caller looks again.
            found.append(f"{kind}s unknown ({last_line(listed.stderr) or 'no output'})")
            continue
        found += [f"{kind} {ident}" for ident in listed.stdout.split()]
    return found


def remove_run(env: dict[str, str], run_id: str, timeout: float = REMOVE_TIMEOUT_S) -> None:
    """Remove every podman object labeled with the run, until podman lists none.

    One pass usually does it; another is needed when a pod appeared or a removal was cut
    short meanwhile. Raises LabError naming what is left when `timeout` runs out.
    """
    deadline = time.monotonic() + timeout
    while True:
        _remove_once(env, run_id)
        left = run_objects(env, run_id)
        if not left:
            return
        if time.monotonic() >= deadline:
            raise LabError(
                f"run {run_id}: {len(left)} objects still there after {timeout:.0f} s of "
                f"removing ({', '.join(left[:4])}); see `podman ps -a`, then run `lab clean`"
            )
        log.info("run %s: %d objects still there; removing again", run_id, len(left))


def _remove_once(env: dict[str, str], run_id: str) -> None:
    label = f"label={RUN_LABEL}={run_id}"
    pods = run(["podman", "pod", "ps", "-q", "--filter", label], env=env, check=False)
    if pods.stdout.split():
        # Stopping first is much faster than `pod rm -f -t 0` alone (seconds per pod), and
        # than `pod kill`: after a kill, the removal waits seconds for conmon to let go of
        # the pod's cgroup, while a stop has cleaned up by the time it returns.
        run(
            ["podman", "pod", "stop", "-t", "0", *pods.stdout.split()],
            env=env,
            check=False,
            timeout=300,
        )
        run(
            ["podman", "pod", "rm", "-f", "-t", "0", *pods.stdout.split()],
            env=env,
            check=False,
            timeout=300,
        )
    ctrs = run(["podman", "ps", "-aq", "--filter", label], env=env, check=False)
    if ctrs.stdout.split():
        run(
            ["podman", "rm", "-f", "-t", "0", *ctrs.stdout.split()],
            env=env,
            check=False,
            timeout=300,
        )
    run(["podman", "volume", "prune", "-f", "--filter", label], env=env, check=False)
    images = run(["podman", "images", "-q", "--filter", label], env=env, check=False)
    if images.stdout.split():
        run(
            ["podman", "rmi", "-f", *sorted(set(images.stdout.split()))],
            env=env,
            check=False,
            timeout=300,
        )


def labeled_runs(env: dict[str, str]) -> set[str]:
    """Run ids that still have pods, containers or images on this machine."""
    found: set[str] = set()
    for argv in (["podman", "pod", "ps"], ["podman", "ps", "-a"], ["podman", "images"]):
        done = run(
            [*argv, "--filter", f"label={RUN_LABEL}", "--format", "json"], env=env, check=False
        )
        for item in json.loads(done.stdout or "[]") or []:
            labels = item.get("Labels") or {}
            if RUN_LABEL in labels:
                found.add(labels[RUN_LABEL])
    return found


def sweep_leftovers(env: dict[str, str], everything: bool = False) -> list[str]:
    """Remove the runs whose owner process is gone (or all runs, with everything=True)."""
    known = {record.run_id for record in all_records()}
    swept = []
    for run_id in sorted(labeled_runs(env) | known):
        # Read afresh, just before judging: a run that started after the listing has a
        # record by now (it writes one before it makes anything podman lists), and one
        # that has removed itself meanwhile has none.
        record = RunRecord.load(run_id)
        if not everything:
            if record is None:
                # No record here: perhaps a lab of another state folder (another user, a
                # test's own LAB_STATE_DIR) that is alive. Only `lab clean --all` removes it.
                log.debug("run %s has no record in %s; left alone", run_id, state_dir())
                continue
            if record.owner_alive():
                continue
        log.info("removing leftovers of run %s (its owner is gone)", run_id)
        stop_run_processes(run_id, record)
        try:
            remove_run(env, run_id)
        except LabError as exc:
            # Another run's leftovers must not stop this one; the next sweep tries again.
            log.warning("%s", exc)
            continue
        if record is not None:
            record.forget()
        swept.append(run_id)
    return swept
