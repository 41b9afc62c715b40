"""Run folders under reports/: finding them and reading their results.json."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from lab.errors import ResultsBroken, RunNotFound
from lab.report.results import RESULTS_FILE, Results

REPORTS_DIR = Path("reports")


def run_dir(ref: str | Path, reports: Path = REPORTS_DIR) -> Path:
    """The folder of a run named by its path, its results.json or its id under `reports`."""
    given = Path(ref)
    if given.name == RESULTS_FILE and given.is_file():
        return given.parent

    for folder in (given, reports / given):
        if (folder / RESULTS_FILE).is_file():
            return folder
        if folder.is_dir():
            raise RunNotFound(
                f"{folder} has no {RESULTS_FILE}: the run did not finish; "
                "pick another run or run the scenario again"
            )

    raise RunNotFound(
        f"no run {str(ref)!r} as a folder or under {reports}/: "
        f"name a run folder or one of the run ids in {reports}/"
    )


def newest_run(reports: Path = REPORTS_DIR) -> Path:
    """The run under `reports` whose results.json was written last."""
    finished = [path.parent for path in reports.glob(f"*/{RESULTS_FILE}")]
    if not finished:
        raise RunNotFound(
            f"no finished run under {reports}/: run `lab run SCENARIO` first or name a run"
        )
    return max(finished, key=lambda folder: (folder / RESULTS_FILE).stat().st_mtime)


def load_results(folder: Path) -> Results:
    """One run's results, or an error that says which field of which file is wrong."""
    path = folder / RESULTS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RunNotFound(f"cannot read {path} ({exc.strerror}): check the run folder") from exc
    except UnicodeDecodeError as exc:
        raise ResultsBroken(
            f"{path} is not a results file (not UTF-8 text at byte {exc.start}): "
            "run the scenario again or restore the file"
        ) from exc

    try:
        return Results.model_validate_json(text)
    except ValidationError as exc:
        raise ResultsBroken(
            f"{path} is not a results file ({first_problem(exc)}): "
            "run the scenario again or restore the file"
        ) from exc


def first_problem(exc: ValidationError) -> str:
    """The first validation problem as `field.path: message`, short enough for one line."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "top level"
    return f"{where}: {error['msg']}"
