"""Running other programs: argv lists, explicit environments, output kept for errors."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from lab.errors import CommandFailed, ToolMissing

log = logging.getLogger(__name__)


def require_tool(name: str, hint: str) -> str:
    """Return the path of `name` on PATH, or raise with what to install."""
    path = shutil.which(name)
    if path is None:
        raise ToolMissing(f"{name} not found: {hint}")
    return path


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A new environment for a child: ours plus `extra`, never mutating os.environ."""
    env = dict(os.environ)
    env.update(extra or {})
    return env


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    input_text: str | None = None,
    timeout: float = 120.0,
    check: bool = True,
    hint: str = "",
) -> subprocess.CompletedProcess[str]:
    """Run argv to completion within `timeout` seconds; raise CommandFailed on error.

    The command runs in a session of its own. A terminal's Ctrl-C then reaches the lab
    alone, which ends the command itself, or lets it finish while it holds Ctrl-C during
    teardown; a command interrupted halfway through a teardown would leave pods behind.
    """
    argv = [str(a) for a in argv]
    log.debug("running: %s", " ".join(argv))
    try:
        done = subprocess.run(
            argv,
            env=dict(env) if env is not None else None,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise ToolMissing(f"{argv[0]} not found: {hint or 'install it and retry'}") from exc
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise CommandFailed(argv, -1, f"{out}\ntimed out after {timeout:.0f} s", hint) from exc
    if check and done.returncode != 0:
        raise CommandFailed(argv, done.returncode, done.stdout + done.stderr, hint)
    return done


def last_line(text: str, limit: int = 300) -> str:
    """The last line of some output that says anything, cut to fit a one-line error."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""
