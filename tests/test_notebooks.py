"""Every notebook in _toc.yml runs start to end at scale="ci" under Papermill and writes its results JSON."""
import json
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "book"))
from build import numbers_not_from_the_run, toc_entries  # noqa: E402


@pytest.mark.notebook
@pytest.mark.parametrize("entry", toc_entries())
def test_notebook_runs_at_ci_scale(entry, tmp_path):
    src = ROOT / f"{entry}.ipynb"
    results = tmp_path / "results.json"
    papermill.execute_notebook(str(src), str(tmp_path / src.name), cwd=str(src.parent), progress_bar=False,
                               kernel_name="python3", parameters={"scale": "ci", "seed": 0, "results_path": str(results)})
    record = json.loads(results.read_text())
    assert record["scale"] == "ci"
    assert "claims" in record
    if not entry.endswith("index"):
        assert record["claims"] or record["checks"], f"{entry} wrote neither a claim nor an implementation check"
        assert all(set(c) == {"claim", "paper", "ours", "outcome", "source"} for c in record["claims"])
        failed = [c["check"] for c in record["checks"] if not c["passed"]]
        assert not failed, f"{entry}: implementation checks failed: {failed}"
    stale = numbers_not_from_the_run(nbformat.read(tmp_path / src.name, as_version=4))
    assert not stale, f"{entry}: numbers in prose that this run did not produce: {stale}"

@pytest.mark.parametrize("entry", toc_entries())
def test_notebook_has_parameters_cell(entry):
    "Papermill injects scale/seed/results_path after the cell tagged 'parameters' (nbdev_clean must keep tags)."
    nb = nbformat.read(ROOT / f"{entry}.ipynb", as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{entry}: expected one cell tagged 'parameters', found {len(tagged)}"
    assert all(name in tagged[0].source for name in ("scale", "seed", "results_path"))
