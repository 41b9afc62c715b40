"""The baseline and the regression gate, on generated results."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lab.cli import main
from lab.errors import BaselineError, ResultsBroken, RunNotFound
from lab.report.baseline import (
    MIN_RUNS,
    Baseline,
    GatePolicy,
    deviation_upper_limit,
    make_baseline,
)
from lab.report.commands import gate_table
from lab.report.gate import (
    EXIT_BAD_INPUT,
    EXIT_INVALID,
    EXIT_PASS,
    EXIT_REGRESSION,
    gate_verdict,
    pytest_gate_summary,
)
from lab.report.results import Metric, Results
from lab.report.runs import load_results, newest_run, run_dir
from lab.report.sample import SAMPLE_METRICS, sample_results

NAMES = sorted(SAMPLE_METRICS)


TEMPLATE_RUN = sample_results(0)


def with_medians(medians: Mapping[str, float], seed: int = 0) -> Results:
    """A sample run whose named metrics have exactly these medians."""
    results = TEMPLATE_RUN.model_copy(deep=True)
    results.meta.run_id = f"run-{seed}"
    for name, value in medians.items():
        group, key = name.split(".", 1)
        old = getattr(results, group)[key]
        values = [value * 0.98, value, value * 1.02]
        getattr(results, group)[key] = Metric.of(values, old.unit, old.better)
    return results


def runs_around(typical: Mapping[str, float], deviations: list[float]) -> list[Results]:
    """One run per deviation, every metric's median moved by that fraction."""
    return [
        with_medians({name: value * (1 + dev) for name, value in typical.items()}, seed=i)
        for i, dev in enumerate(deviations)
    ]


typicals = st.fixed_dictionaries(
    {name: st.floats(min_value=20.0, max_value=5000.0) for name in NAMES}
)
policies = st.builds(
    GatePolicy,
    spread_factor=st.floats(min_value=0.0, max_value=6.0),
    relative_floor=st.floats(min_value=0.0, max_value=0.5),
    absolute_floors=st.just({}),
)
slow = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@slow
@given(
    typical=typicals,
    deviations=st.lists(st.floats(-0.2, 0.2), min_size=MIN_RUNS, max_size=9),
    policy=policies,
)
def test_a_run_equal_to_the_baseline_never_fails(
    typical: dict[str, float], deviations: list[float], policy: GatePolicy
) -> None:
    baseline = make_baseline(runs_around(typical, deviations), policy)
    equal = with_medians({name: m.median for name, m in baseline.metrics.items()}, seed=99)

    report = gate_verdict(equal, baseline)

    assert report.status == "pass", report.lines()
    assert report.exit_code == EXIT_PASS


@slow
@given(
    typical=typicals,
    deviations=st.lists(st.floats(-0.03, 0.03), min_size=MIN_RUNS, max_size=9),
    name=st.sampled_from(NAMES),
)
def test_twenty_percent_slower_with_spread_under_five_percent_always_fails(
    typical: dict[str, float], deviations: list[float], name: str
) -> None:
    baseline = make_baseline(runs_around(typical, deviations))
    expected = baseline.metrics[name]
    assume(expected.spread < 0.05 * expected.median)
    assume(baseline.policy.gated(name))  # shown-only metrics are reported, never judged

    # Slower means longer for a time and fewer requests per second for a rate.
    factor = 1.2 if expected.better == "lower" else 0.8
    medians = {other: m.median for other, m in baseline.metrics.items()}
    medians[name] = expected.median * factor
    report = gate_verdict(with_medians(medians, seed=99), baseline)

    assert report.status == "regression", report.lines()
    assert [row.metric for row in report.regressions] == [name]
    assert report.exit_code == EXIT_REGRESSION


def test_shown_only_metrics_are_never_judged() -> None:
    typical = {name: 20.0 for name in NAMES}
    baseline = make_baseline(runs_around(typical, [0.0] * MIN_RUNS))
    medians = {other: m.median for other, m in baseline.metrics.items()}
    medians["throughput.latency_p99_ms"] *= 5

    report = gate_verdict(with_medians(medians, seed=7), baseline)

    assert report.status == "pass", report.lines()
    [row] = [r for r in report.rows if r.metric == "throughput.latency_p99_ms"]
    assert row.verdict == "not gated"


def spoil(results: Results, how: str) -> Results:
    """Break a run's environment in one of the ways the gate must call INVALID."""
    if how == "marked invalid":
        results.meta.valid = False
    elif how == "engine error":
        results.meta.invalid_reasons.append("engine error: kind API server stopped answering")
    elif how == "saturated":
        results.throughput["peak_rate_per_s"].valid = False
        results.throughput["peak_rate_per_s"].note = "load generator saturated"
        results.throughput_levels[-1].saturated = True
    elif how == "binder mismatch":
        results.meta.binder = "real"
    elif how == "scenario changed":
        results.meta.scenario_hash = "0000000000"
    elif how == "engine mismatch":
        results.meta.engine = "kind"
    elif how == "metric missing":
        del results.refill["cold_fill_s"]
    return results


SPOILS = [
    "marked invalid",
    "engine error",
    "saturated",
    "binder mismatch",
    "scenario changed",
    "engine mismatch",
    "metric missing",
]


@slow
@given(
    typical=typicals,
    deviations=st.lists(st.floats(-0.03, 0.03), min_size=MIN_RUNS, max_size=7),
    how=st.sampled_from(SPOILS),
    slower=st.sampled_from(NAMES),
    factor=st.sampled_from([1.0, 1.5, 3.0]),
)
def test_an_invalid_run_is_invalid_never_a_regression(
    typical: dict[str, float], deviations: list[float], how: str, slower: str, factor: float
) -> None:
    baseline = make_baseline(runs_around(typical, deviations))
    medians = {name: m.median for name, m in baseline.metrics.items()}
    medians[slower] *= factor if baseline.metrics[slower].better == "lower" else 1 / factor
    run = spoil(with_medians(medians, seed=99), how)

    report = gate_verdict(run, baseline)

    assert report.status == "invalid", report.lines()
    assert report.exit_code == EXIT_INVALID
    assert report.reasons


@pytest.mark.parametrize(
    ("runs", "chi2_low"),
    # Lower 10 % quantiles of χ² with runs - 1 degrees of freedom (as tables print them).
    [(5, 1.0636), (6, 1.6103), (10, 4.1682), (20, 11.6509), (50, 36.8182)],
)
def test_the_spread_between_runs_is_the_upper_limit_of_their_deviation(
    runs: int, chi2_low: float
) -> None:
    values = [float(i % 3) for i in range(runs)]

    expected = statistics.stdev(values) * math.sqrt((runs - 1) / chi2_low)

    assert deviation_upper_limit(values) == pytest.approx(expected, rel=0.005)
    assert deviation_upper_limit(values) > statistics.stdev(values)
    assert deviation_upper_limit([4.2] * runs) == 0.0


def test_the_bound_is_the_median_plus_the_largest_of_spread_and_floors() -> None:
    baseline = make_baseline(runs_around({"refill.cold_fill_s": 10.0}, [0, 0.01, -0.01, 0.02, 0]))
    metric = baseline.metrics["refill.cold_fill_s"]
    policy = GatePolicy(spread_factor=3.0, relative_floor=0.10, absolute_floors={"s": 0.05})

    assert metric.median == pytest.approx(10.0)
    # Five runs: the upper 90 % limit of σ is s × √(4 / χ²(0.10; 4)), χ² = 1.0636 (tables).
    upper = statistics.stdev([10.0, 10.1, 9.9, 10.2, 10.0]) * math.sqrt(4 / 1.0636)
    assert metric.between_runs == pytest.approx(upper, rel=0.005)
    # Each run's three repetitions are ±2 %: a standard error of the median below that.
    assert metric.within_run < metric.between_runs
    assert metric.spread == metric.between_runs
    # 3 × 0.22 s is below 10 % of 10 s, so the relative floor sets the margin.
    assert metric.bound(policy) == pytest.approx(11.0)
    assert metric.bound(policy.model_copy(update={"spread_factor": 10.0})) == pytest.approx(
        10.0 + 10 * upper, rel=0.005
    )
    floored = policy.model_copy(update={"absolute_floors": {"s": 5.0}})
    assert metric.bound(floored) == pytest.approx(15.0)


def test_a_higher_is_better_metric_gets_a_lower_bound() -> None:
    baseline = make_baseline(runs_around({"throughput.peak_rate_per_s": 200.0}, [0.0] * 5))
    metric = baseline.metrics["throughput.peak_rate_per_s"]

    assert metric.better == "higher"
    assert metric.bound(baseline.policy) == pytest.approx(180.0)


def test_a_baseline_needs_five_runs() -> None:
    with pytest.raises(BaselineError, match="at least 5 runs, got 4"):
        make_baseline([sample_results(i) for i in range(4)])


def test_a_baseline_refuses_invalid_and_mixed_runs() -> None:
    runs = [sample_results(i) for i in range(5)]
    with pytest.raises(BaselineError, match="sample-2 is invalid"):
        make_baseline([*runs[:2], sample_results(2, valid=False), *runs[3:]])
    with pytest.raises(BaselineError, match="scenario_hash"):
        make_baseline([*runs[:4], sample_results(4, scenario_hash="other")])
    with pytest.raises(BaselineError, match="binder"):
        make_baseline([*runs[:4], sample_results(4, binder="real")])
    with pytest.raises(BaselineError, match="sample-0 given more than once"):
        make_baseline([*runs[:4], sample_results(0)])


def test_a_metric_invalid_in_too_many_runs_is_left_out() -> None:
    runs = [sample_results(i, saturated=i < 2) for i in range(6)]

    baseline = make_baseline(runs)

    assert "throughput.peak_rate_per_s" not in baseline.metrics
    assert "refill.cold_fill_s" in baseline.metrics


def test_a_new_metric_is_shown_but_not_gated() -> None:
    baseline = make_baseline([sample_results(i) for i in range(5)])
    run = sample_results(9)
    run.refill["new_metric_s"] = Metric.of([100.0], "s")

    report = gate_verdict(run, baseline)

    row = next(row for row in report.rows if row.metric == "refill.new_metric_s")
    assert row.verdict == "not gated"
    assert report.status == "pass"


def test_baseline_files_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    baseline = make_baseline([sample_results(i) for i in range(5)])
    good = baseline.write(tmp_path / "good.json")
    assert Baseline.read(good) == baseline

    cases = {
        "missing.json": None,
        "garbage.json": "{not json",
        "results.json": sample_results(0).model_dump_json(),
        "field.json": json.dumps({**json.loads(good.read_text()), "metrics": {"x": {}}}),
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(BaselineError) as caught:
            Baseline.read(path)
        assert "\n" not in str(caught.value)
        assert "lab baseline" in str(caught.value)


def test_missing_and_broken_runs_are_named(tmp_path: Path) -> None:
    with pytest.raises(RunNotFound, match="no run 'nope'"):
        run_dir("nope", tmp_path)
    with pytest.raises(RunNotFound, match="no finished run"):
        newest_run(tmp_path)

    (tmp_path / "unfinished").mkdir()
    with pytest.raises(RunNotFound, match="has no results.json"):
        run_dir("unfinished", tmp_path)

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text('{"meta": {"run_id": "x"}}')
    with pytest.raises(ResultsBroken, match=r"meta\.started"):
        load_results(run_dir("broken", tmp_path))


class Lines:
    """Stands in for pytest's terminal reporter."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write_sep(self, sep: str, title: str) -> None:
        self.lines.append(f"{sep * 3} {title}")

    def write_line(self, line: str) -> None:
        self.lines.append(line)


def test_pytest_gate_summary_reports_the_worst_verdict(tmp_path: Path) -> None:
    baseline_file = make_baseline([sample_results(i) for i in range(5)]).write(tmp_path / "b.json")
    passing = sample_results(7)
    regressed = sample_results(8, scale={"failover.binder_restart_pool_s": 2.0})
    folder = tmp_path / "saturated"
    sample_results(9, saturated=True).write(folder)
    writer = Lines()

    assert pytest_gate_summary(writer, [passing], baseline_file) == EXIT_PASS
    assert pytest_gate_summary(writer, [passing, regressed], baseline_file) == EXIT_REGRESSION
    assert pytest_gate_summary(writer, [regressed, folder], baseline_file) == EXIT_INVALID
    assert pytest_gate_summary(writer, [], baseline_file) == EXIT_PASS
    assert any("REGRESSED on failover.binder_restart_pool_s" in line for line in writer.lines)
    assert any("INVALID" in line for line in writer.lines)


@pytest.fixture
def reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with five baseline runs and three runs to judge under reports/."""
    monkeypatch.chdir(tmp_path)
    for i in range(5):
        sample_results(i, run_id=f"base{i}").write(tmp_path / "reports" / f"base{i}")
    sample_results(10, run_id="good").write(tmp_path / "reports" / "good")
    slower = {"refill.cold_fill_s": 1.5}
    sample_results(11, run_id="slow", scale=slower).write(tmp_path / "reports" / "slow")
    newest = sample_results(12, run_id="sat", saturated=True).write(tmp_path / "reports" / "sat")
    later = newest.stat().st_mtime + 60
    os.utime(newest, (later, later))
    return tmp_path / "reports"


def write_baseline(runner: CliRunner) -> Any:
    """`lab baseline` over the five sample runs of the `reports` fixture, into b.json."""
    return runner.invoke(main, ["baseline", *(f"base{i}" for i in range(5)), "-o", "b.json"])


def test_the_gate_command_exit_codes(reports: Path) -> None:
    runner = CliRunner()
    made = write_baseline(runner)
    assert made.exit_code == 0, made.output

    def gate(*args: str) -> int:
        return runner.invoke(main, ["gate", "--baseline", "b.json", *args]).exit_code

    assert gate("good") == EXIT_PASS
    assert gate("slow") == EXIT_REGRESSION
    assert gate("sat") == EXIT_INVALID
    assert gate("missing") == EXIT_BAD_INPUT
    assert runner.invoke(main, ["gate", "good"]).exit_code == EXIT_BAD_INPUT  # no --baseline
    assert gate() == EXIT_INVALID  # the newest run is the saturated one
    assert (
        runner.invoke(main, ["gate", "--baseline", "reports/good/results.json", "good"]).exit_code
        == EXIT_BAD_INPUT
    )


def test_the_gate_command_prints_a_table_and_one_line_errors(reports: Path) -> None:
    runner = CliRunner()
    write_baseline(runner)

    judged = runner.invoke(main, ["gate", "--baseline", "b.json", "slow"])
    assert "refill.cold_fill_s" in judged.output
    assert "fail" in judged.output
    assert "REGRESSED on refill.cold_fill_s" in judged.output

    refused = runner.invoke(main, ["baseline", "base0", "base1"])
    assert refused.exit_code == 1
    assert "at least 5 runs" in refused.output
    assert "Traceback" not in refused.output
    assert not refused.exception or isinstance(refused.exception, SystemExit)


def one_error_line(result: Any) -> str:
    """The single `error:` line a bad input gives, with no traceback."""
    assert "Traceback" not in result.output
    assert not result.exception or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return " ".join(result.output[result.output.index("error:") :].split())


def test_numbers_that_are_not_finite_are_bad_input_not_a_pass(reports: Path) -> None:
    runner = CliRunner()
    write_baseline(runner)
    for bad in (math.nan, math.inf):  # json writes them as NaN and Infinity
        broken = json.loads((reports / "good" / "results.json").read_text())
        broken["refill"]["cold_fill_s"]["median"] = bad
        (reports / "spoilt").mkdir(exist_ok=True)
        (reports / "spoilt" / "results.json").write_text(json.dumps(broken))

        judged = runner.invoke(main, ["gate", "--baseline", "b.json", "spoilt"])
        assert judged.exit_code == EXIT_BAD_INPUT, judged.output
        assert "is not a results file" in one_error_line(judged)

        made = runner.invoke(main, ["baseline", *(f"base{i}" for i in range(4)), "spoilt"])
        assert made.exit_code == 1
        assert "is not a results file" in one_error_line(made)


def test_files_that_are_not_text_are_bad_input(reports: Path) -> None:
    runner = CliRunner()
    write_baseline(runner)
    Path("latin.json").write_bytes(b'{"format": "caf\xe9"}')
    (reports / "binary").mkdir()
    (reports / "binary" / "results.json").write_bytes(bytes(range(256)))

    not_a_baseline = runner.invoke(main, ["gate", "--baseline", "latin.json", "good"])
    assert not_a_baseline.exit_code == EXIT_BAD_INPUT
    assert "not UTF-8 text" in one_error_line(not_a_baseline)
    not_a_run = runner.invoke(main, ["gate", "--baseline", "b.json", "binary"])
    assert not_a_run.exit_code == EXIT_BAD_INPUT
    assert "not UTF-8 text" in one_error_line(not_a_run)


def test_an_output_path_that_cannot_be_written_is_one_line(reports: Path) -> None:
    runner = CliRunner()
    Path("a-file").write_text("in the way\n")
    made = runner.invoke(main, ["baseline", *(f"base{i}" for i in range(5)), "-o", "a-file/b.json"])
    assert made.exit_code == 1
    assert "cannot write the baseline to a-file/b.json" in one_error_line(made)

    write_baseline(runner)
    judged = runner.invoke(main, ["gate", "--baseline", "b.json", "good", "--json", "a-file/v"])
    assert judged.exit_code == EXIT_BAD_INPUT
    assert "cannot write the verdict to a-file/v" in one_error_line(judged)
    page = runner.invoke(main, ["report", "--compare", "good", "slow", "--html", "a-file/c.html"])
    assert page.exit_code == 1
    assert "cannot write the page to a-file/c.html" in one_error_line(page)
    assert sorted(p.name for p in Path().iterdir()) == ["a-file", "b.json", "reports"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"spread_factr": 2.0}, "policy.spread_factr: Extra inputs are not permitted"),
        ({"spread_factor": -1.0}, "policy.spread_factor: Input should be greater than or equal"),
        ({"absolute_floors": {"s": -0.1}}, "policy.absolute_floors.s: Input should be greater"),
    ],
)
def test_a_hand_edited_policy_is_checked(
    reports: Path, change: dict[str, object], problem: str
) -> None:
    runner = CliRunner()
    write_baseline(runner)
    edited = json.loads(Path("b.json").read_text())
    edited["policy"].update(change)
    Path("b.json").write_text(json.dumps(edited))

    judged = runner.invoke(main, ["gate", "--baseline", "b.json", "good"])

    assert judged.exit_code == EXIT_BAD_INPUT
    assert problem in one_error_line(judged)


def test_an_invalid_runs_table_says_its_verdicts_are_hypothetical() -> None:
    baseline = make_baseline([sample_results(i) for i in range(5)])
    valid = gate_verdict(sample_results(10), baseline)
    invalid = gate_verdict(sample_results(12, saturated=True), baseline)

    assert invalid.status == "invalid"
    assert gate_table(valid).columns[-1].header == "verdict"
    assert gate_table(invalid).columns[-1].header == "verdict if valid"


def test_the_baseline_command_says_how_small_a_change_the_gate_sees(reports: Path) -> None:
    runner = CliRunner()
    made = write_baseline(runner)
    assert made.exit_code == 0, made.output
    assert "gate sees" in made.output
    assert "vary so much" not in made.output

    # One metric wildly different from run to run: the gate cannot see a 50 % change in it.
    for i, factor in enumerate([0.4, 1.0, 1.8, 0.7, 2.5]):
        scale = {"failover.kill_busy_recovery_s": factor}
        sample_results(i, run_id=f"wild{i}", scale=scale).write(reports / f"wild{i}")
    wild = runner.invoke(main, ["baseline", *(f"wild{i}" for i in range(5)), "-o", "w.json"])
    assert wild.exit_code == 0, wild.output
    said = " ".join(wild.output.split())  # the console wraps long lines
    assert "1 metric(s) vary so much" in said
    assert "of their median: failover.kill_busy_recovery_s. More runs" in said


def test_the_report_command_writes_and_compares(reports: Path) -> None:
    runner = CliRunner()

    written = runner.invoke(main, ["report", "good"])
    assert written.exit_code == 0, written.output
    assert (reports / "good" / "report.html").is_file()

    compared = runner.invoke(main, ["report", "--compare", "good", "slow", "--html", "cmp.html"])
    assert compared.exit_code == 0, compared.output
    assert "refill.cold_fill_s" in compared.output
    assert Path("cmp.html").read_text().count('data-plot="') == 4

    assert "compare with care" not in compared.output  # same binder, scenario and engine

    missing = runner.invoke(main, ["report", "nope"])
    assert missing.exit_code == 1
    assert "no run 'nope'" in missing.output


def test_comparing_the_stand_in_with_the_real_binder_says_so(reports: Path) -> None:
    sample_results(13, run_id="real", binder="real").write(reports / "real")
    runner = CliRunner()

    compared = runner.invoke(main, ["report", "--compare", "good", "real"])

    assert compared.exit_code == 0, compared.output
    assert "compare with care" in compared.output
    assert "good ran the stand-in, real the real WorkBinder" in compared.output
