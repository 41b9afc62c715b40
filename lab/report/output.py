"""Writing the files a user names: whole or not at all, and one line when it cannot be done."""

from __future__ import annotations

import contextlib
from pathlib import Path

from lab.errors import OutputUnwritable


def write_whole(path: Path, text: str, what: str) -> Path:
    """Write `text` to `path` through a temporary file, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # a parent that is a file has no tmp to remove
            tmp.unlink(missing_ok=True)
        reason = exc.strerror or type(exc).__name__
        raise OutputUnwritable(
            f"cannot write {what} to {path} ({reason}): name a file in a folder you can write"
        ) from exc
    return path
