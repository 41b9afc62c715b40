"""Failure artifacts: a failed lab test carries the lab's logs, records, pods and events.

An inner pytest session attaches to this session's lab (as an xdist sibling would), runs
one failing and one passing test, and its report and reports/ folder are checked.
"""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from lab.lab import Lab
from lab.scenarios.probes import wait_ready
from tests.conftest import needs_podman

pytest_plugins = ["pytester"]
# How pytest heads each section of a report: ---- title ---- (or ==== title ====).
HEADER = re.compile(r"^(-{3,}|={3,}) .* (-{3,}|={3,})$")
pytestmark = [pytest.mark.lab, needs_podman]

INNER_CONFTEST = """
import os
from pathlib import Path

import pytest

from lab.lab import Lab
from lab.pytest_plugin import session_scenario


@pytest.fixture(scope="session")
def lab(request):
    run_dir = Path(os.environ["LAB_OUTER_RUN_DIR"])
    return Lab.attach(session_scenario(request.config), run_dir, None)
"""

INNER_TESTS = """
from lab.manifest import pod_manifest
from lab.waits import wait_for


def test_that_fails(lab):
    # Something of its own on the lab, so its events and log are this test's.
    name = lab.run_id + "-artifact-probe"
    lab.engine.apply(
        pod_manifest(
            name=name,
            run_id=lab.run_id,
            role="probe",
            image=lab.binder.image,
            command=["echo", "the probe was here"],
        )
    )
    phase = lambda: {p.name: p.phase for p in lab.engine.pods()}.get(name)
    wait_for("the probe pod to end", lambda: (phase() == "Succeeded", phase()), timeout=60)
    assert lab.run_id == "another run"


def test_that_passes(lab):
    assert lab.run_id
"""


def section(output: str, title: str) -> list[str]:
    """The lines of one titled section of a pytest failure report."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if HEADER.match(line) and f" {title} " in line)
    end = next(i for i in range(start + 1, len(lines)) if HEADER.match(lines[i]))
    return lines[start + 1 : end]


def test_a_failed_lab_test_carries_the_labs_artifacts(
    lab: Lab, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert wait_ready(lab, 1, 60).reached is not None
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=textwrap.dedent(INNER_TESTS))
    monkeypatch.setenv("LAB_OUTER_RUN_DIR", str(lab.run_dir))

    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    finally:
        lab.engine.delete(f"{lab.run_id}-artifact-probe")

    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    for title in ("binder log", "submit hook records", "pods", "pod logs", "engine events"):
        assert f" lab: {title} " in out, f"no section {title!r} in:\n{out[-4000:]}"
    shown = section(out, "lab: binder log")
    binder_log = (lab.run_dir / "logs/binder.log").read_text()
    assert shown and all(line in binder_log for line in shown), shown
    assert f"{lab.run_id}-binder binder Running restarts 0" in section(out, "lab: pods")

    failures = pytester.path / "reports" / lab.run_id / "failures"
    [folder] = list(failures.iterdir())  # The passing test left nothing.
    assert "test_that_fails" in folder.name
    copied = (folder / "binder.log").read_text()
    assert copied.startswith("=== lab: binder start") and binder_log.startswith(copied)
    records = [json.loads(line) for line in (folder / "submissions.jsonl").read_text().splitlines()]
    assert any(record["ok"] for record in records)
    pod_logs = {path.stem: path.read_text() for path in (folder / "pods").iterdir()}
    assert f"{lab.run_id}-binder" in pod_logs
    assert any(name.startswith(f"{lab.run_id}-job-") for name in pod_logs)
    assert pod_logs[f"{lab.run_id}-artifact-probe"] == "the probe was here\n"
    assert "the probe was here" in section(out, "lab: pod logs")
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    probe = [e["kind"] for e in events if e["pod"] == f"{lab.run_id}-artifact-probe"]
    assert {"start", "died"} <= set(probe), events
    shown_events = section(out, "lab: engine events")
    assert any(line.endswith(f"{lab.run_id}-artifact-probe died") for line in shown_events)
