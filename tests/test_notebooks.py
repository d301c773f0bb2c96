"""Every notebook in _toc.yml runs start to end at scale="ci" under Papermill and writes its results JSON.

The notebooks are executed by the book build's own function into its `ci` folder (book/_build/executed/ci),
so the `ci` book build that follows the tests reuses these copies instead of running every notebook twice."""
import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "book"))
from build import execute_entry, executed_dir, execution_order, numbers_not_from_the_run, toc_entries  # noqa: E402


@pytest.mark.notebook
@pytest.mark.parametrize("entry", execution_order(toc_entries()))
def test_notebook_runs_at_ci_scale(entry):
    execute_entry(entry, "ci")
    executed = executed_dir("ci") / f"{entry}.ipynb"
    results = executed_dir("ci") / "results" / f"{Path(entry).name}.json"
    record = json.loads(results.read_text())
    assert record["scale"] == "ci"
    assert "claims" in record
    if not entry.endswith("index"):
        assert record["claims"] or record["checks"], f"{entry} wrote neither a claim nor an implementation check"
        assert all(set(c) == {"claim", "paper", "ours", "outcome", "source"} for c in record["claims"])
        failed = [c["check"] for c in record["checks"] if not c["passed"]]
        assert not failed, f"{entry}: implementation checks failed: {failed}"
    stale = numbers_not_from_the_run(nbformat.read(executed, as_version=4))
    assert not stale, f"{entry}: numbers in prose that this run did not produce: {stale}"


@pytest.mark.parametrize("entry", toc_entries())
def test_notebook_has_parameters_cell(entry):
    "Papermill injects scale/seed/results_path after the cell tagged 'parameters' (nbdev_clean must keep tags)."
    nb = nbformat.read(ROOT / f"{entry}.ipynb", as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{entry}: expected one cell tagged 'parameters', found {len(tagged)}"
    assert all(name in tagged[0].source for name in ("scale", "seed", "results_path"))
