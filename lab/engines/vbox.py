"""The VirtualBox engine: a kubeadm cluster on VMs made for the run, as the seed did by hand.

Bring-up follows `lab.engines.vbox_plan`: VMs cloned from an Ubuntu cloud image, each
configured on first boot by a NoCloud seed (user, pinned host key, containerd, kubeadm),
then `kubeadm init`, kube-router, `kubeadm join` with a fresh token, and the run's
images imported into every node's containerd. Node work goes over SSH (paramiko) and is
checked with testinfra. Once the cluster answers, its pods are handled as on kind, by what
every cluster engine shares (`lab.engines.cluster`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import httpx2
import yaml

from lab.engines import k8s_objects as objects
from lab.engines.cluster import ClusterEngine
from lab.engines.vbox_plan import (
    ADMIN_CONF,
    IMAGE_NAME,
    OWNER_KEY,
    VM_PREFIX,
    Node,
    NodeKeys,
    Plan,
    VboxOptions,
    init_config,
    join_config,
    make_plan,
    seed_files,
    vm_steps,
)
from lab.engines.vbox_preflight import (
    VBOX_HINT,
    choose_pod_cidr,
    explain_kubeadm,
    preflight_problems,
    read_host_facts,
)
from lab.engines.vbox_seed import write_seed_iso
from lab.engines.vbox_ssh import (
    KeyPair,
    NodeShell,
    SshTarget,
    ensure_run_keys,
    node_host,
    require_node,
    swap_check,
    write_ssh_config,
)
from lab.errors import (
    CommandFailed,
    LabError,
    PreflightFailed,
    RemoteCommandFailed,
)
from lab.ports import free_port
from lab.proc import child_env, run
from lab.run import RUN_LABEL, RunRecord, cache_dir
from lab.waits import wait_for

log = logging.getLogger(__name__)

POWER_OFF_TIMEOUT_S = 60.0
LIVE_STATES = ("running", "paused", "starting", "stuck", "stopping", "saving", "restoring")
JOIN_TOKEN_TTL = "1h0m0s"  # long enough for one join round; kubeadm's default is 24 h
JOIN_COMMAND = re.compile(r"--token\s+(\S+).*--discovery-token-ca-cert-hash\s+(\S+)", re.S)


class VboxEngine(ClusterEngine):
    """Runs a lab's pods on a kubeadm cluster of VirtualBox VMs made for the run."""

    name = "vbox"
    msg_unreachable = "a VM"
    msg_host_network = "here is a VM's"
    msg_unshared = (
        "is not under the run folder the VMs share: build it with the engine's manifest_options()"
    )

    def __init__(
        self,
        run_id: str,
        run_dir: Path,
        *,
        api_transport: httpx2.BaseTransport | None = None,
        **options: object,
    ) -> None:
        """A VirtualBox lab for one run; `options` are VboxOptions' fields.

        api_transport stands in for the cluster's API server in tests, as on kind.
        """
        parsed = VboxOptions.parse(options)
        super().__init__(run_id, run_dir, api_transport)
        self.options = replace(parsed, image=parsed.image or str(cache_dir() / IMAGE_NAME))
        self.plan: Plan | None = None
        self.shells: dict[str, NodeShell] = {}

    # -- bring-up ----------------------------------------------------------------------

    def up(self) -> None:
        """Check the host, sweep old labs, make the VMs and a ready cluster on them."""
        self.work.mkdir(parents=True, exist_ok=True)
        facts = read_host_facts(self.options.vboxmanage, self.run_dir)
        self.sweep()
        problems = preflight_problems(facts, self.options, self.options.workers + 1)
        if problems:
            raise PreflightFailed(f"VirtualBox cannot run the lab here: {'; '.join(problems)}")
        pod_cidr = choose_pod_cidr(self.options, facts.networks)
        if self.options.access == "nat" and not self.options.binder_host_port:
            self.options = replace(self.options, binder_host_port=free_port())
        self.record = RunRecord.create(self.run_id, self.run_dir, self.name)

        try:
            hostonly = self._hostonly_interface()
            self.plan = make_plan(self.run_id, self.run_dir, self.options, hostonly, pod_cidr)
            keys = ensure_run_keys(self.work / "ssh", self.run_id, [n.key for n in self.plan.nodes])
            self._make_vms(self.plan, keys)
            deadline = time.monotonic() + self.options.boot_timeout_s
            self._connect(self.plan, keys, deadline)
            self._wait_first_boot(deadline)
            self._init_control_plane(self.plan)
            self._fetch_kubeconfig(self.plan)
            self._install_network(self.plan)
            self._join_workers(self.plan)
            self._wait_ready(self.plan, time.monotonic() + self.options.ready_timeout_s)
            self.check_nodes()
            self._apply_base()
            self._start_watch()
        except BaseException:
            if not self.options.keep:
                self.down()
            raise
        log.info(
            "VirtualBox cluster of run %s is ready; kubeconfig: %s", self.run_id, self.kubeconfig
        )

    def _vbox(
        self, argv: list[str], *, check: bool = True, timeout: float = 300.0
    ) -> tuple[int, str]:
        argv = [self.options.vboxmanage, *argv]
        done = run(argv, timeout=timeout, check=False, hint=VBOX_HINT)
        if check and done.returncode != 0:
            output = done.stdout + done.stderr
            # VBoxManage says what went wrong first and its error codes last.
            said = [line for line in output.splitlines() if "error:" in line]
            first = said[0] if said else ""
            raise CommandFailed(argv, done.returncode, f"{output}\n{first}")
        return done.returncode, done.stdout

    def _hostonly_interface(self) -> str:
        """The host-only interface on the lab's network: the one named, one found, or a new one."""
        plan_net = self.options.network
        network = ipaddress.ip_network(plan_net)
        host_ip = str(next(network.hosts()))
        interfaces = parse_hostonly_ifs(self._vbox(["list", "hostonlyifs"])[1])
        wanted = self.options.hostonly_if
        for iface in interfaces:
            if wanted and iface["Name"] != wanted:
                continue
            if _in_network(iface.get("IPAddress", ""), plan_net):
                return iface["Name"]
        if wanted and any(i["Name"] == wanted for i in interfaces):
            name = wanted
        else:
            created = self._vbox(["hostonlyif", "create"])[1]
            match = re.search(r"Interface '([^']+)' was successfully created", created)
            if not match:
                raise LabError(f"VBoxManage made no host-only interface: {created.strip()[-200:]}")
            name = match.group(1)
        netmask = str(network.netmask)
        log.info("giving host-only interface %s the address %s", name, host_ip)
        self._vbox(["hostonlyif", "ipconfig", name, "--ip", host_ip, "--netmask", netmask])
        return name

    def _make_vms(self, plan: Plan, keys: dict[str, KeyPair]) -> None:
        for node in plan.nodes:
            log.info("making VM %s (%s, %s)", node.vm, node.role, node.address)
            write_seed_iso(plan.seed_path(node), seed_files(plan, node, node_keys(keys, node)))
            for step in vm_steps(plan, node):
                self._vbox(step, timeout=900 if step[0] == "clonemedium" else 120)

    def _connect(self, plan: Plan, keys: dict[str, KeyPair], deadline: float) -> None:
        targets = [
            SshTarget(
                name=node.key,
                host=node.ssh_host,
                port=node.ssh_port,
                user=self.options.ssh_user,
                key_path=keys["login"].private_path,
                host_key=keys[node.key].public,
            )
            for node in plan.nodes
        ]
        write_ssh_config(self.work / "ssh", targets)
        for target in targets:
            shell = NodeShell(target)
            shell.connect(timeout=max(1.0, deadline - time.monotonic()))
            self.shells[target.name] = shell

    def _wait_first_boot(self, deadline: float) -> None:
        """cloud-init's own wait: packages, containerd, kubeadm at the pinned version."""
        for key, shell in self.shells.items():
            log.info("waiting for node %s to finish its first boot", key)
            done = shell.run(
                ["cloud-init", "status", "--wait"],
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
            # 2 is "done, with recoverable errors" (deprecated keys and the like).
            if done.returncode not in (0, 2):
                raise RemoteCommandFailed(
                    key,
                    done.argv,
                    done.returncode,
                    done.stdout + done.stderr,
                    "read /var/log/cloud-init-output.log on the node "
                    f"(`ssh -F {self.work / 'ssh' / 'config'} {key}`)",
                )
        for key, shell in self.shells.items():
            swap = swap_check(node_host(shell))
            if not swap.ok:
                raise RemoteCommandFailed(key, ["swapon", "--show"], 1, swap.seen, swap.fix)

    def _kubeadm(self, shell: NodeShell, argv: list[str], log_name: str) -> str:
        """Run kubeadm on a node, keep its output in the run folder, explain its failures."""
        done = shell.run(["kubeadm", *argv], sudo=True, timeout=900, check=False)
        (self.work / log_name).write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            output = done.stdout + done.stderr
            hint = explain_kubeadm(output) or f"read {self.work / log_name}"
            raise RemoteCommandFailed(shell.name, done.argv, done.returncode, output, hint)
        return done.stdout

    def _init_control_plane(self, plan: Plan) -> None:
        cp = self.shells[plan.control_plane.key]
        path = f"{plan.node_dir(plan.control_plane)}/kubeadm-init.yaml"
        cp.put_text(init_config(plan), path)
        log.info("kubeadm init on %s (pod network %s)", plan.control_plane.vm, plan.pod_cidr)
        self._kubeadm(cp, ["init", "--config", path], "kubeadm-init.log")

    def _fetch_kubeconfig(self, plan: Plan) -> None:
        """The admin kubeconfig, pointed at the address the host reaches the API on."""
        text = self._kubectl(["config", "view", "--raw"])
        config = yaml.safe_load(text)
        if self.options.access == "nat":
            for cluster in config.get("clusters") or []:
                cluster["cluster"]["server"] = f"https://127.0.0.1:{self.options.api_forward_port}"
        fd = os.open(self.kubeconfig, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            yaml.safe_dump(config, out, sort_keys=False)
        log.info("kubeconfig of run %s written to %s", self.run_id, self.kubeconfig)

    def _install_network(self, plan: Plan) -> None:
        """kube-router, at the pinned release: it reads each node's pod range from kubeadm."""
        log.info("installing kube-router %s", self.options.kube_router_version)
        self._kubectl(["apply", "-f", plan.kube_router_manifest()], timeout=300)
        image = f"docker.io/cloudnativelabs/kube-router:{self.options.kube_router_version}"
        self._kubectl(["-n", "kube-system", "set", "image", "daemonset/kube-router", f"*={image}"])

    def _join_workers(self, plan: Plan) -> None:
        if not plan.workers:
            return
        # A fresh token for this round: the one `kubeadm init` printed lasts only 24 h.
        printed = self._kubeadm(
            self.shells[plan.control_plane.key],
            ["token", "create", "--ttl", JOIN_TOKEN_TTL, "--print-join-command"],
            "kubeadm-token.log",
        )
        token, ca_hash = parse_join_command(printed)
        for node in plan.workers:
            shell = self.shells[node.key]
            path = f"{plan.node_dir(node)}/kubeadm-join.yaml"
            shell.put_text(join_config(plan, node, token, ca_hash), path)
            log.info("kubeadm join on %s", node.vm)
            try:
                self._kubeadm(shell, ["join", "--config", path], f"kubeadm-join-{node.key}.log")
            finally:
                shell.run(["rm", "-f", path], check=False)

    def _wait_ready(self, plan: Plan, deadline: float) -> None:
        names = {node.vm for node in plan.nodes}

        def all_ready() -> tuple[bool, str]:
            listed = json.loads(self._kubectl(["get", "nodes", "-o", "json"]) or "{}")
            ready = {
                item["metadata"]["name"]: any(
                    c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (item.get("status") or {}).get("conditions") or []
                )
                for item in listed.get("items") or []
            }
            seen = ", ".join(
                f"{n} {'Ready' if ready.get(n) else 'NotReady' if n in ready else 'absent'}"
                for n in sorted(names)
            )
            return all(ready.get(n) for n in names), seen

        wait_for(
            "every node to be Ready",
            all_ready,
            timeout=max(1.0, deadline - time.monotonic()),
            interval=5.0,
        )

    def check_nodes(self) -> None:
        """testinfra's word on every node: swap off, kubelet running, API port listening."""
        plan = self._plan()
        for node in plan.nodes:
            require_node(
                self.shells[node.key],
                control_plane=node.role == "control-plane",
                api_port=self.options.api_port,
            )

    def _apply_base(self) -> None:
        """The run's namespace and the binder's rights, as on kind."""
        items = objects.base_objects(self.run_id)
        self._kubectl(
            ["apply", "-f", "-"],
            input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )

    def _kubectl(
        self, args: list[str], *, input_text: str | None = None, timeout: float = 120.0
    ) -> str:
        """kubectl on the control plane with the admin kubeconfig kubeadm wrote there."""
        shell = self.shells[self._plan().control_plane.key]
        done = shell.run(
            ["kubectl", "--kubeconfig", ADMIN_CONF, *args],
            sudo=True,
            input_text=input_text,
            timeout=timeout,
        )
        return done.stdout

    def _plan(self) -> Plan:
        if self.plan is None:
            raise LabError(f"the VirtualBox lab of run {self.run_id} is not up: call up() first")
        return self.plan

    def _not_up(self) -> str:
        return f"the VirtualBox lab of run {self.run_id} is not up: call up()"

    def _pod_wait_s(self) -> float:
        return self.options.ready_timeout_s

    # -- images ------------------------------------------------------------------------

    def base_image(self) -> str:
        """Debian with a headless JRE, built on the host by the builder (podman by default)."""
        from lab.engines.images import debian_mirror, ensure_base_image
        from lab.engines.podman import podman_env

        if self.options.builder != "podman":
            raise LabError(
                f"the base image is built with podman, not {self.options.builder}: set "
                "builder=podman, or build it yourself and name it in the scenario"
            )
        return ensure_base_image(podman_env(self.run_dir), debian_mirror())

    def _builder_env(self) -> dict[str, str]:
        if self.options.builder == "podman":
            from lab.engines.podman import podman_env

            return podman_env(self.run_dir)
        return child_env()

    def build_image(self, context: Path, tag: str, labels: dict[str, str]) -> str:
        """Build on the host, then import the image into every node's containerd."""
        builder, env = self.options.builder, self._builder_env()
        argv = [builder, "build", "--file", str(Path(context) / "Containerfile"), "--tag", tag]
        for key, value in sorted({RUN_LABEL: self.run_id, **labels}.items()):
            argv += ["--label", f"{key}={value}"]
        log.info("building image %s", tag)
        run([*argv, str(context)], env=env, timeout=1800, hint=f"check that {builder} works")
        image_id = run(
            [builder, "image", "inspect", "--format", "{{.Id}}", tag], env=env, timeout=60
        ).stdout.strip()
        if self.plan is not None:
            self.load_image(tag)
        return image_id

    def load_image(self, tag: str) -> None:
        """No registry: save the image to a tar, copy it to each node, `ctr images import`."""
        plan = self._plan()
        builder, env = self.options.builder, self._builder_env()
        archive = self.work / "images" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', tag)}.tar"
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.unlink(missing_ok=True)
        run([builder, "save", "--output", str(archive), tag], env=env, timeout=900)
        for node in plan.nodes:
            shell = self.shells[node.key]
            remote = f"{plan.node_dir(node)}/images/{archive.name}"
            log.info("importing image %s on %s", tag, node.vm)
            shell.put(archive, remote)
            try:
                shell.run(
                    ["ctr", "-n", "k8s.io", "images", "import", remote], sudo=True, timeout=900
                )
                if not _has_registry(tag):
                    # An archive names a short tag localhost/<tag>; Kubernetes looks for
                    # docker.io/library/<tag>. Both names then point at the same image.
                    shell.run(
                        [
                            "ctr",
                            "-n",
                            "k8s.io",
                            "images",
                            "tag",
                            "--force",
                            f"localhost/{tag}",
                            f"docker.io/library/{tag}",
                        ],
                        sudo=True,
                    )
            finally:
                shell.run(["rm", "-f", remote], check=False)

    # -- faults --------------------------------------------------------------------------

    def kill(self, pod: str) -> None:
        """SIGKILL a pod's containers on their node, through the CRI, as a crash would."""
        node_name, ids = self._running_containers(pod)
        shell = self.shells[self._plan().node(node_name).key]
        for container_id in ids:
            # A stop with no grace period is a SIGKILL; the kubelet then sees a crash.
            shell.run(["crictl", "stop", "--timeout", "0", container_id], sudo=True)

    # -- where clients reach the binder --------------------------------------------------

    def client_address(self) -> tuple[str, int]:
        """Where the host's clients reach the binder's node port."""
        if self.options.access == "nat":
            return "127.0.0.1", self.options.binder_host_port
        return self._plan().control_plane.address, objects.BINDER_NODE_PORT

    # -- teardown ------------------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Remove the VMs of runs whose owner process is gone; return their names."""
        removed = []
        for vm in self._lab_vms():
            owner = self._owner(vm)
            if not owner or owner == self.run_id:
                continue
            record = RunRecord.load(owner)
            if record is None or not record.owner_alive():
                log.info("removing VM %s left by run %s", vm, owner)
                self._remove_vm(vm)
                removed.append(vm)
        return removed

    def _lab_vms(self) -> list[str]:
        listed = self._vbox(["list", "vms"])[1]
        names = re.findall(r'^"([^"]+)" \{', listed, re.M)
        return [name for name in names if name.startswith(VM_PREFIX)]

    def _owner(self, vm: str) -> str:
        said = self._vbox(["getextradata", vm, OWNER_KEY])[1].strip()
        return said.removeprefix("Value: ").strip() if said.startswith("Value: ") else ""

    def _vm_info(self, vm: str) -> dict[str, str]:
        text = self._vbox(["showvminfo", vm, "--machinereadable"])[1]
        info = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                info[key.strip('"')] = value.strip('"')
        return info

    def _remove_vm(self, vm: str) -> None:
        """Power a VM off (bounded), unregister it with its disks, close its seed ISO."""
        info = self._vm_info(vm)
        if info.get("VMState") in LIVE_STATES:
            self._vbox(["controlvm", vm, "poweroff"], check=False)

            def off() -> tuple[bool, str]:
                state = self._vm_info(vm).get("VMState", "unknown")
                return state not in LIVE_STATES, state

            wait_for(f"VM {vm} to power off", off, timeout=POWER_OFF_TIMEOUT_S, interval=1.0)
        seeds = [
            v for k, v in info.items() if re.fullmatch(r".+-\d+-\d+", k) and v.endswith(f"{vm}.iso")
        ]
        self._vbox(["unregistervm", vm, "--delete"])
        for seed in seeds:
            self._vbox(["closemedium", "dvd", seed, "--delete"], check=False)

    def detach(self) -> None:
        """Leave the VMs up after this process exits: the control plane's VM owns the run."""
        self._stop_watch()
        if self.record is None:
            return
        pid = vm_process(self._plan().control_plane.vm)
        if pid is None:
            raise LabError(
                f"no VirtualBox process runs VM {self._plan().control_plane.vm}: the lab "
                "cannot outlive this process; start it again with `up`"
            )
        self.record.hand_to(pid)

    def down(self) -> None:
        """Remove the run's VMs, disks and seeds, unless keep is set; safe to call twice."""
        self._disconnect()
        for shell in self.shells.values():
            shell.close()
        self.shells = {}
        if self.options.keep:
            log.info(
                "keeping the VMs of run %s: remove them with `VBoxManage unregistervm <vm> "
                "--delete` (names start with %s%s)",
                self.run_id,
                VM_PREFIX,
                self.run_id,
            )
            return
        try:
            owned = [vm for vm in self._lab_vms() if self._owner(vm) == self.run_id]
        except (CommandFailed, LabError) as exc:
            log.warning("could not list VirtualBox VMs to remove run %s: %s", self.run_id, exc)
            owned = []
        for vm in owned:
            log.info("removing VM %s", vm)
            self._remove_vm(vm)
        for seed in (self.run_dir / "seeds").glob("*.iso"):
            seed.unlink()
        self._remove_images()
        self._forget_run()

    def _remove_images(self) -> None:
        """The images this run built on the host, found by the run's label."""
        builder = self.options.builder
        if shutil.which(builder) is None:
            return
        env = self._builder_env()
        label = f"label={RUN_LABEL}={self.run_id}"
        listed = run(
            [builder, "images", "--filter", label, "--format", "{{.ID}}"],
            env=env,
            check=False,
            timeout=60,
        )
        ids = sorted(set(listed.stdout.split()))
        if ids:
            run([builder, "rmi", "--force", *ids], env=env, check=False, timeout=120)


# -- helpers ---------------------------------------------------------------------------


def node_keys(keys: dict[str, KeyPair], node: Node) -> NodeKeys:
    host = keys[node.key]
    return NodeKeys(
        host_private=host.private_text, host_public=host.public, login_public=keys["login"].public
    )


def parse_join_command(printed: str) -> tuple[str, str]:
    """The token and CA hash from `kubeadm token create --print-join-command`."""
    match = JOIN_COMMAND.search(printed)
    if not match:
        raise LabError(
            f"kubeadm printed no join command ({printed.strip()[:120]!r}): run "
            "`sudo kubeadm token create --print-join-command` on the control plane to see why"
        )
    return match.group(1), match.group(2)


def parse_hostonly_ifs(text: str) -> list[dict[str, str]]:
    """`VBoxManage list hostonlyifs`: blank-line separated blocks of `Key: value`."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, _, value = line.partition(":")
        current[key.strip()] = value.strip()
    return blocks


def _in_network(address: str, network: str) -> bool:
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(network)
    except ValueError:
        return False


def _has_registry(tag: str) -> bool:
    first = tag.split("/", 1)[0]
    return "/" in tag and ("." in first or ":" in first or first == "localhost")


def vm_process(vm: str) -> int | None:
    """The pid of the VirtualBox process running `vm` headless (its --comment is the name)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"VBoxHeadless") and vm.encode() in argv:
            return int(entry.name)
    return None
