#!/usr/bin/env python3
# ruff: noqa: T201  (a stand-in for command-line tools: printing is what they do)
"""Recorded stand-ins for the tools on a VM node that cannot run here.

One script answers as sudo, kubeadm, kubectl, systemctl, cloud-init, ctr, crictl and
swapon, by the name given as its first argument (the test puts one wrapper per name into
the node's bin folder, first on the PATH sshd gives the session). Each call appends
{"node", "tool", "argv", "stdin"} as one JSON line to FAKE_NODE_LOG. A node's own state
(kubelet active, swap on) lives in FAKE_NODE_STATE; what the cluster knows (nodes,
tokens, the network add-on) lives in FAKE_CLUSTER_DIR, shared by every fake node.
Only the standard library is used. An unknown call exits 2, so the test sees it.
"""

import json
import os
import re
import secrets
import sys
import tarfile

NODE = os.environ.get("FAKE_NODE_NAME", "node")
STATE = os.environ.get("FAKE_NODE_STATE", ".")
CLUSTER = os.environ.get("FAKE_CLUSTER_DIR", ".")
CA_HASH = "sha256:" + "ab" * 32


def record(tool, argv, stdin=None):
    with open(os.environ["FAKE_NODE_LOG"], "a") as log:
        log.write(json.dumps({"node": NODE, "tool": tool, "argv": argv, "stdin": stdin}) + "\n")


def flag_file(folder, name):
    return os.path.join(folder, name)


def has(folder, name):
    return os.path.exists(flag_file(folder, name))


def touch(folder, name, text=""):
    with open(flag_file(folder, name), "w") as handle:
        handle.write(text)


def cluster_json(name, default):
    try:
        with open(flag_file(CLUSTER, name)) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return default


def save_cluster_json(name, value):
    with open(flag_file(CLUSTER, name), "w") as handle:
        json.dump(value, handle)


def sudo(argv):
    args = list(argv)
    while args and args[0].startswith("-"):  # sudo's own options, such as -n
        args.pop(0)
    record("sudo", argv)
    os.execvp(args[0], args)


def cloud_init(argv):
    record("cloud-init", argv)
    if argv[:1] == ["status"]:
        if has(STATE, "cloud-init-error"):
            print("status: error")
            return 1
        print("status: done")
        return 0
    return 2


def swapon(argv):
    record("swapon", argv)
    if has(STATE, "swap-on"):
        print("/swap.img")
    return 0


def systemctl(argv):
    record("systemctl", argv)
    if argv[:1] == ["is-active"]:
        active = argv[-1].removesuffix(".service") == "kubelet" and has(STATE, "kubelet-active")
        print("active" if active else "inactive")
        return 0 if active else 3
    return 0


def kubeadm(argv):
    record("kubeadm", argv)
    if argv[:1] == ["init"]:
        config = open(argv[argv.index("--config") + 1]).read()
        if has(STATE, "swap-on"):
            print("[preflight] Running pre-flight checks")
            print(
                "error execution phase preflight: [preflight] Some fatal errors occurred:",
                file=sys.stderr,
            )
            print(
                "\t[ERROR Swap]: running with swap on is not supported. Please disable swap",
                file=sys.stderr,
            )
            return 1
        if has(STATE, "kubelet-unhealthy"):
            print("[kubelet-check] Waiting for a healthy kubelet at http://127.0.0.1:10248/healthz")
            print(
                "[kubelet-check] The HTTP call equal to 'curl -sSL http://localhost:10248/healthz'"
                " failed with error: dial tcp 127.0.0.1:10248: connect: connection refused."
            )
            print(
                "error execution phase wait-control-plane: timed out waiting for the condition",
                file=sys.stderr,
            )
            return 1
        endpoint = re.search(r"controlPlaneEndpoint: (\S+)", config).group(1)
        touch(CLUSTER, "endpoint", endpoint)
        save_cluster_json("nodes", [NODE])
        touch(STATE, "kubelet-active")
        print("Your Kubernetes control-plane has initialized successfully!")
        return 0
    if argv[:2] == ["token", "create"]:
        if not has(CLUSTER, "endpoint"):
            print("failed to load admin kubeconfig", file=sys.stderr)
            return 1
        token = f"{secrets.token_hex(3)}.{secrets.token_hex(8)}"
        save_cluster_json("tokens", cluster_json("tokens", []) + [token])
        endpoint = open(flag_file(CLUSTER, "endpoint")).read()
        print(f"kubeadm join {endpoint} --token {token} --discovery-token-ca-cert-hash {CA_HASH} ")
        return 0
    if argv[:1] == ["join"]:
        config = open(argv[argv.index("--config") + 1]).read()
        token = re.search(r"token: (\S+)", config).group(1)
        if token not in cluster_json("tokens", []) or CA_HASH not in config:
            print(
                "error execution phase preflight: couldn't validate the identity of the API "
                "Server: could not find a JWS signature in the cluster-info ConfigMap for "
                f'token ID "{token.split(".")[0]}"',
                file=sys.stderr,
            )
            return 1
        save_cluster_json("nodes", cluster_json("nodes", []) + [NODE])
        touch(STATE, "kubelet-active")
        print("This node has joined the cluster")
        return 0
    return 2


KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: {name}
  cluster:
    server: https://{endpoint}
    insecure-skip-tls-verify: true
users:
- name: kubernetes-admin
  user:
    token: fake-admin-token
contexts:
- name: kubernetes-admin@{name}
  context:
    cluster: {name}
    user: kubernetes-admin
current-context: kubernetes-admin@{name}
"""


def kubectl(argv):
    stdin = sys.stdin.read() if argv[-2:] == ["-f", "-"] else None
    record("kubectl", argv, stdin)
    args = list(argv)
    if args[:1] == ["--kubeconfig"]:
        args = args[2:]
    if args[:2] == ["-n", "kube-system"]:
        args = args[2:]
    if args == ["config", "view", "--raw"]:
        endpoint = open(flag_file(CLUSTER, "endpoint")).read()
        print(KUBECONFIG.format(name="wblab", endpoint=endpoint), end="")
        return 0
    if args[:2] == ["apply", "-f"]:
        if "kube-router" in args[2]:
            touch(CLUSTER, "network")
        elif args[2] == "-":
            applied = cluster_json("applied", [])
            applied += [f"{o['kind']}/{o['metadata']['name']}" for o in json.loads(stdin)["items"]]
            save_cluster_json("applied", applied)
        return 0
    if args[:3] == ["set", "image", "daemonset/kube-router"]:
        return 0
    if args == ["get", "nodes", "-o", "json"]:
        ready = "True" if has(CLUSTER, "network") else "False"
        items = [
            {
                "metadata": {"name": name},
                "status": {"conditions": [{"type": "Ready", "status": ready}]},
            }
            for name in cluster_json("nodes", [])
        ]
        print(json.dumps({"items": items}))
        return 0
    return 2


def ctr(argv):
    record("ctr", argv)
    if argv[:4] == ["-n", "k8s.io", "images", "import"]:
        if not tarfile.is_tarfile(argv[4]):
            print(f"ctr: {argv[4]} is not an image archive", file=sys.stderr)
            return 1
        with tarfile.open(argv[4]) as archive:
            names = archive.getnames()
        touch(STATE, "imported", json.dumps(names))
        print(f"unpacking {argv[4]} ...done")
        return 0
    if argv[:4] == ["-n", "k8s.io", "images", "tag"]:
        return 0
    return 2


def crictl(argv):
    record("crictl", argv)
    if argv[:1] == ["stop"]:
        print(argv[-1])
        return 0
    return 2


TOOLS = {
    "sudo": sudo,
    "cloud-init": cloud_init,
    "swapon": swapon,
    "systemctl": systemctl,
    "kubeadm": kubeadm,
    "kubectl": kubectl,
    "ctr": ctr,
    "crictl": crictl,
}

if __name__ == "__main__":
    # Called by a wrapper as `node_tool.py <tool> <args>`, or linked under the tool's name.
    name = os.path.basename(sys.argv[0])
    if name in TOOLS:
        sys.exit(TOOLS[name](sys.argv[1:]))
    sys.exit(TOOLS[sys.argv[1]](sys.argv[2:]))
