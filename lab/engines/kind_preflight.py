"""Before kind creates a cluster: is Docker there, is kind recent, are ports and inotify fine.

Each check returns what is wrong together with its fix, so one failed bring-up tells the
user everything to change at once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lab.errors import CommandFailed, PortInUse, PreflightFailed, ToolMissing
from lab.ports import ensure_free
from lab.proc import run

log = logging.getLogger(__name__)

MIN_KIND = (0, 20, 0)
# What kind's known-issues page asks for: below these, nodes fail with "too many open files".
INOTIFY_MIN = {"max_user_watches": 524288, "max_user_instances": 512}


@dataclass(frozen=True)
class Problem:
    """Something in the way of a kind cluster, and how to clear it."""

    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what} (fix: {self.fix})"


def check_docker(docker: str = "docker") -> Problem | None:
    """Docker's daemon answers; kind runs every node as a Docker container."""
    try:
        done = run([docker, "version", "--format", "{{.Server.Version}}"], check=False, timeout=30)
    except ToolMissing:
        return Problem(
            "docker is not installed",
            "install Docker Engine (https://docs.docker.com/engine/install/)",
        )
    except CommandFailed as exc:
        return Problem(f"docker did not answer: {exc}", "restart Docker, then retry")
    if done.returncode != 0 or not done.stdout.strip():
        last = (done.stdout + done.stderr).strip().splitlines()
        return Problem(
            f"the Docker daemon is not reachable ({last[-1] if last else 'no output'})",
            "start it (`sudo systemctl start docker`), or set DOCKER_HOST, or add yourself "
            "to the docker group; `docker version` must show a Server section",
        )
    return None


def parse_kind_version(text: str) -> tuple[int, int, int] | None:
    match = re.search(r"v(\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        return None
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def check_kind_version(kind: str) -> Problem | None:
    """kind is recent enough for the lab's cluster config."""
    done = run([kind, "version"], check=False, timeout=30)
    version = parse_kind_version(done.stdout)
    wanted = ".".join(str(part) for part in MIN_KIND)
    if done.returncode != 0 or version is None:
        return Problem(
            f"`{kind} version` did not say a version ({(done.stdout + done.stderr).strip()!r})",
            f"install kind v{wanted} or newer, or remove it from PATH so the lab uses its "
            "pinned copy",
        )
    if version < MIN_KIND:
        return Problem(
            f"kind v{'.'.join(map(str, version))} is older than v{wanted}",
            "upgrade kind, or remove it from PATH so the lab uses its pinned copy",
        )
    return None


def check_ports(ports: dict[str, int]) -> list[Problem]:
    """Ports kind must bind on the host are free (0 means kind or the lab chooses)."""
    problems = []
    for what, port in ports.items():
        if port <= 0:
            continue
        try:
            ensure_free(port, what)
        except PortInUse as exc:
            problems.append(
                Problem(
                    str(exc).split(":")[0], f"stop what holds port {port}, or let the lab choose"
                )
            )
    return problems


def check_inotify(nodes: int, proc_root: Path = Path("/proc")) -> list[Problem]:
    """inotify limits high enough for the kubelets of `nodes` nodes on one kernel.

    Below them a multi-node cluster fails in odd ways; a single node usually copes, so
    there a low limit is only logged.
    """
    problems = []
    for key, minimum in INOTIFY_MIN.items():
        path = proc_root / "sys" / "fs" / "inotify" / key
        try:
            value = int(path.read_text().strip())
        except (OSError, ValueError):
            continue  # not Linux, or not readable: Docker Desktop's VM has its own limits
        if value >= minimum:
            continue
        problem = Problem(
            f"fs.inotify.{key} is {value}, below {minimum}",
            f"`sudo sysctl fs.inotify.{key}={minimum}` (add it to /etc/sysctl.conf to keep it)",
        )
        if nodes > 1:
            problems.append(problem)
        else:
            log.warning("%s", problem)
    return problems


def preflight(
    *,
    kind: str,
    nodes: int,
    ports: dict[str, int],
    docker: str = "docker",
    proc_root: Path = Path("/proc"),
) -> None:
    """Run every check; raise one PreflightFailed that lists each problem and its fix."""
    problems: list[Problem] = []
    docker_problem = check_docker(docker)
    if docker_problem is not None:
        problems.append(docker_problem)
    kind_problem = check_kind_version(kind)
    if kind_problem is not None:
        problems.append(kind_problem)
    problems += check_ports(ports)
    problems += check_inotify(nodes, proc_root)
    if problems:
        listed = "; ".join(f"{index}) {problem}" for index, problem in enumerate(problems, 1))
        raise PreflightFailed(f"kind cannot start here: {listed}")
