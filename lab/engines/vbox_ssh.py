"""Reaching VM nodes: the run's SSH keys, a bounded remote executor, and node checks.

Every node's host key is made by the lab and written into its seed, so the first login
already checks it: an unknown or changed key is refused, never accepted on trust.
Remote commands are argument lists; they are quoted for the node's shell with shlex.
"""

from __future__ import annotations

import base64
import functools
import logging
import select
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import paramiko
import testinfra.host
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from testinfra.backend.paramiko import ParamikoBackend

from lab.errors import NodeCheckFailed, NodeUnreachable, RemoteCommandFailed
from lab.waits import wait_for

log = logging.getLogger(__name__)

LOGIN_KEY = "id_ed25519"
CONNECT_TIMEOUT_S = 10.0


# -- keys ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public: str  # one OpenSSH line: "ssh-ed25519 AAAA... comment"

    @property
    def private_text(self) -> str:
        return self.private_path.read_text()


def ensure_key(path: Path, comment: str) -> KeyPair:
    """An ed25519 key pair at `path` (and `path`.pub), made once and then reused."""
    pub = path.with_name(path.name + ".pub")
    if not (path.exists() and pub.exists()):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        path.write_bytes(private)
        path.chmod(0o600)
        pub.write_text(f"{public.decode()} {comment}\n")
    return KeyPair(path, pub.read_text().strip())


def ensure_run_keys(ssh_dir: Path, run_id: str, nodes: Sequence[str]) -> dict[str, KeyPair]:
    """The run's login key (under "login") and one host key per node name."""
    keys = {"login": ensure_key(ssh_dir / LOGIN_KEY, f"workbinder-lab-{run_id}")}
    for node in nodes:
        keys[node] = ensure_key(ssh_dir / f"{node}_host_ed25519_key", f"{node}-{run_id}")
    return keys


def write_ssh_config(ssh_dir: Path, targets: Sequence[SshTarget]) -> Path:
    """known_hosts and an ssh_config, so a user can run `ssh -F <run>/ssh/config cp`."""
    known = ssh_dir / "known_hosts"
    known.write_text("".join(f"{t.known_hosts_name} {t.host_key}\n" for t in targets))
    lines = []
    for t in targets:
        lines += [
            f"Host {t.name}",
            f"  HostName {t.host}",
            f"  Port {t.port}",
            f"  User {t.user}",
            f"  IdentityFile {t.key_path}",
            f"  UserKnownHostsFile {known}",
            "  StrictHostKeyChecking yes",
            "",
        ]
    config = ssh_dir / "config"
    config.write_text("\n".join(lines))
    return config


# -- the executor ----------------------------------------------------------------------


@dataclass(frozen=True)
class SshTarget:
    """Where a node's SSH answers, who logs in, and the host key it must show."""

    name: str
    host: str
    port: int
    user: str
    key_path: Path
    host_key: str  # "ssh-ed25519 AAAA..." as the seed gave it

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


@dataclass(frozen=True)
class RemoteResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


class NodeShell:
    """One SSH connection to one node: runs argument lists and moves files, all bounded."""

    def __init__(self, target: SshTarget) -> None:
        self.target = target
        self._client: paramiko.SSHClient | None = None

    @property
    def name(self) -> str:
        return self.target.name

    def connect(self, timeout: float) -> None:
        """Log in, retrying while the node boots, for at most `timeout` seconds."""

        def answering() -> tuple[bool, str]:
            try:
                self._client = self._open()
            except NodeUnreachable:
                raise
            except (OSError, paramiko.SSHException, EOFError) as exc:
                return False, f"{type(exc).__name__}: {exc}"
            return True, "logged in"

        where = f"{self.target.host}:{self.target.port}"
        wait_for(
            f"node {self.name} to answer SSH at {where}", answering, timeout=timeout, interval=2.0
        )
        log.debug("logged in to %s at %s", self.name, where)

    def _open(self) -> paramiko.SSHClient:
        t = self.target
        kind, blob = t.host_key.split()[:2]
        client = paramiko.SSHClient()
        client.get_host_keys().add(
            t.known_hosts_name, kind, paramiko.PKey.from_type_string(kind, base64.b64decode(blob))
        )
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        where = f"node {self.name} at {t.host}:{t.port}"
        try:
            client.connect(
                t.host,
                port=t.port,
                username=t.user,
                pkey=paramiko.Ed25519Key.from_private_key_file(str(t.key_path)),
                timeout=CONNECT_TIMEOUT_S,
                banner_timeout=CONNECT_TIMEOUT_S,
                auth_timeout=CONNECT_TIMEOUT_S,
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise NodeUnreachable(
                f"{where} shows another host key than its seed gave it: something else "
                "answers there; stop it, or choose other ports with ssh_port_base"
            ) from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            raise NodeUnreachable(
                f"{where} refused the lab's key for user {t.user}: check that the node read "
                "its seed (cloud-init writes to the VM's console.log in the run folder)"
            ) from exc
        except paramiko.SSHException as exc:
            client.close()
            if "known_hosts" in str(exc):  # RejectPolicy: no key of the pinned type offered
                raise NodeUnreachable(
                    f"{where} offers no ed25519 host key: something else answers there; stop "
                    "it, or choose other ports with ssh_port_base"
                ) from exc
            raise
        except BaseException:
            client.close()
            raise
        return client

    @property
    def client(self) -> paramiko.SSHClient:
        if self._client is None:
            raise NodeUnreachable(f"node {self.name} is not connected: the lab must log in first")
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        input_text: str | None = None,
        timeout: float = 120.0,
        check: bool = True,
        hint: str = "",
    ) -> RemoteResult:
        """Run argv on the node within `timeout` seconds; raise RemoteCommandFailed on error."""
        argv = [*(["sudo", "-n"] if sudo else []), *(str(a) for a in argv)]
        command = shlex.join(argv)
        log.debug("on %s: %s", self.name, command)
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise NodeUnreachable(f"the SSH connection to node {self.name} closed: retry `up`")
        channel = transport.open_session(timeout=CONNECT_TIMEOUT_S)
        try:
            channel.exec_command(command)
            if input_text is not None:
                channel.sendall(input_text.encode())
            channel.shutdown_write()
            out, err, code = _collect(channel, time.monotonic() + timeout)
        finally:
            channel.close()
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        if code is None:
            raise RemoteCommandFailed(
                self.name, argv, -1, f"{stdout}{stderr}\ntimed out after {timeout:.0f} s", hint
            )
        if check and code != 0:
            raise RemoteCommandFailed(self.name, argv, code, stdout + stderr, hint)
        return RemoteResult(argv, code, stdout, stderr)

    def put(self, local: Path, remote: str, mode: int = 0o600) -> None:
        """Copy a file to the node over SFTP, creating its folder."""
        log.debug("copying %s to %s:%s", local, self.name, remote)
        with self.client.open_sftp() as sftp:
            _sftp_makedirs(sftp, str(PurePosixPath(remote).parent))
            sftp.put(str(local), remote)
            sftp.chmod(remote, mode)

    def put_text(self, text: str, remote: str, mode: int = 0o600) -> None:
        """Write text to a file on the node over SFTP, creating its folder."""
        with self.client.open_sftp() as sftp:
            _sftp_makedirs(sftp, str(PurePosixPath(remote).parent))
            with sftp.open(remote, "w") as handle:
                handle.write(text)
            sftp.chmod(remote, mode)


def _collect(channel: paramiko.Channel, deadline: float) -> tuple[bytes, bytes, int | None]:
    """Read a command's output until it exits or the deadline passes (then code is None)."""
    out, err = bytearray(), bytearray()
    while True:
        while channel.recv_ready():
            out += channel.recv(65536)
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
        if channel.exit_status_ready() and not channel.recv_ready():
            if not channel.recv_stderr_ready():
                return bytes(out), bytes(err), channel.recv_exit_status()
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out), bytes(err), None
        select.select([channel], [], [], min(left, 0.5))


def _sftp_makedirs(sftp: paramiko.SFTPClient, folder: str) -> None:
    parts = PurePosixPath(folder).parts
    for depth in range(1, len(parts) + 1):
        path = str(PurePosixPath(*parts[:depth]))
        try:
            sftp.stat(path)
        except FileNotFoundError:
            sftp.mkdir(path)


# -- node checks with testinfra --------------------------------------------------------


class _ShellBackend(ParamikoBackend):  # type: ignore[misc]  # testinfra has no types
    """testinfra's paramiko backend over the lab's own, host-key-checked connection."""

    def __init__(self, shell: NodeShell) -> None:
        t = shell.target
        super().__init__(f"{t.user}@{t.host}:{t.port}")
        self._shell = shell

    @functools.cached_property
    def client(self) -> paramiko.SSHClient:
        return self._shell.client


def node_host(shell: NodeShell) -> testinfra.host.Host:
    """A testinfra Host for a connected node, for assertions about its state."""
    backend = _ShellBackend(shell)
    host = testinfra.host.Host(backend)
    backend.set_host(host)
    return host


@dataclass(frozen=True)
class NodeCheck:
    what: str
    ok: bool
    seen: str
    fix: str


def swap_check(host: testinfra.host.Host) -> NodeCheck:
    """The kubelet refuses to run with swap on (unless told otherwise, which the lab does not)."""
    swaps = host.run("swapon --show=NAME --noheadings").stdout.split()
    return NodeCheck(
        "swap is off",
        not swaps,
        ", ".join(swaps) or "none",
        "run `sudo swapoff -a` and delete the swap line from /etc/fstab",
    )


def check_node(host: testinfra.host.Host, *, control_plane: bool, api_port: int) -> list[NodeCheck]:
    """What Kubernetes needs of a node: swap off, kubelet running, the API port listening."""
    checks = [
        swap_check(host),
        NodeCheck(
            "kubelet is running",
            bool(host.service("kubelet").is_running),
            host.run("systemctl is-active kubelet").stdout.strip() or "unknown",
            "read `journalctl -u kubelet` on the node; a cgroup driver mismatch is the usual "
            "cause (SystemdCgroup = true in /etc/containerd/config.toml, then restart containerd)",
        ),
    ]
    if control_plane:
        # On any address: the API server binds all of them, or only its advertised one.
        specs = [str(s) for s in host.socket.get_listening_sockets()]
        listening = any(s.startswith("tcp://") and s.endswith(f":{api_port}") for s in specs)
        checks.append(
            NodeCheck(
                f"the API server listens on {api_port}",
                listening,
                "listening" if listening else "nothing listening",
                "read `sudo crictl ps -a` and the kube-apiserver container's log on the node",
            )
        )
    return checks


def require_node(shell: NodeShell, *, control_plane: bool, api_port: int) -> None:
    """Raise NodeCheckFailed naming each failed check of a node and its fix."""
    failed = [
        c
        for c in check_node(node_host(shell), control_plane=control_plane, api_port=api_port)
        if not c.ok
    ]
    if failed:
        detail = "; ".join(f"{c.what}: no (saw {c.seen}) - {c.fix}" for c in failed)
        raise NodeCheckFailed(f"node {shell.name} is not ready: {detail}")
