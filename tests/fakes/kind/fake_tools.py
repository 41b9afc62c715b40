"""Recorded stand-ins for the `kind`, `kubectl` and `docker` commands.

Each call appends {"tool", "argv"} as one JSON line to the file named by LAB_FAKE_LOG and
keeps just enough state in the JSON file named by LAB_FAKE_STATE for the engine's next
call to see what the last one did. Only the standard library is used, so any Python runs
them. A call the fake does not know exits 2, so an unexpected command fails the test.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

State = dict[str, Any]
Handler = Callable[[list[str], State], int]

KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: kind-{name}
  cluster: {{server: "http://127.0.0.1:9"}}
users:
- name: kind-{name}
  user: {{token: fake}}
contexts:
- name: kind-{name}
  context: {{cluster: kind-{name}, user: kind-{name}}}
current-context: kind-{name}
"""


def default_state() -> State:
    return {
        "docker_up": True,
        "kind_version": "kind v0.25.0 go1.22.9 linux/amd64",
        "clusters": {},  # name -> list of node names
        "images": {},  # image -> id, as `docker image inspect` tells
        "node_images": {},  # node -> {image: id}
        "ports": {},  # "<container> <port>" -> host address
        "sa_missing_polls": 0,  # how many times `get serviceaccount default` fails first
        "fail": [],  # a call whose "<tool> <args>" holds one of these exits 1
        "pods": {},  # name -> log text, for diagnostics
        "applied": [],  # texts given to `kubectl apply -f`
        "configs": [],  # texts given to `kind create cluster --config`
    }


def out(text: str, end: str = "\n") -> None:
    sys.stdout.write(text + end)


def err(text: str) -> None:
    sys.stderr.write(text + "\n")


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def fake_kind(argv: list[str], state: State) -> int:
    if argv == ["version"]:
        out(state["kind_version"])
        return 0
    if argv == ["get", "clusters"]:
        if not state["clusters"]:
            err("No kind clusters found.")
        for name in sorted(state["clusters"]):
            out(name)
        return 0
    if argv[:2] == ["create", "cluster"]:
        name = option(argv, "--name")
        config = Path(option(argv, "--config")).read_text()
        state["configs"].append(config)
        workers = config.count("role: worker")
        state["clusters"][name] = [f"{name}-control-plane"] + [
            f"{name}-worker{index or ''}" for index in range(workers)
        ]
        Path(option(argv, "--kubeconfig")).write_text(KUBECONFIG.format(name=name))
        err(f"Creating cluster {name!r} ...")
        return 0
    if argv[:2] == ["delete", "cluster"]:
        name = option(argv, "--name")
        for node in state["clusters"].pop(name, []):
            state["node_images"].pop(node, None)
        err(f"Deleting cluster {name!r} ...")
        return 0
    if argv[:2] == ["get", "kubeconfig"]:
        name = option(argv, "--name")
        if name not in state["clusters"]:
            err(f"ERROR: could not locate any control plane nodes for {name}")
            return 1
        out(KUBECONFIG.format(name=name), end="")
        return 0
    if argv[:2] == ["get", "nodes"]:
        for node in state["clusters"].get(option(argv, "--name"), []):
            out(node)
        return 0
    if argv[:2] == ["load", "docker-image"]:
        image = argv[2]
        for node in state["clusters"][option(argv, "--name")]:
            state["node_images"].setdefault(node, {})[image] = state["images"][image]
        return 0
    if argv[:2] == ["export", "logs"]:
        folder = Path(argv[2])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "kind-version.txt").write_text(state["kind_version"] + "\n")
        out(f"Exported logs for cluster {option(argv, '--name')!r} to:\n{folder}")
        return 0
    return unknown("kind", argv)


def fake_kubectl(argv: list[str], state: State) -> int:
    if argv[:1] != ["--kubeconfig"] or not Path(argv[1]).exists():
        err("error: the fake kubectl wants --kubeconfig <existing file> first")
        return 2
    args = argv[2:]
    if args[:1] == ["-n"]:
        args = args[2:]
    if args[:1] == ["wait"]:
        for nodes in state["clusters"].values():
            for node in nodes:
                out(f"node/{node} condition met")
        return 0
    if args[:3] == ["rollout", "status", "deployment/coredns"]:
        out('deployment "coredns" successfully rolled out')
        return 0
    if args[:2] == ["apply", "-f"]:
        text = Path(args[2]).read_text()
        state["applied"].append(text)
        out(f"{text.count('kind:')} objects configured")
        return 0
    if args[:3] == ["get", "serviceaccount", "default"]:
        if state["sa_missing_polls"] > 0:
            state["sa_missing_polls"] -= 1
            err('Error from server (NotFound): serviceaccounts "default" not found')
            return 1
        out("serviceaccount/default")
        return 0
    if args == ["get", "pods", "-o", "wide"]:
        out("NAME   READY   STATUS")
        for name in sorted(state["pods"]):
            out(f"{name}   0/1   Error")
        return 0
    if args == ["get", "pods", "-o", "name"]:
        for name in sorted(state["pods"]):
            out(f"pod/{name}")
        return 0
    if args[:2] == ["get", "events"]:
        out("LAST SEEN   TYPE      REASON    OBJECT")
        return 0
    if args[:1] == ["logs"]:
        out(state["pods"][args[1].removeprefix("pod/")], end="")
        return 0
    if args[:2] == ["delete", "namespace"]:
        out(f'namespace "{args[2]}" deleted')
        return 0
    return unknown("kubectl", argv)


def fake_docker(argv: list[str], state: State) -> int:
    if argv[:1] == ["version"]:
        if not state["docker_up"]:
            err(
                "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
                "Is the docker daemon running?"
            )
            return 1
        out("27.3.1")
        return 0
    if argv[:4] == ["image", "inspect", "--format", "{{.Id}}"]:
        image = argv[4]
        if image not in state["images"]:
            err(f"Error response from daemon: No such image: {image}")
            return 1
        out(state["images"][image])
        return 0
    if argv[:1] == ["build"]:
        tag = option(argv, "--tag")
        text = Path(option(argv, "--file")).read_text()
        state["images"][tag] = "sha256:" + hashlib.sha256((tag + text).encode()).hexdigest()
        return 0
    if argv[:1] == ["exec"] and argv[2:4] == ["crictl", "inspecti"]:
        node, image = argv[1], argv[-1]
        held = state["node_images"].get(node, {}).get(image)
        if held is None:
            err(f'no such image "{image}" present')
            return 1
        out(held)
        return 0
    if argv[:1] == ["port"]:
        address = state["ports"].get(f"{argv[1]} {argv[2]}")
        if address is None:
            err(f"Error: No public port '{argv[2]}' published for {argv[1]}")
            return 1
        out(address)
        return 0
    return unknown("docker", argv)


def unknown(tool: str, argv: list[str]) -> int:
    err(f"fake {tool}: unexpected arguments {argv}")
    return 2


TOOLS: dict[str, Handler] = {"kind": fake_kind, "kubectl": fake_kubectl, "docker": fake_docker}


def main(tool: str) -> int:
    argv = sys.argv[1:]
    with open(os.environ["LAB_FAKE_LOG"], "a") as record:
        record.write(json.dumps({"tool": tool, "argv": argv}) + "\n")
    state_path = Path(os.environ["LAB_FAKE_STATE"])
    with open(state_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = {**default_state(), **json.loads(state_path.read_text() or "{}")}
        for part in state["fail"]:
            if part in " ".join([tool, *argv]):
                err(f"fake {tool}: told to fail on {part!r}")
                return 1
        status = TOOLS[tool](argv, state)
        state_path.write_text(json.dumps(state, indent=1))
    return status
