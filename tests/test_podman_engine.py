"""The podman engine against real podman: pods, restarts, teardown, leftovers, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lab.engines.podman import PodmanEngine, labeled_runs, podman_env
from lab.errors import ManifestError
from lab.manifest import pod_manifest
from lab.run import RunRecord
from lab.waits import wait_for
from tests.conftest import needs_podman

pytestmark = [pytest.mark.lab, needs_podman]


def sleeper(engine: PodmanEngine, image: str, name: str, restart: str) -> dict[str, object]:
    return pod_manifest(
        name=f"{engine.run_id}-{name}",
        run_id=engine.run_id,
        role="worker",
        image=image,
        command=["sleep", "600"],
        restart_policy=restart,
    )


def pod_state(engine: PodmanEngine, name: str) -> tuple[str, int]:
    pods = {p.name: p for p in engine.pods()}
    pod = pods[f"{engine.run_id}-{name}"]
    return pod.phase, pod.restarts


def run_objects(env: dict[str, str], run_id: str) -> list[str]:
    """Every podman object (pod, container, image, volume) labeled with the run."""
    found = []
    for argv in (["pod", "ps"], ["ps", "-a"], ["images"], ["volume", "ls"]):
        done = subprocess.run(
            ["podman", *argv, "--filter", f"label=lab.run={run_id}", "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        found += [f"{argv[0]}:{item}" for item in json.loads(done.stdout or "[]") or []]
    return found


def test_pod_from_manifest_reaches_running(engine: PodmanEngine, base_image: str) -> None:
    engine.apply(sleeper(engine, base_image, "one", "Never"))

    wait_for(
        "pod one running",
        lambda: (pod_state(engine, "one")[0] == "Running", pod_state(engine, "one")),
        timeout=30,
    )
    [pod] = engine.pods()
    assert pod.labels["lab.run"] == engine.run_id
    assert pod.restarts == 0


@pytest.mark.parametrize(("policy", "restarts"), [("Always", 1), ("Never", 0)])
def test_killed_container_restarts_only_when_policy_says(
    engine: PodmanEngine, base_image: str, policy: str, restarts: int
) -> None:
    engine.apply(sleeper(engine, base_image, "victim", policy))
    wait_for(
        "victim running", lambda: (pod_state(engine, "victim")[0] == "Running", None), timeout=30
    )

    engine.kill(f"{engine.run_id}-victim")

    if restarts:
        state = wait_for(
            "a restart",
            lambda: (pod_state(engine, "victim") == ("Running", 1), pod_state(engine, "victim")),
            timeout=30,
        )
    else:
        state = wait_for(
            "the pod to fail",
            lambda: (pod_state(engine, "victim")[0] == "Failed", pod_state(engine, "victim")),
            timeout=30,
        )
        time.sleep(2)  # Give a wrong restart time to happen before looking again.
        state = pod_state(engine, "victim")
    assert state[1] == restarts
    died = [e for e in engine.events() if e.kind == "died" and e.pod.endswith("-victim")]
    assert died and died[0].detail == "exit 137"


def test_down_leaves_nothing_of_the_run(tmp_path: Path, base_image: str) -> None:
    engine = PodmanEngine("rdowntest-" + os.urandom(3).hex(), tmp_path / "run")
    engine.up()
    engine.apply(sleeper(engine, base_image, "a", "Always"))
    engine.apply(sleeper(engine, base_image, "b", "Never"))
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Containerfile").write_text(f"FROM {base_image}\nENV LAB_TEST=1\n")
    engine.build_image(context, f"localhost/lab-test-{engine.run_id}:1", {})
    service_pid = engine.record.host_pids["podman-service"][0] if engine.record else 0
    assert run_objects(engine.env, engine.run_id)

    engine.down()
    engine.down()  # A second teardown is harmless.

    assert run_objects(engine.env, engine.run_id) == []
    assert not Path(f"/proc/{service_pid}").exists()
    assert RunRecord.load(engine.run_id) is None
    assert not engine.socket.exists() or not _socket_answers(engine.socket)


def _socket_answers(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


ORPHAN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lab.engines.podman import PodmanEngine
    from lab.manifest import pod_manifest
    run_id, run_dir, image = sys.argv[1:4]
    engine = PodmanEngine(run_id, Path(run_dir))
    engine.up()
    engine.apply(pod_manifest(name=run_id + "-orphan", run_id=run_id, role="worker",
                              image=image, command=["sleep", "600"], restart_policy="Always"))
    print("up", flush=True)
    time.sleep(600)
""")


def test_leftovers_of_a_killed_run_are_removed_by_the_next_bring_up(
    tmp_path: Path, base_image: str
) -> None:
    orphan_id = "rorphan-" + os.urandom(3).hex()
    child = subprocess.Popen(
        [sys.executable, "-c", ORPHAN, orphan_id, str(tmp_path / orphan_id), base_image],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "up"
    record = RunRecord.load(orphan_id)
    assert record is not None
    service_pid = int(record.host_pids["podman-service"][0] or 0)
    child.send_signal(signal.SIGKILL)
    child.wait()
    env = podman_env(tmp_path / "probe")
    assert orphan_id in labeled_runs(env)

    engine = PodmanEngine("rsweeper-" + os.urandom(3).hex(), tmp_path / "sweeper")
    engine.up()
    engine.down()

    assert run_objects(env, orphan_id) == []
    assert not Path(f"/proc/{service_pid}").exists()
    assert RunRecord.load(orphan_id) is None


def test_malformed_manifest_is_one_clear_error(engine: PodmanEngine, base_image: str) -> None:
    manifest = sleeper(engine, base_image, "bad", "Always")
    manifest["metadata"] = {"name": "Not_A_DNS_Name", "labels": {"lab.run": engine.run_id}}

    with pytest.raises(ManifestError, match=r"metadata\.name 'Not_A_DNS_Name' is not a DNS"):
        engine.apply(manifest)


def test_manifest_podman_refuses_is_a_lab_error(engine: PodmanEngine) -> None:
    manifest = pod_manifest(
        name=f"{engine.run_id}-noimage",
        run_id=engine.run_id,
        role="worker",
        image="localhost/no-such-image:0",
        command=["true"],
    )

    with pytest.raises(ManifestError, match="podman refused pod"):
        engine.apply(manifest)


def test_missing_podman_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "LAB_STATE_DIR": str(tmp_path / "state")}
    lab_cli = Path(sys.executable).parent / "lab"

    smoke = str(Path(__file__).resolve().parents[1] / "scenarios" / "smoke.yaml")
    done = subprocess.run(
        [str(lab_cli), "up", smoke],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: podman not found: run `make setup`, or install podman and runc (apt-get "
        "install podman runc)"
    ]
