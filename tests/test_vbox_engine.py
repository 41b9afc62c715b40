"""The VirtualBox engine, on this machine where VirtualBox cannot run.

VBoxManage is a recorded fake that models VM state (tests/fakes/vbox/VBoxManage). Each
VM node is a real sshd on a loopback port with a temporary host key, whose PATH starts
with recorded fakes of kubeadm, kubectl, ctr, crictl, cloud-init, systemctl and swapon
(tests/fakes/vbox/node_tool.py, through one wrapper per name). SSH, SFTP, testinfra,
the seed ISO, podman's build and save are all real. The cluster's API is the kind tests'
in-memory API server.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.engines import vbox_preflight
from lab.engines.vbox import VboxEngine, parse_hostonly_ifs, parse_join_command
from lab.engines.vbox_plan import (
    NodeKeys,
    VboxOptions,
    make_plan,
    render_plan,
    seed_files,
    user_data,
    vm_steps,
)
from lab.engines.vbox_preflight import (
    HostFacts,
    HostNetwork,
    allowed_ranges,
    choose_pod_cidr,
    explain_kubeadm,
    host_networks,
    preflight_problems,
)
from lab.engines.vbox_seed import read_seed_iso, write_seed_iso
from lab.engines.vbox_ssh import (
    NodeShell,
    SshTarget,
    check_node,
    ensure_key,
    ensure_run_keys,
    node_host,
    require_node,
)
from lab.errors import (
    CommandFailed,
    LabError,
    NodeCheckFailed,
    NodeUnreachable,
    PreflightFailed,
    RemoteCommandFailed,
    WaitTimeout,
)
from lab.proc import run
from lab.run import new_run_id
from tests.fakes.kind.fake_apiserver import FakeApiServer

FAKES = Path(__file__).parent / "fakes" / "vbox"
GOLDEN = Path(__file__).parent / "golden" / "vbox_plan.txt"
SSHD = Path("/usr/sbin/sshd")
NODE_TOOLS = ("sudo", "kubeadm", "kubectl", "systemctl", "cloud-init", "ctr", "crictl", "swapon")
RUN_ID = "r0101000000-abc123"

needs_sshd = pytest.mark.skipif(
    not SSHD.exists(), reason="needs openssh-server: apt-get install openssh-server"
)


# -- fixtures ----------------------------------------------------------------------------


@dataclass
class FakeVbox:
    log: Path
    state: Path

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line)["argv"] for line in self.log.read_text().splitlines()]

    def vms(self) -> dict[str, dict[str, Any]]:
        if not self.state.exists():
            return {}
        return {vm["name"]: vm for vm in json.loads(self.state.read_text())["vms"].values()}


@pytest.fixture
def fake_vbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeVbox:
    """The fake VBoxManage first on PATH, the run records in tmp_path, a CPU with vmx."""
    fake = FakeVbox(tmp_path / "vbox-calls.jsonl", tmp_path / "vbox-state.json")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # This interpreter, not whichever `python3` the PATH finds first: a shim is slow.
    (bin_dir / "VBoxManage").write_text(
        f'#!/bin/sh\nexec {sys.executable} {FAKES / "VBoxManage"} "$@"\n'
    )
    (bin_dir / "VBoxManage").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_VBOX_LOG", str(fake.log))
    monkeypatch.setenv("FAKE_VBOX_STATE", str(fake.state))
    monkeypatch.setenv("LAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu vme de pse tsc msr vmx sse2\n")
    # Hardware virtualisation cannot be had here; the rest of the host is read for real.
    monkeypatch.setattr(vbox_preflight, "CPUINFO", cpuinfo)
    return fake


@dataclass
class FakeNode:
    """A real sshd on loopback standing in for one VM node."""

    name: str  # the node's host name, as Kubernetes would know it
    port: int
    root: Path
    process: subprocess.Popen[bytes]

    @property
    def state(self) -> Path:
        return self.root / "state"

    def calls(self, tool: str | None = None) -> list[list[str]]:
        log = self.root / "calls.jsonl"
        if not log.exists():
            return []
        records = [json.loads(line) for line in log.read_text().splitlines()]
        return [[r["tool"], *r["argv"]] for r in records if tool in (None, r["tool"])]

    def stdin_of(self, tool: str) -> list[str]:
        log = self.root / "calls.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        return [r["stdin"] for r in records if r["tool"] == tool and r["stdin"] is not None]


def free_ports(count: int) -> int:
    """The first of `count` consecutive loopback ports that are free now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count >= 65535:
            continue
        held = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no run of free loopback ports found")


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Any]:
    """Start sshd nodes on demand; every one is stopped when the test ends."""
    if not SSHD.exists():
        pytest.skip("needs openssh-server: apt-get install openssh-server")
    started: list[FakeNode] = []
    cluster = tmp_path / "cluster"
    cluster.mkdir(exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder

    def start(name: str, port: int, host_key: Path, login_pub: str) -> FakeNode:
        root = tmp_path / "nodes" / name
        (root / "bin").mkdir(parents=True)
        (root / "state").mkdir()
        for tool in NODE_TOOLS:
            wrapper = root / "bin" / tool
            wrapper.write_text(
                f'#!/bin/sh\nexec {sys.executable} {FAKES / "node_tool.py"} {tool} "$@"\n'
            )
            wrapper.chmod(0o755)
        (root / "authorized_keys").write_text(login_pub + "\n")
        path = f"{root / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        config = root / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1:{port}\n"
            f"HostKey {host_key}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\n"
            f"PidFile {root / 'sshd.pid'}\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "Subsystem sftp internal-sftp\nLogLevel VERBOSE\n"
            # HOME: the session's shell then skips this machine's own ~/.bashrc.
            f"SetEnv PATH={path} HOME={root} FAKE_NODE_NAME={name} "
            f"FAKE_NODE_LOG={root / 'calls.jsonl'} FAKE_NODE_STATE={root / 'state'} "
            f"FAKE_CLUSTER_DIR={cluster}\n"
        )
        with open(root / "sshd.log", "wb") as sshd_log:
            process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(config)], stdout=sshd_log, stderr=sshd_log
            )
        node = FakeNode(name, port, root, process)
        started.append(node)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return node
            except OSError as exc:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"sshd for {name} did not listen: {(root / 'sshd.log').read_text()}"
                    ) from exc
                time.sleep(0.05)

    yield start
    for node in started:
        node.process.terminate()
    for node in started:
        try:
            node.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(timeout=10)


def shell_for(node: FakeNode, ssh_dir: Path, host_key_pub: str) -> NodeShell:
    login = ensure_key(ssh_dir / "id_ed25519", "test")
    target = SshTarget(node.name, "127.0.0.1", node.port, "root", login.private_path, host_key_pub)
    shell = NodeShell(target)
    shell.connect(timeout=10)
    return shell


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A real listening socket, standing in for the API server's port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# -- options and the plan ----------------------------------------------------------------


def test_options_are_converted_and_checked() -> None:
    options = VboxOptions.parse({"workers": "2", "keep": "yes", "memory_mb": 2048})
    assert (options.workers, options.keep, options.memory_mb) == (2, True, 2048)
    with pytest.raises(LabError, match="unknown vbox option.*wrkers"):
        VboxOptions.parse({"wrkers": 2})
    with pytest.raises(LabError, match="cpus=1: kubeadm needs 2"):
        VboxOptions.parse({"cpus": 1})
    with pytest.raises(LabError, match="workers='many' is not a int"):
        VboxOptions.parse({"workers": "many"})
    with pytest.raises(LabError, match="access='bridged'"):
        VboxOptions.parse({"access": "bridged"})


FIXED_KEYS = {
    key: NodeKeys(
        host_private=f"-----BEGIN OPENSSH PRIVATE KEY-----\n<{key} host key>\n"
        "-----END OPENSSH PRIVATE KEY-----\n",
        host_public=f"ssh-ed25519 AAAA{key.upper()}HOSTKEY {key}-host",
        login_public="ssh-ed25519 AAAALOGINKEY workbinder-lab",
    )
    for key in ("cp", "w1", "w2")
}


def test_plan_matches_golden() -> None:
    """The whole provisioning plan: VBoxManage steps, seeds, kubeadm configuration."""
    options = VboxOptions.parse({"workers": 2, "image": "/images/noble.vmdk"})
    plan = make_plan(RUN_ID, Path("/runs/demo"), options, "vboxnet0", "10.244.0.0/16")
    text = render_plan(plan, FIXED_KEYS)
    for node in plan.nodes:  # the readable YAML still says exactly what the data says
        seed = seed_files(plan, node, FIXED_KEYS[node.key])
        assert yaml.safe_load(seed["user-data"]) == user_data(plan, node, FIXED_KEYS[node.key])
        assert seed["user-data"].startswith("#cloud-config\n")
    if os.environ.get("LAB_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "plan changed: review, then LAB_UPDATE_GOLDEN=1"


def test_plan_addresses_names_and_nat_forwards() -> None:
    options = VboxOptions.parse(
        {
            "workers": 1,
            "access": "nat",
            "ssh_port_base": 4000,
            "api_forward_port": 4100,
            "binder_host_port": 4200,
            "image": "/i.vmdk",
        }
    )
    plan = make_plan(RUN_ID, Path("/runs/demo"), options, "vboxnet3", "172.20.0.0/16")
    cp, w1 = plan.nodes
    assert (cp.vm, cp.address, cp.ssh_host, cp.ssh_port) == (
        f"wblab-{RUN_ID}-cp",
        "192.168.56.10",
        "127.0.0.1",
        4000,
    )
    assert (w1.vm, w1.address, w1.ssh_port) == (f"wblab-{RUN_ID}-w1", "192.168.56.11", 4001)
    forwards = [s[3] for s in vm_steps(plan, cp) if s[2:3] == ["--natpf1"]]
    assert forwards == [
        "ssh,tcp,127.0.0.1,4000,,22",
        "api,tcp,127.0.0.1,4100,,6443",
        "binder,tcp,127.0.0.1,4200,,30466",
    ]
    assert [s[3] for s in vm_steps(plan, w1) if s[2:3] == ["--natpf1"]] == [
        "ssh,tcp,127.0.0.1,4001,,22"
    ]
    # Every VM is told apart by MAC, and the seed matches its NICs by them.
    network = seed_files(plan, w1, FIXED_KEYS["w1"])["network-config"]
    assert "192.168.56.11/24" in network and w1.macs[1][:6] == "080027"
    assert len({mac for node in plan.nodes for mac in node.macs}) == 4


def test_seed_iso_holds_the_files_under_the_cidata_label(tmp_path: Path) -> None:
    files = {
        "user-data": "#cloud-config\nhostname: a\n",
        "meta-data": "instance-id: a\n",
        "network-config": "version: 2\n",
    }
    iso = tmp_path / "seeds" / "a.iso"
    write_seed_iso(iso, files)
    assert read_seed_iso(iso) == ("cidata", files)
    assert iso.stat().st_mode & 0o777 == 0o600
    assert run(["file", "--brief", str(iso)], check=False).stdout.startswith("ISO 9660") or (
        shutil.which("file") is None
    )


# -- preflight ---------------------------------------------------------------------------


def good_facts(**changes: Any) -> HostFacts:
    facts: dict[str, Any] = {
        "vbox_version": "7.0.20r163906",
        "cpu_flags": frozenset({"vmx", "sse2"}),
        "networks": (HostNetwork("192.0.2.0/24", "route via eth0"),),
        "allowed_ranges": ("192.168.56.0/21",),
        "free_bytes": 100 * 1024**3,
    }
    facts.update(changes)
    return HostFacts(**facts)


def test_preflight_passes_a_fit_host_and_names_each_fix(tmp_path: Path) -> None:
    image = tmp_path / "noble.vmdk"
    image.write_bytes(b"vmdk")
    options = VboxOptions.parse({"image": str(image), "network": "192.168.56.0/24"})
    assert preflight_problems(good_facts(), options, 2) == []

    bad = good_facts(
        vbox_version="6.0.24r139119",
        cpu_flags=frozenset({"sse2"}),
        networks=(HostNetwork("192.168.56.0/22", "address on wlan0"),),
        free_bytes=1024**3,
    )
    outside = VboxOptions.parse({"image": str(tmp_path / "absent.vmdk"), "network": "10.10.0.0/24"})
    problems = preflight_problems(bad, outside, 3)
    assert len(problems) == 5, problems
    assert "6.0.24" in problems[0] and "install VirtualBox 6.1" in problems[0]
    assert "vmx or svm" in problems[1] and "enable VT-x/AMD-V" in problems[1]
    assert "outside VirtualBox's allowed ranges" in problems[2]
    assert "* 10.10.0.0/24" in problems[2] and "networks.conf" in problems[2]
    assert "1.0 GiB free" in problems[3] and "12 GiB" in problems[3]
    assert "absent.vmdk not found: download https://" in problems[4]
    clash = preflight_problems(
        good_facts(networks=(HostNetwork("192.168.56.0/22", "address on wlan0"),)), options, 1
    )
    assert clash == [
        "host-only network 192.168.56.0/24 overlaps 192.168.56.0/22 "
        "(address on wlan0): set the network option to a free range"
    ]


def test_allowed_ranges_read_networks_conf(tmp_path: Path) -> None:
    conf = tmp_path / "networks.conf"
    assert allowed_ranges(conf) == ("192.168.56.0/21",)
    conf.write_text("# lab\n* 10.0.0.0/8 192.168.0.0/16\n* 2001::/64\n")
    assert allowed_ranges(conf) == ("10.0.0.0/8", "192.168.0.0/16", "2001::/64")


def test_pod_network_avoids_the_hosts_networks() -> None:
    options = VboxOptions.parse({})
    assert choose_pod_cidr(options, []) == "10.244.0.0/16"
    taken = [HostNetwork("10.244.8.0/24", "route via tun0")]
    assert choose_pod_cidr(options, taken) == "172.20.0.0/16"
    asked = VboxOptions.parse({"pod_cidr": "10.244.0.0/16"})
    with pytest.raises(LabError, match=r"overlaps 10.244.8.0/24 \(route via tun0\)"):
        choose_pod_cidr(asked, taken)
    # The seed's 192.168.0.0/16 would swallow VirtualBox's host-only network.
    seed = VboxOptions.parse({"pod_cidr": "192.168.0.0/16"})
    with pytest.raises(LabError, match="the lab's host-only network"):
        choose_pod_cidr(seed, [])


def test_host_networks_are_read_from_this_host() -> None:
    found = host_networks()
    assert HostNetwork("127.0.0.0/8", "address on lo") in found


def test_kubeadm_failures_are_explained() -> None:
    swap = "\t[ERROR Swap]: running with swap on is not supported. Please disable swap\n"
    assert "sudo swapoff -a" in explain_kubeadm(swap)
    unhealthy = (
        "[kubelet-check] The HTTP call equal to 'curl -sSL http://localhost:10248/healthz' "
        "failed with error: connection refused.\n"
    )
    assert "SystemdCgroup = true" in explain_kubeadm(unhealthy)
    mismatch = 'misconfiguration: kubelet cgroup driver: "systemd" is different from "cgroupfs"'
    assert "different cgroup drivers" in explain_kubeadm(mismatch)
    assert "cpus option" in explain_kubeadm("[ERROR NumCPU]: the number of available CPUs 1")
    assert explain_kubeadm("something else entirely") == ""


def test_join_command_and_hostonly_listing_are_parsed() -> None:
    printed = (
        "kubeadm join 192.168.56.10:6443 --token abcdef.0123456789abcdef "
        "--discovery-token-ca-cert-hash sha256:" + "0f" * 32 + " \n"
    )
    assert parse_join_command(printed) == ("abcdef.0123456789abcdef", "sha256:" + "0f" * 32)
    with pytest.raises(LabError, match="printed no join command"):
        parse_join_command("error: token create failed")
    listing = (
        "Name:            vboxnet0\nIPAddress:       192.168.56.1\n\n"
        "Name:            vboxnet1\nIPAddress:       192.168.57.1\n"
    )
    assert [i["Name"] for i in parse_hostonly_ifs(listing)] == ["vboxnet0", "vboxnet1"]


# -- the fake VBoxManage refuses what the real one refuses -------------------------------


def vbox_refuses(*argv: str) -> str:
    done = run(["VBoxManage", *argv], check=False)
    assert done.returncode == 1, f"VBoxManage {argv} was not refused"
    return done.stderr


def test_fake_vboxmanage_models_vm_state(fake_vbox: FakeVbox, tmp_path: Path) -> None:
    disk = tmp_path / "base.vmdk"
    disk.write_bytes(b"disk")
    vbox, vms = "VBoxManage", str(tmp_path / "vms")
    run([vbox, "createvm", "--name", "a", "--basefolder", vms, "--register"])
    assert "already exists" in vbox_refuses(
        "createvm", "--name", "a", "--basefolder", vms, "--register"
    )
    assert "no bootable medium" in vbox_refuses("startvm", "a", "--type", "headless")
    run([vbox, "clonemedium", "disk", str(disk), str(tmp_path / "a.vdi"), "--format", "VDI"])
    run([vbox, "storagectl", "a", "--name", "SATA", "--add", "sata"])
    run(
        [
            vbox,
            "storageattach",
            "a",
            "--storagectl",
            "SATA",
            "--port",
            "0",
            "--device",
            "0",
            "--type",
            "hdd",
            "--medium",
            str(tmp_path / "a.vdi"),
        ]
    )
    run([vbox, "startvm", "a", "--type", "headless"])
    for refused, message in (
        (["startvm", "a", "--type", "headless"], "already locked by a session"),
        (["modifyvm", "a", "--memory", "2048"], "already locked for a session"),
        (["clonevm", "a", "--name", "b", "--register"], "while it is running"),
        (["unregistervm", "a", "--delete"], "while it is locked"),
    ):
        assert message in vbox_refuses(*refused)
    run([vbox, "controlvm", "a", "poweroff"])
    assert "not currently running" in vbox_refuses("controlvm", "a", "poweroff")
    run([vbox, "clonevm", "a", "--name", "b", "--register"])
    run([vbox, "unregistervm", "a", "--delete"])
    assert not (tmp_path / "a.vdi").exists()
    assert set(fake_vbox.vms()) == {"b"}
    assert fake_vbox.calls()[-1] == ["unregistervm", "a", "--delete"]


def test_a_vboxmanage_error_shows_its_first_error_line(fake_vbox: FakeVbox, tmp_path: Path) -> None:
    engine = VboxEngine(RUN_ID, tmp_path / "run", image=str(tmp_path / "i.vmdk"))
    with pytest.raises(CommandFailed, match=r"Could not find a registered machine named 'x'"):
        engine._vbox(["showvminfo", "x", "--machinereadable"])


# -- SSH against a real sshd --------------------------------------------------------------


@needs_sshd
def test_shell_runs_argument_lists_and_moves_files(tmp_path: Path, start_node: Any) -> None:
    host = ensure_key(tmp_path / "ssh" / "host_key", "node")
    login = ensure_key(tmp_path / "ssh" / "id_ed25519", "test")
    node = start_node("n1", free_ports(1), host.private_path, login.public)
    shell = shell_for(node, tmp_path / "ssh", host.public)
    try:
        # No word of an argument is split or expanded by the node's shell.
        done = shell.run(["printf", "%s|", "a b", "$HOME", "*", "it's"])
        assert done.stdout == "a b|$HOME|*|it's|"
        assert shell.run(["cat"], input_text="from stdin\n").stdout == "from stdin\n"
        with pytest.raises(RemoteCommandFailed, match=r"on node n1: `ls /nonexistent` failed"):
            shell.run(["ls", "/nonexistent"], hint="make it")
        started = time.monotonic()
        with pytest.raises(RemoteCommandFailed, match="timed out after 1 s"):
            shell.run(["sleep", "30"], timeout=1.0)
        assert time.monotonic() - started < 5
        remote = tmp_path / "remote" / "deep" / "file.txt"
        shell.put_text("configuration\n", str(remote))
        assert remote.read_text() == "configuration\n"
        assert remote.stat().st_mode & 0o777 == 0o600
        shell.put(
            tmp_path / "ssh" / "host_key.pub", str(tmp_path / "remote" / "copy.pub"), mode=0o644
        )
        assert (tmp_path / "remote" / "copy.pub").read_text() == host.public + "\n"
        # sudo on the node is the recording fake: the command and its arguments arrive whole.
        assert shell.run(["kubectl", "get", "nodes", "-o", "json"], sudo=True).stdout
        assert node.calls() == [
            ["sudo", "-n", "kubectl", "get", "nodes", "-o", "json"],
            ["kubectl", "get", "nodes", "-o", "json"],
        ]
    finally:
        shell.close()


@needs_sshd
def test_shell_refuses_a_node_with_another_host_key(tmp_path: Path, start_node: Any) -> None:
    real = ensure_key(tmp_path / "ssh" / "real_key", "node")
    other = ensure_key(tmp_path / "ssh" / "other_key", "impostor")
    login = ensure_key(tmp_path / "ssh" / "id_ed25519", "test")
    node = start_node("n1", free_ports(1), other.private_path, login.public)
    target = SshTarget("n1", "127.0.0.1", node.port, "root", login.private_path, real.public)
    started = time.monotonic()
    with pytest.raises(NodeUnreachable, match="shows another host key than its seed gave it"):
        NodeShell(target).connect(timeout=30)
    assert time.monotonic() - started < 10  # refused at once, not retried until the deadline


def test_connect_gives_up_at_its_deadline_saying_what_it_saw(tmp_path: Path) -> None:
    login = ensure_key(tmp_path / "id_ed25519", "test")
    host = ensure_key(tmp_path / "host", "node")
    port = free_ports(1)
    target = SshTarget("cp", "127.0.0.1", port, "lab", login.private_path, host.public)
    started = time.monotonic()
    with pytest.raises(
        WaitTimeout,
        match=rf"node cp to answer SSH at 127.0.0.1:{port}.*last "
        "saw: NoValidConnectionsError",
    ):
        NodeShell(target).connect(timeout=1.0)
    assert time.monotonic() - started < 6


@needs_sshd
def test_node_checks_with_testinfra(tmp_path: Path, start_node: Any, listening_port: int) -> None:
    host = ensure_key(tmp_path / "ssh" / "host_key", "node")
    login = ensure_key(tmp_path / "ssh" / "id_ed25519", "test")
    node = start_node("n1", free_ports(1), host.private_path, login.public)
    shell = shell_for(node, tmp_path / "ssh", host.public)
    try:
        (node.state / "swap-on").write_text("")
        closed = free_ports(1)
        checks = check_node(node_host(shell), control_plane=True, api_port=closed)
        assert [(c.what, c.ok, c.seen) for c in checks] == [
            ("swap is off", False, "/swap.img"),
            ("kubelet is running", False, "inactive"),
            (f"the API server listens on {closed}", False, "nothing listening"),
        ]
        with pytest.raises(
            NodeCheckFailed,
            match="swap is off: no.*sudo swapoff -a.*kubelet is running: no.*SystemdCgroup = true",
        ):
            require_node(shell, control_plane=True, api_port=closed)

        (node.state / "swap-on").unlink()
        (node.state / "kubelet-active").write_text("")
        checks = check_node(node_host(shell), control_plane=True, api_port=listening_port)
        assert all(c.ok for c in checks), checks
        require_node(shell, control_plane=True, api_port=listening_port)
        assert ["systemctl", "is-active", "kubelet"] in node.calls("systemctl")
    finally:
        shell.close()


# -- the engine, end to end over the fakes ------------------------------------------------


@dataclass
class Lab:
    engine: VboxEngine
    nodes: dict[str, FakeNode]
    vbox: FakeVbox
    api: FakeApiServer
    run_dir: Path
    run_id: str


@pytest.fixture
def lab_parts(
    tmp_path: Path, fake_vbox: FakeVbox, start_node: Any, listening_port: int
) -> Iterator[Any]:
    """A VboxEngine whose VMs are fake and whose two nodes are real sshds on loopback."""
    engines: list[VboxEngine] = []

    def make(**options: Any) -> Lab:
        rid = new_run_id()  # its own: a parallel session of these tests shares podman
        run_dir = tmp_path / "run"
        image = tmp_path / "noble.vmdk"
        image.write_bytes(b"a cloud image")
        base = free_ports(2)
        keys = ensure_run_keys(run_dir / "vbox" / "ssh", rid, ["cp", "w1"])
        nodes = {
            key: start_node(
                f"wblab-{rid}-{key}", base + index, keys[key].private_path, keys["login"].public
            )
            for index, key in enumerate(("cp", "w1"))
        }
        api = FakeApiServer()
        settings = {
            "workers": 1,
            "image": str(image),
            "access": "nat",
            "ssh_port_base": base,
            "api_forward_port": free_ports(1),
            "api_port": listening_port,
            "ssh_user": "root",
            "node_dir": str(tmp_path / "nodes" / "{node}" / "files"),
            "boot_timeout_s": 30,
            "ready_timeout_s": 30,
            **options,
        }
        engine = VboxEngine(rid, run_dir, api_transport=api.transport, **settings)
        engines.append(engine)
        return Lab(engine, nodes, fake_vbox, api, run_dir, rid)

    yield make
    for engine in engines:
        engine.options = replace(engine.options, keep=False)
        engine.down()


def expected_vbox_calls(engine: VboxEngine) -> list[list[str]]:
    plan = engine.plan
    assert plan is not None
    calls = [
        ["--version"],
        ["list", "vms"],
        ["list", "hostonlyifs"],
        ["hostonlyif", "create"],
        [
            "hostonlyif",
            "ipconfig",
            "vboxnet0",
            "--ip",
            "192.168.56.1",
            "--netmask",
            "255.255.255.0",
        ],
    ]
    for node in plan.nodes:
        calls += vm_steps(plan, node)
    return calls


def test_up_builds_the_cluster_and_down_removes_it(lab_parts: Any, tmp_path: Path) -> None:
    lab = lab_parts()
    rid = lab.run_id
    engine, cp, w1 = lab.engine, lab.nodes["cp"], lab.nodes["w1"]
    engine.up()
    plan = engine.plan
    assert plan is not None

    # VirtualBox: the host-only interface, then every node's VM, in order.
    assert lab.vbox.calls() == expected_vbox_calls(engine)
    vms = lab.vbox.vms()
    assert {name: vm["state"] for name, vm in vms.items()} == {
        cp.name: "running",
        w1.name: "running",
    }
    assert vms[cp.name]["extradata"] == {"lab/run": rid}
    for node in plan.nodes:
        label, files = read_seed_iso(plan.seed_path(node))
        assert label == "cidata"
        assert f"local-hostname: {node.vm}" in files["meta-data"]
        assert (lab.run_dir / "vbox" / "ssh" / "id_ed25519.pub").read_text().strip() in (
            files["user-data"]
        )

    # The control plane: first boot, init with its config, kubeconfig, network, token.
    cp_dir = tmp_path / "nodes" / "cp" / "files"
    admin = ["kubectl", "--kubeconfig", "/etc/kubernetes/admin.conf"]
    router = plan.kube_router_manifest()
    cp_calls = [c for c in cp.calls() if c[0] not in ("sudo", "systemctl", "swapon")]
    assert cp_calls == [
        ["cloud-init", "status", "--wait"],
        ["kubeadm", "init", "--config", f"{cp_dir}/kubeadm-init.yaml"],
        [*admin, "config", "view", "--raw"],
        [*admin, "apply", "-f", router],
        [
            *admin,
            "-n",
            "kube-system",
            "set",
            "image",
            "daemonset/kube-router",
            "*=docker.io/cloudnativelabs/kube-router:v2.11.1",
        ],
        ["kubeadm", "token", "create", "--ttl", "1h0m0s", "--print-join-command"],
        [*admin, "get", "nodes", "-o", "json"],
        [*admin, "apply", "-f", "-"],
    ]
    assert (cp_dir / "kubeadm-init.yaml").read_text().startswith("apiVersion: kubeadm.k8s.io")
    assert ["sudo", "-n", "kubeadm", "init", "--config", f"{cp_dir}/kubeadm-init.yaml"] in (
        cp.calls("sudo")
    )
    base = json.loads(cp.stdin_of("kubectl")[0])
    assert [o["kind"] for o in base["items"]] == [
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
    ]

    # The worker joins with the token made for this round, and the file holding it goes.
    w1_dir = tmp_path / "nodes" / "w1" / "files"
    tokens = json.loads((tmp_path / "cluster" / "tokens").read_text())
    assert len(tokens) == 1
    assert [c for c in w1.calls() if c[0] not in ("sudo", "systemctl", "swapon")] == [
        ["cloud-init", "status", "--wait"],
        ["kubeadm", "join", "--config", f"{w1_dir}/kubeadm-join.yaml"],
    ]
    assert not (w1_dir / "kubeadm-join.yaml").exists()
    assert (lab.run_dir / "vbox" / "kubeadm-join-w1.log").read_text().startswith("This node")

    # testinfra looked at both nodes; the kubeconfig points at the NAT forward.
    for node in (cp, w1):
        assert ["systemctl", "is-active", "kubelet"] in node.calls("systemctl")
        assert ["swapon", "--show=NAME", "--noheadings"] in node.calls("swapon")
    kubeconfig = lab.run_dir / "vbox" / "kubeconfig"
    assert kubeconfig.stat().st_mode & 0o777 == 0o600
    server = f"https://127.0.0.1:{engine.options.api_forward_port}"
    assert f"server: {server}" in kubeconfig.read_text()
    assert (lab.run_dir / "vbox" / "ssh" / "config").read_text().count("StrictHostKeyChecking") == 2

    with pytest.raises(LabError, match="no VirtualBox process runs VM"):
        engine.detach()  # the fake starts no VBoxHeadless to hand the run to

    engine.down()
    calls = lab.vbox.calls()
    teardown = calls[calls.index(["list", "vms"], len(expected_vbox_calls(engine))) :]
    for vm in (cp.name, w1.name):
        assert teardown.index(["controlvm", vm, "poweroff"]) < teardown.index(
            ["unregistervm", vm, "--delete"]
        )
        assert ["closemedium", "dvd", str(plan.seed_path(plan.node(vm))), "--delete"] in teardown
    assert lab.vbox.vms() == {}
    assert not plan.disk_path(plan.control_plane).exists()
    assert list((lab.run_dir / "seeds").glob("*.iso")) == []
    assert not kubeconfig.exists()
    engine.down()  # safe twice


def test_pods_and_images_go_the_kind_way(lab_parts: Any, tmp_path: Path) -> None:
    lab = lab_parts()
    rid = lab.run_id
    engine = lab.engine
    engine.up()
    namespace = f"lab-{rid}"
    from lab.manifest import pod_manifest

    worker = pod_manifest(
        name="job-1",
        run_id=rid,
        role="worker",
        image="localhost/w:1",
        command=["sleep", "1"],
        **engine.manifest_options({}),
    )
    engine.apply(worker)
    binder = pod_manifest(
        name=f"{rid}-binder",
        run_id=rid,
        role="binder",
        image="localhost/w:1",
        command=["sleep", "1"],
        ports={"binder": 4660},
        service_account="lab-binder",
        **engine.manifest_options({}),
    )
    engine.apply(binder)
    posted = [(m, p) for m, p, _ in lab.api.requests() if m in ("POST", "PATCH")]
    assert posted == [
        ("POST", f"/api/v1/namespaces/{namespace}/pods"),
        ("PATCH", f"/apis/apps/v1/namespaces/{namespace}/deployments/binder"),
        ("PATCH", f"/api/v1/namespaces/{namespace}/services/binder"),
    ]
    assert engine.binder_address() == f"binder.{namespace}.svc.cluster.local"
    assert engine.client_address() == ("127.0.0.1", engine.options.binder_host_port)
    with pytest.raises(LabError, match="asks for the host network"):
        engine.apply(
            pod_manifest(name="hn", run_id=rid, role="worker", image="x", command=["true"])
        )

    # A kill is a CRI stop with no grace period, on the node that runs the pod.
    lab.api.set_status(
        namespace,
        "job-1",
        {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "worker",
                    "restartCount": 0,
                    "ready": True,
                    "image": "localhost/w:1",
                    "imageID": "sha256:0f",
                    "containerID": "containerd://c0ffee",
                    "state": {"running": {}},
                }
            ],
        },
        node=f"wblab-{rid}-w1",
    )
    assert [p.phase for p in engine.pods({"lab.role": "worker"})] == ["Running"]
    engine.kill("job-1")
    assert lab.nodes["w1"].calls("crictl") == [["crictl", "stop", "--timeout", "0", "c0ffee"]]
    assert lab.nodes["cp"].calls("crictl") == []

    # An image is built on the host, saved, copied to each node and imported there.
    context = tmp_path / "context"
    context.mkdir()
    (context / "hello").write_text("hello\n")
    (context / "Containerfile").write_text("FROM scratch\nCOPY hello /hello\n")
    tag = f"localhost/lab-vbox-test-{rid}:1"
    image_id = engine.build_image(context, tag, {"lab.binder": "standin"})
    assert len(image_id) == 64
    for key in ("cp", "w1"):
        node_dir = tmp_path / "nodes" / key / "files"
        remote = f"{node_dir}/images/localhost_lab-vbox-test-{rid}_1.tar"
        assert lab.nodes[key].calls("ctr") == [["ctr", "-n", "k8s.io", "images", "import", remote]]
        assert "manifest.json" in json.loads((lab.nodes[key].state / "imported").read_text())
        assert not Path(remote).exists()
    engine.down()
    assert run(["podman", "image", "exists", tag], check=False).returncode == 1


def test_a_node_with_swap_is_refused_with_the_fix_and_cleaned_up(lab_parts: Any) -> None:
    lab = lab_parts()
    (lab.nodes["w1"].state / "swap-on").write_text("")
    with pytest.raises(RemoteCommandFailed, match=r"on node w1: .*sudo swapoff -a"):
        lab.engine.up()
    assert lab.nodes["cp"].calls("kubeadm") == []
    assert lab.vbox.vms() == {}  # the failed bring-up took its VMs away


def test_a_kubeadm_failure_is_explained_and_keep_leaves_the_vms(lab_parts: Any) -> None:
    lab = lab_parts(keep=True)
    rid = lab.run_id
    (lab.nodes["cp"].state / "kubelet-unhealthy").write_text("")
    with pytest.raises(
        RemoteCommandFailed,
        match=r"on node cp: `sudo -n kubeadm` failed "
        r"\(exit 1\): .*timed out waiting.*SystemdCgroup = true",
    ):
        lab.engine.up()
    assert "[kubelet-check]" in (lab.run_dir / "vbox" / "kubeadm-init.log").read_text()
    assert set(lab.vbox.vms()) == {f"wblab-{rid}-cp", f"wblab-{rid}-w1"}  # keep=True


def test_a_failed_first_boot_points_at_cloud_inits_log(lab_parts: Any) -> None:
    lab = lab_parts()
    (lab.nodes["cp"].state / "cloud-init-error").write_text("")
    with pytest.raises(RemoteCommandFailed, match="on node cp: .*cloud-init-output.log"):
        lab.engine.up()
    assert lab.vbox.vms() == {}


def test_sweep_removes_only_vms_of_dead_runs(fake_vbox: FakeVbox, tmp_path: Path) -> None:
    from lab.run import RunRecord

    disk = tmp_path / "d.vmdk"
    disk.write_bytes(b"d")
    for name, owner in (
        ("wblab-rdead-cp", "rdead"),
        ("wblab-rlive-cp", "rlive"),
        ("someone-else", ""),
    ):
        run(
            [
                "VBoxManage",
                "createvm",
                "--name",
                name,
                "--basefolder",
                str(tmp_path / "vms"),
                "--register",
            ]
        )
        if owner:
            run(["VBoxManage", "setextradata", name, "lab/run", owner])
        run(["VBoxManage", "clonemedium", "disk", str(disk), str(tmp_path / f"{name}.vdi")])
        run(["VBoxManage", "storagectl", name, "--name", "SATA", "--add", "sata"])
        run(
            [
                "VBoxManage",
                "storageattach",
                name,
                "--storagectl",
                "SATA",
                "--port",
                "0",
                "--device",
                "0",
                "--type",
                "hdd",
                "--medium",
                str(tmp_path / f"{name}.vdi"),
            ]
        )
        run(["VBoxManage", "startvm", name, "--type", "headless"])
    RunRecord.create("rlive", tmp_path / "live", "vbox")
    engine = VboxEngine(RUN_ID, tmp_path / "run", image=str(disk))
    assert engine.sweep() == ["wblab-rdead-cp"]
    assert set(fake_vbox.vms()) == {"wblab-rlive-cp", "someone-else"}
    assert not (tmp_path / "wblab-rdead-cp.vdi").exists()


def test_preflight_failure_stops_before_any_vm(
    fake_vbox: FakeVbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_vmx = tmp_path / "cpuinfo-plain"
    no_vmx.write_text("flags\t\t: fpu sse2\n")
    monkeypatch.setattr(vbox_preflight, "CPUINFO", no_vmx)
    engine = VboxEngine(RUN_ID, tmp_path / "run", image=str(tmp_path / "missing.vmdk"))
    with pytest.raises(PreflightFailed, match="vmx or svm.*missing.vmdk not found"):
        engine.up()
    assert fake_vbox.calls() == [["--version"], ["list", "vms"]]


def test_make_engine_knows_vbox(tmp_path: Path) -> None:
    from lab.engines import make_engine

    engine = make_engine("vbox", RUN_ID, tmp_path, workers="0")
    assert isinstance(engine, VboxEngine) and engine.options.workers == 0
    assert sys.modules["lab.engines.vbox"]
