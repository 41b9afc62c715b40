"""The WorkBinder tree and properties the lab renders, checked on real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.binder.properties import check_override_keys, parse_properties, render_properties
from lab.binder.tree import REQUIRED, check_tree, copy_tree, tree_hash
from lab.errors import BinderTreeError, LabError
from lab.manifest import check_pod_manifest, job_pod_name, pod_manifest


def fake_tree(root: Path, skip: str = "") -> Path:
    for part in REQUIRED:
        if part != skip:
            (root / part).parent.mkdir(parents=True, exist_ok=True)
            (root / part).write_text("x")
    return root


def test_a_tree_missing_pieces_names_every_one(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "wb", skip="lib/log4j-1.2.15.jar")
    (tree / "run_binder.sh").unlink()

    with pytest.raises(BinderTreeError, match="lacks lib/log4j-1.2.15.jar, run_binder.sh: "):
        check_tree(tree)


def test_a_wrong_path_says_what_to_point_at(tmp_path: Path) -> None:
    with pytest.raises(BinderTreeError, match="is not a folder: point LAB_BINDER_HOME"):
        check_tree(tmp_path / "nowhere")


def test_the_copy_leaves_the_users_tree_alone(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "wb")
    (tree / "src").mkdir()
    (tree / "src" / "Binder.java").write_text("class Binder {}")
    before = tree_hash(tree)

    copy = copy_tree(tree, tmp_path / "run" / "workbinder")
    (copy / "binder.properties").write_text("changed")

    assert tree_hash(tree) == before
    assert not (copy / "src").exists()


def test_properties_round_trip_with_continuations() -> None:
    text = "# comment\nA = 1\nB=two words\nC: x \\\n   y\n! bang\nD\n"

    parsed = parse_properties(text)

    assert parsed == {"A": "1", "B": "two words", "C": "x y", "D": ""}
    assert parse_properties(render_properties(parsed, "header")) == parsed


def test_unknown_binder_keys_are_refused_with_the_known_ones() -> None:
    check_override_keys({"MinPoolSize": 3, "Site-B_MaxJobsOnCE": 2, "LabStandinRefillTickMs": 1})

    with pytest.raises(LabError, match=r"unknown binder properties MinPoolSzie: .*MinPoolSize"):
        check_override_keys({"MinPoolSzie": 3})


def test_job_pod_names_are_dns_labels() -> None:
    assert job_pod_name("1796314185095-0") == "job-1796314185095-0"
    assert job_pod_name("17963:14_1.X", "r1-") == "r1-job-17963-14-1-x"
    assert len(job_pod_name("9" * 100, "run-")) == 63


def test_manifest_check_names_the_field() -> None:
    good = pod_manifest(name="p", run_id="r1", role="worker", image="i", command=["true"])
    check_pod_manifest(good)
    good["spec"]["restartPolicy"] = "Sometimes"

    with pytest.raises(LabError, match="spec.restartPolicy must be one of"):
        check_pod_manifest(good)
