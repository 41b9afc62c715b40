"""The kind release the lab pins: where to get its binary, its checksums, its node images.

A `kind` on PATH wins. Without one, the pinned binary is downloaded once into the lab's
cache and used only if its sha256 is the one below.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from filelock import FileLock

from lab.errors import DownloadFailed, LabError
from lab.run import cache_dir

log = logging.getLogger(__name__)

KIND_VERSION = "v0.25.0"
RELEASE_URL = "https://github.com/kubernetes-sigs/kind/releases/download/{version}/kind-{os}-{arch}"
# The sha256 of each binary of the release, as its release page publishes them.
KIND_SHA256 = {
    ("linux", "amd64"): "b22ff7e5c02b8011e82cc3223d069d178b9e1543f1deb21e936d11764780a3d8",
    ("linux", "arm64"): "06e544e3f12ea54de5962ceaecd97513a25dbab4168a44f03f01833349afdda3",
    ("darwin", "amd64"): "180404ae1c0de8d333583d2958cdfac5338ec3e32cd765a158cfd6d09eb8cd7d",
    ("darwin", "arm64"): "222701bb72ff596928c57b3c64ca3e0b969d593ef24ccc790f9c17904e7b63ea",
}
# Node images built for this kind release, pinned by digest.
NODE_IMAGES = {
    "1.31.2": "kindest/node:v1.31.2@sha256:"
    "18fbefc20a7113353c7b75b5c869d7145a6abd6269154825872dc59c1329912e",
    "1.30.6": "kindest/node:v1.30.6@sha256:"
    "b6d08db72079ba5ae1f4a88a09025c0a904af3b52387643c285442afb05ab994",
    "1.29.10": "kindest/node:v1.29.10@sha256:"
    "3b2d8c31753e6c8069d4fc4517264cd20e86fd36220671fb7d0a5855103aa84b",
}
DEFAULT_KUBERNETES = "1.31.2"
MAX_BINARY_BYTES = 64 * 1024 * 1024
INSTALL_HINT = "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"


def node_image(kubernetes_version: str) -> str:
    """The pinned node image for a Kubernetes version."""
    version = kubernetes_version.removeprefix("v")
    try:
        return NODE_IMAGES[version]
    except KeyError:
        raise LabError(
            f"no pinned kind node image for Kubernetes {kubernetes_version}: choose one of "
            f"{', '.join(NODE_IMAGES)}, or pass node_image='kindest/node:<tag>@sha256:<digest>' "
            f"from the kind {KIND_VERSION} release notes"
        ) from None


def platform_key() -> tuple[str, str]:
    """This machine as kind's release names it: (os, arch)."""
    system = {"linux": "linux", "darwin": "darwin"}.get(sys.platform)
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower()
    )
    if system is None or arch is None:
        raise LabError(
            f"kind {KIND_VERSION} has no pinned binary for {sys.platform}/{platform.machine()}: "
            f"install kind yourself ({INSTALL_HINT}) and put it on PATH"
        )
    return system, arch


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_kind(
    *,
    cache: Path | None = None,
    url: str | None = None,
    sha256: str | None = None,
    timeout: float = 120.0,
    search_path: str | None = None,
) -> str:
    """The kind binary: from PATH, else the pinned release from the cache or downloaded."""
    on_path = shutil.which("kind", path=search_path)
    if on_path:
        return on_path

    system, arch = platform_key()
    want = sha256 or KIND_SHA256[(system, arch)]
    source = url or RELEASE_URL.format(version=KIND_VERSION, os=system, arch=arch)
    folder = (cache or cache_dir()) / "kind" / KIND_VERSION
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"kind-{system}-{arch}"

    with FileLock(str(target) + ".lock", timeout=timeout):
        if target.exists() and sha256_of(target) == want:
            return str(target)
        log.info("kind is not on PATH: downloading the pinned kind %s once", KIND_VERSION)
        _download(source, target, want, timeout)
    return str(target)


def _download(url: str, target: Path, want: str, timeout: float) -> None:
    """Fetch url into target only if its sha256 is `want`; say what to do otherwise."""
    partial = target.with_suffix(".part")
    deadline = time.monotonic() + timeout
    digest = hashlib.sha256()
    size = 0
    try:
        with (
            urllib.request.urlopen(url, timeout=min(timeout, 30.0)) as response,
            open(partial, "wb") as out,
        ):
            while chunk := response.read(1 << 20):
                size += len(chunk)
                if size > MAX_BINARY_BYTES or time.monotonic() > deadline:
                    raise DownloadFailed(
                        f"the kind download from {url} went past {MAX_BINARY_BYTES} bytes or "
                        f"{timeout:.0f} s (got {size} bytes): install kind yourself "
                        f"({INSTALL_HINT}) and put it on PATH"
                    )
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DownloadFailed(
            f"kind is not on PATH and the pinned kind {KIND_VERSION} could not be downloaded "
            f"from {url} ({reason}): install kind ({INSTALL_HINT}) and put it on PATH, or run "
            "once with network access so the lab can cache it"
        ) from exc
    except DownloadFailed:
        partial.unlink(missing_ok=True)
        raise

    got = digest.hexdigest()
    if got != want:
        partial.unlink(missing_ok=True)
        raise DownloadFailed(
            f"the kind binary from {url} has sha256 {got}, not the pinned {want}: it was "
            f"corrupted or replaced; retry, or install kind yourself ({INSTALL_HINT})"
        )
    os.chmod(partial, 0o755)
    partial.replace(target)
