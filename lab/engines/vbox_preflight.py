"""What the VirtualBox engine checks before it makes anything, and how it explains kubeadm.

Every problem is one line that names the fix. The checks read the host (VBoxManage,
/proc/cpuinfo, the routing table, VirtualBox's allowed host-only ranges, free disk) and
refuse a plan that would collide with it.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.engines.vbox_plan import IMAGE_URL, VboxOptions
from lab.errors import LabError
from lab.proc import require_tool, run

CPUINFO = Path("/proc/cpuinfo")
NETWORKS_CONF = Path("/etc/vbox/networks.conf")
# What VirtualBox 6.1.28 and later allow for host-only networks when networks.conf is absent.
DEFAULT_ALLOWED = ("192.168.56.0/21",)
MIN_VBOX = (6, 1)
# VirtualBox's NAT gives every guest 10.0.2.15 in this network; pods must not use it.
VBOX_NAT = "10.0.2.0/24"
POD_CIDR_CANDIDATES = ("10.244.0.0/16", "172.20.0.0/16", "10.200.0.0/16", "100.96.0.0/16")
BYTES_PER_NODE = 4 * 1024**3  # the cloned image, containerd's images and the logs
VBOX_HINT = "install VirtualBox 6.1 or later (https://www.virtualbox.org/wiki/Downloads)"


@dataclass(frozen=True)
class HostNetwork:
    network: str
    source: str  # "route via eth0", "address on wlan0"


@dataclass(frozen=True)
class HostFacts:
    """What the checks need to know of the host, read once."""

    vbox_version: str
    cpu_flags: frozenset[str]
    networks: tuple[HostNetwork, ...]
    allowed_ranges: tuple[str, ...]
    free_bytes: int


def read_host_facts(vboxmanage: str, run_dir: Path) -> HostFacts:
    """Ask the host: VBoxManage's version, CPU flags, routes and addresses, disk."""
    require_tool(vboxmanage, VBOX_HINT)
    version = run([vboxmanage, "--version"], timeout=30, hint=VBOX_HINT).stdout.strip()
    return HostFacts(
        vbox_version=version.splitlines()[-1] if version else "",
        cpu_flags=cpu_flags(CPUINFO),
        networks=tuple(host_networks()),
        allowed_ranges=allowed_ranges(NETWORKS_CONF),
        free_bytes=shutil.disk_usage(_existing(run_dir)).free,
    )


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def cpu_flags(path: Path) -> frozenset[str]:
    try:
        text = path.read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return frozenset(flags)


def host_networks() -> list[HostNetwork]:
    """IPv4 networks the host already routes or sits on, from `ip -j route` and `ip -j addr`."""
    found: list[HostNetwork] = []
    routes = json.loads(run(["ip", "-j", "-4", "route"], timeout=30).stdout or "[]")
    for route in routes:
        dst = route.get("dst", "")
        if dst and dst != "default":
            network = ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)
            found.append(HostNetwork(str(network), f"route via {route.get('dev', '?')}"))
    links = json.loads(run(["ip", "-j", "-4", "addr"], timeout=30).stdout or "[]")
    for link in links:
        for addr in link.get("addr_info", []):
            if addr.get("family") == "inet":
                iface = ipaddress.ip_interface(f"{addr['local']}/{addr['prefixlen']}")
                found.append(HostNetwork(str(iface.network), f"address on {link['ifname']}"))
    return found


def allowed_ranges(path: Path) -> tuple[str, ...]:
    """The host-only ranges VirtualBox allows: lines `* <net> ...` of networks.conf."""
    try:
        text = path.read_text()
    except OSError:
        return DEFAULT_ALLOWED
    ranges = []
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["*"]:
            ranges += parts[1:]
    return tuple(ranges)


def parse_version(text: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        return ()
    return tuple(int(part) for part in match.groups() if part is not None)


def _inside(inner: str, outer: str) -> bool:
    a, b = ipaddress.ip_network(inner), ipaddress.ip_network(outer)
    if isinstance(a, ipaddress.IPv4Network) and isinstance(b, ipaddress.IPv4Network):
        return a.subnet_of(b)
    if isinstance(a, ipaddress.IPv6Network) and isinstance(b, ipaddress.IPv6Network):
        return a.subnet_of(b)
    return False


def _overlaps(network: str, others: Iterable[HostNetwork]) -> list[HostNetwork]:
    net = ipaddress.ip_network(network)
    return [o for o in others if net.overlaps(ipaddress.ip_network(o.network))]


def choose_pod_cidr(options: VboxOptions, networks: Sequence[HostNetwork]) -> str:
    """The pod network: the one asked for if it collides with nothing, else the first free one."""
    taken = [
        *networks,
        HostNetwork(options.network, "the lab's host-only network"),
        HostNetwork(options.service_cidr, "the service network"),
        HostNetwork(VBOX_NAT, "VirtualBox's NAT network"),
    ]
    if options.pod_cidr:
        clash = _overlaps(options.pod_cidr, taken)
        if clash:
            raise LabError(
                f"pod network {options.pod_cidr} overlaps {clash[0].network} "
                f"({clash[0].source}): set pod_cidr to another range, or leave it empty"
            )
        return options.pod_cidr
    for candidate in POD_CIDR_CANDIDATES:
        if not _overlaps(candidate, taken):
            return candidate
    raise LabError(
        f"every default pod network ({', '.join(POD_CIDR_CANDIDATES)}) overlaps a host "
        "network: set pod_cidr to a free private range"
    )


def preflight_problems(facts: HostFacts, options: VboxOptions, nodes: int) -> list[str]:
    """Every reason this host cannot run the planned VMs, each with its fix."""
    problems = []
    version = parse_version(facts.vbox_version)
    if version[:2] < MIN_VBOX:
        problems.append(
            f"VBoxManage reports version {facts.vbox_version or 'nothing'}: {VBOX_HINT}"
        )
    if not facts.cpu_flags & {"vmx", "svm"}:
        problems.append(
            "the CPU shows no hardware virtualisation (vmx or svm in /proc/cpuinfo): enable "
            "VT-x/AMD-V in the firmware, or nested virtualisation if this host is itself a VM"
        )
    if not any(_inside(options.network, r) for r in facts.allowed_ranges):
        problems.append(
            f"host-only network {options.network} is outside VirtualBox's allowed ranges "
            f"({', '.join(facts.allowed_ranges)}): pick a network inside them, or add "
            f"`* {options.network}` to {NETWORKS_CONF}"
        )
    # The lab's own host-only interface sits on the network; anything else there collides.
    foreign = [n for n in facts.networks if "vboxnet" not in n.source]
    clash = _overlaps(options.network, foreign)
    if clash:
        problems.append(
            f"host-only network {options.network} overlaps {clash[0].network} "
            f"({clash[0].source}): set the network option to a free range"
        )
    needed = nodes * BYTES_PER_NODE
    if facts.free_bytes < needed:
        problems.append(
            f"{facts.free_bytes / 1024**3:.1f} GiB free for the run folder, {nodes} node(s) need "
            f"about {needed / 1024**3:.0f} GiB: free some space or use fewer workers"
        )
    image = Path(options.image)
    if not image.is_file():
        problems.append(
            f"cloud image {image} not found: download {IMAGE_URL} to it, or set the image option"
        )
    return problems


# -- kubeadm's failures, explained ------------------------------------------------------

KUBEADM_FIXES: tuple[tuple[str, str], ...] = (
    (
        r"\[ERROR Swap\]|running with swap on is not supported",
        "swap is on: run `sudo swapoff -a` and delete the swap line from /etc/fstab on the node "
        "(the seed does both on a fresh node)",
    ),
    (
        r"cgroup driver|cgroupDriver|misconfiguration: kubelet cgroup",
        "the kubelet and containerd use different cgroup drivers: set SystemdCgroup = true in "
        "/etc/containerd/config.toml and `sudo systemctl restart containerd`",
    ),
    (
        r"The HTTP call equal to 'curl -sSL http://localhost:10248/healthz' failed"
        r"|kubelet is not running|kubelet-check.*timed out|timed out waiting for the condition",
        "the kubelet did not become healthy: read `journalctl -u kubelet` on the node; a cgroup "
        "driver mismatch (SystemdCgroup = true in /etc/containerd/config.toml) is the usual cause",
    ),
    (
        r"\[ERROR FileContent--proc-sys-net-ipv4-ip_forward\]",
        "IP forwarding is off: `sudo sysctl -w net.ipv4.ip_forward=1` (the seed's sysctl file "
        "sets it on boot)",
    ),
    (
        r"\[ERROR FileContent--proc-sys-net-bridge-bridge-nf-call-iptables\]",
        "the br_netfilter module is not loaded: `sudo modprobe br_netfilter`",
    ),
    (
        r"\[ERROR NumCPU\]",
        "the node has too few CPUs: set the cpus option to 2 or more",
    ),
    (
        r"\[ERROR Mem\]",
        "the node has too little memory: set the memory_mb option to 2048 or more",
    ),
    (
        r"\[ERROR CRI\]|container runtime is not running",
        "containerd is not answering: `sudo systemctl restart containerd` and read "
        "`journalctl -u containerd` on the node",
    ),
    (
        r"\[ERROR Port-\d+\]|\[ERROR FileAvailable--|\[ERROR DirAvailable--",
        "an earlier kubeadm run left state behind: run `sudo kubeadm reset -f` on the node, or "
        "tear the run down and bring it up again",
    ),
    (
        r"token id .* is invalid|could not find a JWS signature|token .* expired",
        "the join token expired or is unknown: the lab makes a fresh one per join; run `up` again",
    ),
)


def explain_kubeadm(output: str) -> str:
    """The fixes for the kubeadm failures found in its output, or '' when none is known."""
    fixes = []
    for pattern, fix in KUBEADM_FIXES:
        if re.search(pattern, output) and fix not in fixes:
            fixes.append(fix)
    return "; ".join(fixes)
