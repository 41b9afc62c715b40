"""What the VirtualBox engine will do, as data: options, nodes, VBoxManage steps, seeds.

Nothing here runs a program or touches a file, so the whole plan can be rendered and
compared with a golden copy. The engine in `lab.engines.vbox` carries it out.
"""

from __future__ import annotations

import hashlib
import ipaddress
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lab.engines.k8s_objects import BINDER_NODE_PORT
from lab.errors import LabError

VM_PREFIX = "wblab-"
OWNER_KEY = "lab/run"  # VM extradata naming the run that owns a VM
SHARE_NAME = "lab-run"  # the shared folder that shows the run folder on every node
SATA = "SATA"
NODE_OFFSET = 10  # the control plane gets .10 of the host-only network, workers .11 on
KUBERNETES_VERSION = "1.32.4"
KUBE_ROUTER_VERSION = "v2.11.1"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
ADMIN_CONF = "/etc/kubernetes/admin.conf"
CONTAINERD_SOCKET = "unix:///run/containerd/containerd.sock"
ACCESS_MODES = ("hostonly", "nat")
IMAGE_NAME = "noble-server-cloudimg-amd64.vmdk"
IMAGE_URL = f"https://cloud-images.ubuntu.com/noble/current/{IMAGE_NAME}"


@dataclass(frozen=True)
class VboxOptions:
    """What a user may set for the VirtualBox engine; every field has a working default."""

    workers: int = 1
    cpus: int = 2
    memory_mb: int = 4096
    disk_gb: int = 20
    image: str = ""  # an Ubuntu cloud image as VMDK; empty: IMAGE_NAME in the lab's cache
    network: str = "192.168.56.0/24"  # the host-only network; the host takes its first address
    pod_cidr: str = ""  # empty: the first candidate that overlaps nothing on the host
    service_cidr: str = "10.96.0.0/12"
    kubernetes_version: str = KUBERNETES_VERSION
    kube_router_version: str = KUBE_ROUTER_VERSION
    access: str = "hostonly"  # how the host reaches SSH and the API: node addresses or NAT
    ssh_port_base: int = 2222  # with access=nat: node i answers SSH on 127.0.0.1:base+i
    api_forward_port: int = 16443  # with access=nat: the API server on 127.0.0.1
    binder_host_port: int = 0  # with access=nat: the binder's node port on 127.0.0.1; 0: free
    api_port: int = 6443
    ssh_user: str = "lab"
    node_dir: str = "/home/{user}/workbinder-lab"  # may use {user} and {node}
    hostonly_if: str = ""  # empty: find the interface that holds the network, or make one
    vboxmanage: str = "VBoxManage"
    builder: str = "podman"
    keep: bool = False
    boot_timeout_s: float = 1500.0
    ready_timeout_s: float = 600.0

    @classmethod
    def parse(cls, options: Mapping[str, object]) -> VboxOptions:
        """Options as given on a command line or in code, checked and converted."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise LabError(
                f"unknown vbox option(s) {', '.join(unknown)}: use any of {', '.join(known)}"
            )
        values: dict[str, Any] = {}
        for name, value in options.items():
            default = getattr(cls, name)
            values[name] = _convert(name, value, type(default))
        parsed = cls(**values)
        parsed.check()
        return parsed

    def check(self) -> None:
        """Refuse settings that cannot make a cluster, saying which to change."""
        if self.workers < 0:
            raise LabError(f"vbox option workers={self.workers}: give 0 or more")
        if self.cpus < 2:
            raise LabError(f"vbox option cpus={self.cpus}: kubeadm needs 2 or more")
        if self.memory_mb < 1800:
            raise LabError(f"vbox option memory_mb={self.memory_mb}: kubeadm needs 1800 or more")
        if self.disk_gb < 10:
            raise LabError(f"vbox option disk_gb={self.disk_gb}: give 10 or more")
        if self.access not in ACCESS_MODES:
            raise LabError(f"vbox option access={self.access!r}: use one of {ACCESS_MODES}")
        for name in ("network", "service_cidr", *(("pod_cidr",) if self.pod_cidr else ())):
            try:
                ipaddress.ip_network(getattr(self, name))
            except ValueError as exc:
                raise LabError(
                    f"vbox option {name}: {exc}; give a network like 10.0.0.0/16"
                ) from exc
        hosts = ipaddress.ip_network(self.network).num_addresses - 2
        if hosts < NODE_OFFSET + self.workers + 1:
            raise LabError(f"vbox option network={self.network} is too small for the nodes")


def _convert(name: str, value: object, kind: type) -> object:
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    text = str(value).strip()
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind in (int, float):
            return kind(text)
    except ValueError:
        raise LabError(f"vbox option {name}={value!r} is not a {kind.__name__}") from None
    return text


@dataclass(frozen=True)
class Node:
    """One VM: its Kubernetes role, its fixed address, and how the host reaches its SSH."""

    key: str  # cp, w1, w2, ...
    vm: str  # the VM's name in VirtualBox, also its host name and Kubernetes node name
    role: str  # control-plane or worker
    address: str  # on the host-only network
    macs: tuple[str, str]  # NIC 1 (NAT) and NIC 2 (host-only)
    ssh_host: str
    ssh_port: int


@dataclass(frozen=True)
class NodeKeys:
    """The SSH keys a node's seed carries: its host key and the lab's login key."""

    host_private: str
    host_public: str
    login_public: str


@dataclass(frozen=True)
class Plan:
    """One run's cluster on VirtualBox, decided before anything is made."""

    run_id: str
    run_dir: Path
    options: VboxOptions
    hostonly_if: str
    pod_cidr: str
    nodes: tuple[Node, ...] = field(default_factory=tuple)

    @property
    def control_plane(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> tuple[Node, ...]:
        return self.nodes[1:]

    @property
    def host_address(self) -> str:
        return str(next(ipaddress.ip_network(self.options.network).hosts()))

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.options.network).prefixlen

    def node(self, key_or_vm: str) -> Node:
        for node in self.nodes:
            if key_or_vm in (node.key, node.vm):
                return node
        raise LabError(f"no node {key_or_vm!r} in run {self.run_id}")

    def node_dir(self, node: Node) -> str:
        return self.options.node_dir.format(user=self.options.ssh_user, node=node.key)

    def seed_path(self, node: Node) -> Path:
        return self.run_dir / "seeds" / f"{node.vm}.iso"

    def disk_path(self, node: Node) -> Path:
        return self.run_dir / "vms" / node.vm / f"{node.vm}.vdi"

    def apt_repo(self) -> str:
        minor = ".".join(self.options.kubernetes_version.split(".")[:2])
        return f"https://pkgs.k8s.io/core:/stable:/v{minor}/deb/"

    def kube_router_manifest(self) -> str:
        return (
            "https://raw.githubusercontent.com/cloudnativelabs/kube-router/"
            f"{self.options.kube_router_version}/daemonset/kubeadm-kuberouter.yaml"
        )


def mac_for(run_id: str, node_key: str, nic: int) -> str:
    """A stable MAC in VirtualBox's own prefix, so the seed can match NICs by address."""
    digest = hashlib.sha256(f"{run_id}/{node_key}/{nic}".encode()).hexdigest()
    return f"080027{digest[:6]}".upper()


def make_plan(
    run_id: str, run_dir: Path, options: VboxOptions, hostonly_if: str, pod_cidr: str
) -> Plan:
    """Name and address every node of the run."""
    network = ipaddress.ip_network(options.network)
    nodes = []
    for index in range(options.workers + 1):
        key = "cp" if index == 0 else f"w{index}"
        vm = f"{VM_PREFIX}{run_id}-{key}"
        address = str(network.network_address + NODE_OFFSET + index)
        if options.access == "nat":
            ssh_host, ssh_port = "127.0.0.1", options.ssh_port_base + index
        else:
            ssh_host, ssh_port = address, 22
        nodes.append(
            Node(
                key=key,
                vm=vm,
                role="control-plane" if index == 0 else "worker",
                address=address,
                macs=(mac_for(run_id, key, 1), mac_for(run_id, key, 2)),
                ssh_host=ssh_host,
                ssh_port=ssh_port,
            )
        )
    return Plan(run_id, Path(run_dir), options, hostonly_if, pod_cidr, tuple(nodes))


# -- VBoxManage ------------------------------------------------------------------------


def vm_steps(plan: Plan, node: Node) -> list[list[str]]:
    """VBoxManage argument lists (without the program) that make and start one node's VM."""
    options, vm = plan.options, node.vm
    vm_dir = plan.run_dir / "vms" / vm
    disk = str(plan.disk_path(node))
    # fmt: off
    steps = [
        ["createvm", "--name", vm, "--ostype", "Ubuntu_64",
         "--basefolder", str(plan.run_dir / "vms"), "--register"],
        ["setextradata", vm, OWNER_KEY, plan.run_id],
        ["modifyvm", vm, "--memory", str(options.memory_mb), "--cpus", str(options.cpus),
         "--ioapic", "on", "--boot1", "disk", "--boot2", "none", "--boot3", "none",
         "--boot4", "none", "--graphicscontroller", "vmsvga", "--vram", "16",
         "--nic1", "nat", "--macaddress1", node.macs[0],
         "--nic2", "hostonly", "--hostonlyadapter2", plan.hostonly_if,
         "--macaddress2", node.macs[1],
         # The cloud image writes its console to the first serial port: keep it for errors.
         "--uart1", "0x3F8", "4", "--uartmode1", "file", str(vm_dir / "console.log")],
    ]
    if options.access == "nat":
        steps.append(["modifyvm", vm, "--natpf1", f"ssh,tcp,127.0.0.1,{node.ssh_port},,22"])
        if node.role == "control-plane":
            steps.append([
                "modifyvm", vm, "--natpf1",
                f"api,tcp,127.0.0.1,{options.api_forward_port},,{options.api_port}",
            ])
            steps.append([
                "modifyvm", vm, "--natpf1",
                f"binder,tcp,127.0.0.1,{options.binder_host_port},,{BINDER_NODE_PORT}",
            ])
    steps += [
        ["clonemedium", "disk", _image(plan), disk, "--format", "VDI"],
        ["modifymedium", "disk", disk, "--resize", str(options.disk_gb * 1024)],
        ["storagectl", vm, "--name", SATA, "--add", "sata", "--controller", "IntelAhci",
         "--portcount", "2"],
        ["storageattach", vm, "--storagectl", SATA, "--port", "0", "--device", "0",
         "--type", "hdd", "--medium", disk],
        ["storageattach", vm, "--storagectl", SATA, "--port", "1", "--device", "0",
         "--type", "dvddrive", "--medium", str(plan.seed_path(node))],
        # The binder's pods mount files of the run folder by their host paths.
        ["sharedfolder", "add", vm, "--name", SHARE_NAME, "--hostpath", str(plan.run_dir),
         "--automount", "--auto-mount-point", str(plan.run_dir)],
        ["startvm", vm, "--type", "headless"],
    ]
    # fmt: on
    return steps


def _image(plan: Plan) -> str:
    return plan.options.image  # the engine fills the default in before planning


# -- cloud-init ------------------------------------------------------------------------


def seed_files(plan: Plan, node: Node, keys: NodeKeys) -> dict[str, str]:
    """The NoCloud seed of one node: user-data, meta-data and network-config."""
    return {
        "meta-data": _yaml({"instance-id": f"{node.vm}", "local-hostname": node.vm}),
        "network-config": _yaml(network_config(plan, node)),
        "user-data": "#cloud-config\n" + _yaml(user_data(plan, node, keys)),
    }


def network_config(plan: Plan, node: Node) -> dict[str, Any]:
    """Netplan v2: DHCP on the NAT NIC for the way out, a fixed address on the host-only one."""
    return {
        "version": 2,
        "ethernets": {
            "nat0": {
                "match": {"macaddress": _colons(node.macs[0])},
                "set-name": "nat0",
                "dhcp4": True,
            },
            "lab0": {
                "match": {"macaddress": _colons(node.macs[1])},
                "set-name": "lab0",
                "dhcp4": False,
                "addresses": [f"{node.address}/{plan.prefixlen}"],
            },
        },
    }


def user_data(plan: Plan, node: Node, keys: NodeKeys) -> dict[str, Any]:
    """cloud-config for one node: user, host key, containerd, pinned kubeadm, no swap."""
    options = plan.options
    package = f"{options.kubernetes_version}-1.1"
    hosts = "".join(f"{n.address} {n.vm}\n" for n in plan.nodes)
    return {
        "hostname": node.vm,
        "manage_etc_hosts": False,
        "users": [
            {
                "name": options.ssh_user,
                "shell": "/bin/bash",
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "lock_passwd": True,
                "ssh_authorized_keys": [keys.login_public],
            }
        ],
        "ssh_pwauth": False,
        "ssh_deletekeys": True,
        # Only the host key the lab made, so the lab can pin it before the first login.
        "ssh_genkeytypes": [],
        "ssh_keys": {
            "ed25519_private": keys.host_private,
            "ed25519_public": keys.host_public,
        },
        "package_update": True,
        "packages": ["containerd", "curl", "ca-certificates", "virtualbox-guest-utils"],
        "write_files": [
            {"path": "/etc/hosts", "append": True, "content": hosts},
            {"path": "/etc/modules-load.d/kubernetes.conf", "content": "overlay\nbr_netfilter\n"},
            {
                "path": "/etc/sysctl.d/99-kubernetes.conf",
                "content": (
                    "net.ipv4.ip_forward = 1\n"
                    "net.bridge.bridge-nf-call-iptables = 1\n"
                    "net.bridge.bridge-nf-call-ip6tables = 1\n"
                ),
            },
            # Deferred until the packages are in, so apt never sees a source without its key
            # and containerd's package never finds a configuration it did not ship.
            {
                "path": "/etc/containerd/config.toml",
                "defer": True,
                "content": containerd_config(),
            },
            {
                "path": "/etc/apt/sources.list.d/kubernetes.list",
                "defer": True,
                "content": (
                    f"deb [signed-by=/etc/apt/keyrings/kubernetes.asc] {plan.apt_repo()} /\n"
                ),
            },
        ],
        "runcmd": [
            ["swapoff", "-a"],
            ["sed", "-i", "/\\sswap\\s/d", "/etc/fstab"],
            ["modprobe", "overlay"],
            ["modprobe", "br_netfilter"],
            ["sysctl", "--system"],
            ["systemctl", "restart", "containerd"],
            ["mkdir", "-p", "-m", "0755", "/etc/apt/keyrings"],
            [
                "curl",
                "-fsSL",
                "-o",
                "/etc/apt/keyrings/kubernetes.asc",
                f"{plan.apt_repo()}Release.key",
            ],
            ["apt-get", "update", "-q"],
            [
                "apt-get",
                "install",
                "-y",
                "-q",
                f"kubelet={package}",
                f"kubeadm={package}",
                f"kubectl={package}",
            ],
            ["apt-mark", "hold", "kubelet", "kubeadm", "kubectl"],
            ["systemctl", "enable", "--now", "kubelet"],
            ["install", "-d", "-o", options.ssh_user, "-g", options.ssh_user, plan.node_dir(node)],
        ],
    }


def containerd_config() -> str:
    """containerd with the systemd cgroup driver, the one kubeadm sets for the kubelet."""
    return (
        "version = 2\n"
        '[plugins."io.containerd.grpc.v1.cri"]\n'
        f'  sandbox_image = "{PAUSE_IMAGE}"\n'
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
        '  runtime_type = "io.containerd.runc.v2"\n'
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n'
        "  SystemdCgroup = true\n"
    )


# -- kubeadm ---------------------------------------------------------------------------


def init_config(plan: Plan) -> str:
    """kubeadm's configuration for `kubeadm init` on the control plane."""
    options, cp = plan.options, plan.control_plane
    init = {
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "InitConfiguration",
        "localAPIEndpoint": {"advertiseAddress": cp.address, "bindPort": options.api_port},
        "nodeRegistration": _registration(cp),
    }
    cluster = {
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "ClusterConfiguration",
        "kubernetesVersion": f"v{options.kubernetes_version}",
        "clusterName": f"{VM_PREFIX}{plan.run_id}",
        "controlPlaneEndpoint": f"{cp.address}:{options.api_port}",
        "networking": {"podSubnet": plan.pod_cidr, "serviceSubnet": options.service_cidr},
        # 127.0.0.1 too, so a kubeconfig through a NAT port forward still verifies.
        "apiServer": {"certSANs": [cp.address, cp.vm, "127.0.0.1"]},
    }
    kubelet = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "systemd",
    }
    return "---\n".join(_yaml(doc) for doc in (init, cluster, kubelet))


def join_config(plan: Plan, node: Node, token: str, ca_hash: str) -> str:
    """kubeadm's configuration for `kubeadm join` on one worker."""
    cp = plan.control_plane
    join = {
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "JoinConfiguration",
        "discovery": {
            "bootstrapToken": {
                "apiServerEndpoint": f"{cp.address}:{plan.options.api_port}",
                "token": token,
                "caCertHashes": [ca_hash],
            }
        },
        "nodeRegistration": _registration(node),
    }
    return _yaml(join)


def _registration(node: Node) -> dict[str, Any]:
    # Every VM has the same NAT address (10.0.2.15); the kubelet must use the host-only one.
    return {
        "name": node.vm,
        "criSocket": CONTAINERD_SOCKET,
        "kubeletExtraArgs": [{"name": "node-ip", "value": node.address}],
    }


# -- the golden rendering --------------------------------------------------------------


def render_plan(plan: Plan, keys: Mapping[str, NodeKeys]) -> str:
    """The whole plan as text: what a reviewer reads and the golden test compares."""
    lines = [
        f"# run {plan.run_id}: {len(plan.nodes)} node(s), host-only {plan.hostonly_if} "
        f"{plan.options.network}, pod network {plan.pod_cidr}",
    ]
    for node in plan.nodes:
        lines.append(
            f"\n## {node.key}: {node.vm} {node.role} {node.address} "
            f"ssh {node.ssh_host}:{node.ssh_port}"
        )
        lines += [shlex.join([plan.options.vboxmanage, *step]) for step in vm_steps(plan, node)]
        for name, text in seed_files(plan, node, keys[node.key]).items():
            lines += [f"\n### {node.key} seed {name}", text.rstrip("\n")]
    lines += ["\n## kubeadm init", init_config(plan).rstrip("\n")]
    for node in plan.workers:
        lines += [
            f"\n## kubeadm join {node.key}",
            join_config(plan, node, "<token>", "<ca-hash>").rstrip("\n"),
        ]
    return "\n".join(lines) + "\n"


class _Dumper(yaml.SafeDumper):
    """YAML a person reads: text blocks as `|` literals, argument lists on one line."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.SequenceNode:
    flat = all(isinstance(item, str) and "\n" not in item for item in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flat)


_Dumper.add_representer(str, _text)
_Dumper.add_representer(list, _list)


def _yaml(document: object) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=1000)


def _colons(mac: str) -> str:
    return ":".join(mac[i : i + 2] for i in range(0, 12, 2)).lower()
