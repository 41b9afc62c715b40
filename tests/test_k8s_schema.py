"""Every manifest the lab sends a cluster, validated offline against Kubernetes' schema.

The schemas come with the kubernetes-validate package (no network), pinned to the
Kubernetes version of the lab's pinned kind node image, in strict mode: an unknown or
misspelt field fails as surely as a wrong type.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from lab.binder.submit_hook import job_manifest
from lab.engines import k8s_objects as objects
from lab.engines.kind_release import DEFAULT_KUBERNETES, NODE_IMAGES
from lab.manifest import pod_manifest

RUN_ID = "r1203164100-a1b2c3"
NS = objects.run_namespace(RUN_ID)
IMAGE = "localhost/lab-worker-r1203164100-a1b2c3:0123abcd"
WORKER = ["sh", "startBinderJobLocal.sh", "{ce}", "{routing}", "{job}", "{logfile}"]


def validate(manifest: dict[str, Any]) -> str:
    """Validate strictly against the pinned version; return the schema version used."""
    return str(kubernetes_validate.validate(manifest, DEFAULT_KUBERNETES, strict=True))


def test_the_schema_is_the_pinned_node_images_version() -> None:
    assert DEFAULT_KUBERNETES in NODE_IMAGES
    assert validate(objects.namespace(RUN_ID)) == "1.31"


def podman_pod() -> dict[str, Any]:
    return pod_manifest(
        name=f"{RUN_ID}-binder",
        run_id=RUN_ID,
        role="binder",
        image=IMAGE,
        command=["bash", "-c", "exec bash run_binder.sh"],
        restart_policy="Never",
        mounts={"/tmp/run/conf": "/lab/conf", "/tmp/run/logs": "/lab/logs"},
        env={"LAB_HOOK_CONFIG": "/lab/conf/hook.json", "TMPDIR": "/lab/tmp"},
        workdir="/opt/workbinder",
    )


def kind_pod(role: str = "binder", **extra: Any) -> dict[str, Any]:
    return pod_manifest(
        name=f"{RUN_ID}-{role}",
        run_id=RUN_ID,
        role=role,
        image=IMAGE,
        command=["bash", "-c", "exec bash run_binder.sh"] if role == "binder" else WORKER,
        env={"TMPDIR": "/lab/tmp"},
        workdir="/opt/workbinder",
        host_network=False,
        namespace=NS,
        config_map=objects.CONFIG_MAP,
        config_files={
            "binder.properties": "/opt/workbinder/binder.properties",
            "hook.json": "/lab/conf/hook.json",
        },
        scratch=["/lab/tmp", "/lab/logs"],
        mounts={"/tmp/run/status": "/lab/status"},
        **extra,
    )


def test_the_podman_engines_pod_is_valid() -> None:
    validate(podman_pod())


def test_the_podman_default_shape_is_unchanged_by_the_new_parameters() -> None:
    pod = podman_pod()
    assert pod["spec"]["hostNetwork"] is True
    assert list(pod["spec"]) == ["hostNetwork", "restartPolicy", "containers", "volumes"]
    assert list(pod["metadata"]) == ["name", "labels"]
    assert all("hostPath" in volume for volume in pod["spec"]["volumes"])


def test_the_kind_engines_pods_are_valid() -> None:
    binder = kind_pod(service_account=objects.BINDER_ACCOUNT, ports={"binder": 40123})
    worker = kind_pod(role="worker")

    validate(binder)
    validate(worker)

    assert binder["spec"]["serviceAccountName"] == objects.BINDER_ACCOUNT
    assert worker["spec"]["automountServiceAccountToken"] is False
    assert {"name": "config", "configMap": {"name": "lab-config"}} in worker["spec"]["volumes"]


def test_a_job_pod_filled_in_by_the_submit_hook_is_valid() -> None:
    template = kind_pod(role="worker")
    job = job_manifest(template, ["cluster1.example:8443/cream-pbs", "r", "1700000000_7", "l"])
    validate(job)
    assert job["metadata"]["name"] == "job-1700000000-7"


@pytest.mark.parametrize(
    "build",
    [
        lambda: objects.namespace(RUN_ID),
        lambda: objects.service_account(RUN_ID),
        lambda: objects.pod_role(RUN_ID),
        lambda: objects.role_binding(RUN_ID),
        lambda: objects.config_map(RUN_ID, {"binder.properties": "CEs = Site-A\n"}),
        lambda: objects.service(RUN_ID, 40123),
        lambda: objects.deployment(
            kind_pod(service_account=objects.BINDER_ACCOUNT, ports={"binder": 40123})
        ),
    ],
    ids=[
        "namespace",
        "serviceaccount",
        "role",
        "rolebinding",
        "configmap",
        "service",
        "deployment",
    ],
)
def test_the_kind_objects_are_valid(build: Any) -> None:
    validate(build())


def test_every_object_carries_the_run_label() -> None:
    for obj in [
        *objects.base_objects(RUN_ID),
        objects.service(RUN_ID, 1),
        objects.config_map(RUN_ID, {}),
        objects.deployment(kind_pod()),
    ]:
        assert obj["metadata"]["labels"]["lab.run"] == RUN_ID, obj["kind"]


def test_the_deployments_selector_picks_its_template_and_the_service_its_pods() -> None:
    deployment = objects.deployment(kind_pod(ports={"binder": 40123}))
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template_labels.items()
    assert objects.service(RUN_ID, 40123)["spec"]["selector"].items() <= template_labels.items()
    assert deployment["spec"]["template"]["spec"]["restartPolicy"] == "Always"


@pytest.mark.parametrize(
    ("breakage", "complaint"),
    [
        (lambda pod: pod["spec"]["containers"][0].update(imagePullPolicy=0), "imagePullPolicy"),
        (lambda pod: pod["spec"].update(hostNetwrok=True), "hostNetwrok"),
        (
            lambda pod: pod["spec"]["containers"][0]["ports"][0].update(containerPort="x"),
            "containerPort",
        ),
    ],
    ids=["wrong-type", "misspelt-field", "port-not-a-number"],
)
def test_a_broken_manifest_fails_validation(breakage: Any, complaint: str) -> None:
    pod = copy.deepcopy(kind_pod(ports={"binder": 40123}))
    breakage(pod)

    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        validate(pod)
    assert complaint in str(caught.value.message) + ".".join(map(str, caught.value.path))


def test_the_kind_cluster_config_has_the_shape_kind_reads(tmp_path: Path) -> None:
    config = objects.kind_cluster_config(
        "lab-x",
        nodes=2,
        node_image=NODE_IMAGES[DEFAULT_KUBERNETES],
        host_port=40999,
        shared_dirs=[str(tmp_path)],
    )

    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4" and config["kind"] == "Cluster"
    control, worker = config["nodes"]
    assert control["extraPortMappings"] == [
        {
            "containerPort": objects.BINDER_NODE_PORT,
            "hostPort": 40999,
            "listenAddress": "127.0.0.1",
            "protocol": "TCP",
        }
    ]
    assert worker == {
        "role": "worker",
        "image": NODE_IMAGES[DEFAULT_KUBERNETES],
        "extraMounts": [{"hostPath": str(tmp_path), "containerPath": str(tmp_path)}],
    }
    assert 30000 <= objects.BINDER_NODE_PORT <= 32767  # the Service node port range
