"""The lab's base image: Debian with a headless JRE, built offline and cached.

No registry is reachable, so the image is made from Debian's own packages: debootstrap
a root file system, `podman import` it, and keep it under a key of its inputs. A warm
bring-up finds the image (or the root file system's tarball) and builds nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path

from filelock import FileLock

from lab.errors import CommandFailed, LabError, WaitTimeout
from lab.proc import require_tool, run
from lab.run import cache_dir

log = logging.getLogger(__name__)

BASE_REPO = "localhost/workbinder-lab/base"
CACHE_LABEL = "lab.cache"
SUITE = "bookworm"
# A JRE for WorkBinder, python3 for the stand-in and the submit hook, procps to look
# inside a worker, openssh-server so a container can stand in for a VM node.
PACKAGES = ("openjdk-17-jre-headless", "python3", "procps", "openssh-server", "iproute2")
RECIPE_VERSION = "1"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEBOOTSTRAP_TIMEOUT_S = 1800.0


def debian_mirror(sources: Path = Path("/etc/apt/sources.list.d/debian.sources")) -> str:
    """The Debian mirror this machine's apt already uses, so debootstrap reaches it too."""
    if os.environ.get("LAB_DEBIAN_MIRROR"):
        return os.environ["LAB_DEBIAN_MIRROR"]
    candidates = [sources, Path("/etc/apt/sources.list")]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for match in re.finditer(r"(?:URIs:|deb)\s+(\S+/debian)/?\s", text + "\n"):
            return match.group(1)
    raise LabError(
        "no Debian mirror found in /etc/apt/sources*: set LAB_DEBIAN_MIRROR to one, or "
        "provide the base image with `podman import`"
    )


def base_key(mirror: str) -> str:
    """The cache key: everything that changes what goes into the image."""
    inputs = {"suite": SUITE, "packages": PACKAGES, "mirror": mirror, "recipe": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def base_image_tag(mirror: str) -> str:
    return f"{BASE_REPO}:{base_key(mirror)}"


def ensure_base_image(podman_env: dict[str, str], mirror: str, progress: bool = True) -> str:
    """Return the base image's tag, building it if neither it nor its tarball is cached."""
    tag = base_image_tag(mirror)
    lock = FileLock(str(cache_dir() / "base.lock"), timeout=DEBOOTSTRAP_TIMEOUT_S)
    with lock:
        if image_exists(podman_env, tag):
            log.debug("base image %s is cached", tag)
            return tag
        tarball = cache_dir() / f"base-{base_key(mirror)}.tar"
        if not tarball.exists():
            build_rootfs_tarball(tarball, mirror, progress)
        log.info("importing the base image %s from %s", tag, tarball)
        started = time.monotonic()
        run(
            [
                "podman",
                "import",
                "--change",
                f"ENV {PATH_ENV}",
                "--change",
                'CMD ["/bin/bash"]',
                "--change",
                f"LABEL {CACHE_LABEL}=base",
                str(tarball),
                tag,
            ],
            env=podman_env,
            timeout=600,
        )
        log.info("base image ready in %.0f s", time.monotonic() - started)
    return tag


def image_exists(podman_env: dict[str, str], tag: str) -> bool:
    done = run(["podman", "image", "exists", tag], env=podman_env, check=False, timeout=60)
    return done.returncode == 0


def build_rootfs_tarball(tarball: Path, mirror: str, progress: bool) -> None:
    """debootstrap a Debian root file system and pack it as a tarball."""
    require_tool("debootstrap", "run `make setup` (installs debootstrap) and retry")
    work = tarball.with_suffix(".rootfs")
    run(["rm", "-rf", str(work)], timeout=300)
    log.info("building the base image from Debian packages (cold, takes a few minutes)")
    started = time.monotonic()
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(work),
        mirror,
    ]
    lines = _run_with_progress(argv, "debootstrap" if progress else "")
    log.info("debootstrap done in %.0f s; packing the root file system", time.monotonic() - started)
    # Package caches and lists are dead weight in every container.
    run(["rm", "-rf", f"{work}/var/cache/apt/archives", f"{work}/var/lib/apt/lists"], timeout=120)
    partial = tarball.with_suffix(".partial")
    run(["tar", "-C", str(work), "-cf", str(partial), "."], timeout=600)
    partial.replace(tarball)
    run(["rm", "-rf", str(work)], timeout=300)
    log.debug("debootstrap printed %d lines", lines)


def _run_with_progress(argv: list[str], label: str) -> int:
    """Run a long command, showing its latest line; raise with its tail on failure."""
    from rich.console import Console

    console = Console(stderr=True)
    tail: list[str] = []
    log.debug("running: %s", " ".join(argv))
    deadline = time.monotonic() + DEBOOTSTRAP_TIMEOUT_S
    with (
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as child,
        console.status(f"{label}: starting", spinner="dots") as status,
    ):
        assert child.stdout is not None
        # A child that hangs without printing would block the reading below for good.
        watchdog = threading.Timer(DEBOOTSTRAP_TIMEOUT_S, child.kill)
        watchdog.start()
        try:
            for line in child.stdout:
                tail = (tail + [line.rstrip()])[-20:]
                if label:
                    status.update(f"{label}: {line.strip()[:90]}")
                if time.monotonic() > deadline:
                    child.kill()
                    break
        finally:
            watchdog.cancel()
        code = child.wait()
    if time.monotonic() > deadline:
        raise WaitTimeout(
            f"gave up after {DEBOOTSTRAP_TIMEOUT_S:.0f} s waiting for {label or argv[0]} to "
            f"finish; last saw: {tail[-1] if tail else 'no output'}; check the Debian mirror"
        )
    if code != 0:
        raise CommandFailed(argv, code, "\n".join(tail), "check the Debian mirror and disk space")
    return len(tail)
