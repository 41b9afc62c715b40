"""Kubernetes objects of a lab on a cluster, as plain dicts, and kind's cluster config.

Every builder is pure: same arguments, same dict. Every object carries the run label, so
a cluster shared by several runs can tell whose objects are whose.
"""

from __future__ import annotations

import copy
from typing import Any

from lab.errors import ManifestError
from lab.run import RUN_LABEL

BINDER = "binder"  # the binder's Deployment and Service
BINDER_ACCOUNT = "lab-binder"  # the service account its submit hook creates pods with
POD_ROLE = "lab-pods"
CONFIG_MAP = "lab-config"
BINDER_NODE_PORT = 30466  # where the binder's Service listens on every node
DEPLOYMENT_LABEL = "lab.deployment"
NAME_LABEL = "lab.name"  # the name of the Pod manifest a Deployment's pods came from

KIND_API_VERSION = "kind.x-k8s.io/v1alpha4"


def run_namespace(run_id: str) -> str:
    """The namespace holding one run's objects."""
    return f"lab-{run_id}"


def _metadata(name: str, run_id: str, namespace: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": {RUN_LABEL: run_id}}
    if namespace is not None:
        metadata["namespace"] = namespace
    return metadata


def namespace(run_id: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": _metadata(run_namespace(run_id), run_id),
    }


def service_account(run_id: str, name: str = BINDER_ACCOUNT) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(name, run_id, run_namespace(run_id)),
    }


def pod_role(run_id: str, name: str = POD_ROLE) -> dict[str, Any]:
    """What the submit hook needs: create, read and delete the run's pods, and no more."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(name, run_id, run_namespace(run_id)),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["pods"],
                "verbs": ["create", "get", "list", "watch", "delete"],
            },
            {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        ],
    }


def role_binding(
    run_id: str, role: str = POD_ROLE, account: str = BINDER_ACCOUNT
) -> dict[str, Any]:
    ns = run_namespace(run_id)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(f"{role}-{account}", run_id, ns),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}],
    }


def base_objects(run_id: str) -> list[dict[str, Any]]:
    """What a run needs before its first pod: its namespace and the binder's rights."""
    return [namespace(run_id), service_account(run_id), pod_role(run_id), role_binding(run_id)]


def config_map(run_id: str, data: dict[str, str], name: str = CONFIG_MAP) -> dict[str, Any]:
    """The run's configuration files; keys are file names, values their text."""
    total = sum(len(key) + len(value.encode()) for key, value in data.items())
    if total > 1_000_000:
        raise ManifestError(
            f"ConfigMap {name}: {total} bytes is over Kubernetes' 1 MiB limit; keep large "
            "files in the image instead"
        )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(name, run_id, run_namespace(run_id)),
        "data": dict(sorted(data.items())),
    }


def deployment(pod: dict[str, Any], name: str = BINDER) -> dict[str, Any]:
    """One replica of the pod a Pod manifest describes, recreated when it goes away.

    A Deployment only runs pods with restartPolicy Always, so the manifest's own policy
    gives way; `Recreate` makes sure two binders never run side by side.
    """
    metadata = pod["metadata"]
    labels = dict(metadata.get("labels") or {})
    run_id = labels[RUN_LABEL]
    selector = {RUN_LABEL: run_id, DEPLOYMENT_LABEL: name}
    spec = copy.deepcopy(pod["spec"])
    spec["restartPolicy"] = "Always"
    out_meta = _metadata(name, run_id, metadata.get("namespace") or run_namespace(run_id))
    out_meta["labels"].update({k: v for k, v in labels.items() if k != "lab.job"})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": out_meta,
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**labels, **selector, NAME_LABEL: metadata["name"]}},
                "spec": spec,
            },
        },
    }


def service(
    run_id: str, port: int, node_port: int = BINDER_NODE_PORT, name: str = BINDER
) -> dict[str, Any]:
    """The binder's stable address: workers use its name, the host its node port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, run_id, run_namespace(run_id)),
        "spec": {
            "type": "NodePort",
            "selector": {RUN_LABEL: run_id, DEPLOYMENT_LABEL: name},
            "ports": [
                {
                    "name": "binder",
                    "protocol": "TCP",
                    "port": port,
                    "targetPort": port,
                    "nodePort": node_port,
                }
            ],
        },
    }


def service_host(run_id: str, name: str = BINDER) -> str:
    """The DNS name pods in the cluster reach a run's Service by."""
    return f"{name}.{run_namespace(run_id)}.svc.cluster.local"


def kind_cluster_config(
    name: str,
    *,
    nodes: int,
    node_image: str,
    host_port: int | None,
    shared_dirs: list[str],
    node_port: int = BINDER_NODE_PORT,
) -> dict[str, Any]:
    """kind's Cluster config: one control plane, `nodes - 1` workers, the binder's port.

    `shared_dirs` are host folders mounted into every node at the same path, so a pod's
    hostPath volume under them reads and writes the host's folder.
    """
    if nodes < 1:
        raise ManifestError(f"kind cluster {name}: nodes must be 1 or more, not {nodes}")
    mounts = [{"hostPath": path, "containerPath": path} for path in shared_dirs]
    control: dict[str, Any] = {"role": "control-plane", "image": node_image}
    if host_port is not None:
        control["extraPortMappings"] = [
            {
                "containerPort": node_port,
                "hostPort": host_port,
                "listenAddress": "127.0.0.1",
                "protocol": "TCP",
            }
        ]
    if mounts:
        control["extraMounts"] = mounts
    workers = []
    for _ in range(nodes - 1):
        worker: dict[str, Any] = {"role": "worker", "image": node_image}
        if mounts:
            worker["extraMounts"] = copy.deepcopy(mounts)
        workers.append(worker)
    return {
        "kind": "Cluster",
        "apiVersion": KIND_API_VERSION,
        "name": name,
        "nodes": [control, *workers],
    }
