"""The user's built WorkBinder tree: checked, never changed, copied into the run folder."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from lab.errors import BinderTreeError

# What the lab runs from a WorkBinder tree: classes, jars, the start scripts and the
# shipped properties it starts from.
REQUIRED = (
    "bin/yu/ac/bg/rcub/binder/Binder.class",
    "bin/yu/ac/bg/rcub/binder/handler/worker/WorkerDispatcher.class",
    "lib/log4j-1.2.15.jar",
    "run_binder.sh",
    "startBinderJobLocal.sh",
    "binder.properties",
    "WorkerDispatcher.properties",
)
# Not needed to run, and large or private: sources, IDE files, version control.
SKIPPED = {".git", ".idea", "nbproject", "src"}
ENV_VAR = "LAB_BINDER_HOME"


def binder_home_from(option: str | None) -> Path | None:
    """The WorkBinder tree named by the option or LAB_BINDER_HOME, or None for the stand-in."""
    value = option or os.environ.get(ENV_VAR)
    return Path(value).expanduser().resolve() if value else None


def check_tree(home: Path) -> None:
    """Refuse a tree that lacks what the lab runs, naming every missing piece."""
    if not home.is_dir():
        raise BinderTreeError(
            f"WorkBinder tree {home} is not a folder: point {ENV_VAR} (or `lab --binder-home`, "
            "pytest --lab-binder-home) at a built WorkBinder holding bin/ and lib/"
        )
    missing = [part for part in REQUIRED if not (home / part).exists()]
    if missing:
        raise BinderTreeError(
            f"WorkBinder tree {home} lacks {', '.join(missing)}: build it first "
            "(compile src/ into bin/) and point the lab at the built folder"
        )


def copy_tree(home: Path, dest: Path) -> Path:
    """Copy the tree into the run folder; the lab only ever changes this copy."""
    check_tree(home)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(
        home, dest, ignore=lambda _dir, names: [n for n in names if n in SKIPPED], symlinks=True
    )
    return dest


def tree_hash(root: Path, exclude: frozenset[str] = frozenset()) -> str:
    """A content hash of every file under root (paths and bytes), for image tags."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative in exclude:
            continue
        digest.update(relative.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
        digest.update(oct(path.stat().st_mode & 0o111).encode())
    return digest.hexdigest()[:16]
