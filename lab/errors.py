"""The lab's exceptions: each message says what is wrong and what to do next."""


class LabError(Exception):
    """An error the lab reports to its user as one line, never as a traceback."""


class ToolMissing(LabError):
    """A program the lab drives is not installed."""


class CommandFailed(LabError):
    """A program the lab ran exited with an error; its output is kept."""

    def __init__(self, argv: list[str], returncode: int, output: str, hint: str = "") -> None:
        self.argv = argv
        self.returncode = returncode
        self.output = output
        last = output.strip().splitlines()[-1] if output.strip() else "no output"
        message = f"`{' '.join(argv[:3])}` failed (exit {returncode}): {last}"
        super().__init__(f"{message}; {hint}" if hint else message)


class WaitTimeout(LabError):
    """A bounded wait ran out; the message says what it waited for and last saw."""


class ManifestError(LabError):
    """A Pod manifest the lab was asked to apply is not valid."""


class ScenarioError(LabError):
    """A scenario file is not valid."""


class BinderTreeError(LabError):
    """The WorkBinder tree given to the lab is missing pieces."""


class PortInUse(LabError):
    """A port the lab needs is taken."""


class RunNotFound(LabError):
    """A run folder, or the results.json in it, is not where the user said."""


class ResultsBroken(LabError):
    """A results.json exists but cannot be read as one run's results."""


class BaselineError(LabError):
    """A baseline cannot be made from the given runs, or a baseline file is not one."""


class OutputUnwritable(LabError):
    """A file the user asked for (a baseline, a page, a verdict) cannot be written there."""


class PreflightFailed(LabError):
    """The machine lacks something an engine needs; each problem names its fix."""


class DownloadFailed(LabError):
    """A pinned download could not be fetched or did not match its checksum."""


class KubeApiError(LabError):
    """The Kubernetes API refused a request; the message carries its reason."""


class WireError(LabError):
    """Bytes on a WorkBinder connection do not follow protocol version 8."""


class PeerClosed(WireError):
    """The peer closed the connection in the middle of a message."""

    def __init__(self, wanted: int, partial: bytes) -> None:
        self.wanted = wanted
        self.partial = partial
        super().__init__(
            f"peer closed the connection after {len(partial)} of {wanted} bytes of a field"
        )


class QueryFailed(LabError):
    """A CE_QUERY to a binder got no usable answer."""


class StandinConfigError(LabError):
    """A properties file given to the stand-in binder or worker cannot be used."""


class NodeUnreachable(LabError):
    """A VM node did not answer over SSH, or answered with the wrong host key."""


class RemoteCommandFailed(CommandFailed):
    """A command run on a VM node over SSH exited with an error; its output is kept."""

    def __init__(
        self, node: str, argv: list[str], returncode: int, output: str, hint: str = ""
    ) -> None:
        self.node = node
        super().__init__(argv, returncode, output, hint)
        self.args = (f"on node {node}: {self.args[0]}",)


class NodeCheckFailed(LabError):
    """A node is not in the state Kubernetes needs (kubelet, API port, swap); fixes named."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C so the lab is torn down, but reported as SIGTERM.

    A supervisor (CI, systemd) that sent SIGTERM expects the exit status 143, not Ctrl-C's 130.
    """
