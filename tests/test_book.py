"""The book build's own helpers (book/build.py)."""
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "book"))
from build import (display_math_as_blocks, execution_order, final_stream_state, for_reading, html_dir,  # noqa: E402
                   imported_modules, is_setup, numbers_not_from_the_run, summary, toc_entries)


def test_toc_lists_existing_notebooks_root_first():
    entries = toc_entries()
    assert entries[0] == "nbs/index" and len(set(entries)) == len(entries)
    assert all((ROOT / f"{e}.ipynb").exists() for e in entries)


def test_progress_bars_reduced_to_final_state():
    stream = lambda name, text: nbformat.v4.new_output("stream", name=name, text=text)
    outs = final_stream_state([stream("stderr", "train: 0%\rtrain: 50%\r"), stream("stderr", "train: 100%\n"),
                               stream("stdout", "loss 1.0\n"), stream("stderr", "eval: 1\reval: 2\n")])
    assert [(o.name, o.text) for o in outs] == [("stderr", "train: 100%\n"), ("stdout", "loss 1.0\n"),
                                               ("stderr", "eval: 2\n")]


def test_widget_warning_dropped():
    stream = nbformat.v4.new_output("stream", name="stderr", text=(
        "/x/tqdm/auto.py:21: TqdmWarning: IProgress not found. Please update jupyter and ipywidgets.\n"
        "  from .autonotebook import tqdm as notebook_tqdm\n"))
    assert final_stream_state([stream]) == []


def test_display_math_gets_its_own_paragraph():
    md = "Text before\n$$a = b;$$\nmore text\n\n$$\nx = y\n$$\nafter\n\n- item:\n  $$z$$\n- next"
    assert display_math_as_blocks(md) == ("Text before\n\n$$a = b;$$\n\nmore text\n\n$$\nx = y\n$$\n\nafter"
                                          "\n\n- item:\n\n  $$z$$\n\n- next")
    assert display_math_as_blocks("no math, $inline$ only") == "no math, $inline$ only"


def test_prose_numbers_must_come_from_the_run():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("Accuracy 95.7%, in about 8 minutes; the paper's 99.8 (Table 1). "
                                      "$x^{0.5}$, `torch==2.13.0`, arXiv 2404.09516, 12 layers."),
        nbformat.v4.new_code_cell("paper = '99.8% (Mamba, Table 1)'")])
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="accuracy 96.1\n")]
    assert numbers_not_from_the_run(nb) == ["95.7", "8"]
    nb.cells[1].outputs[0].text = "accuracy 95.7, 8 minutes\n"
    assert numbers_not_from_the_run(nb) == []


def test_imported_modules_follow_absolute_and_relative_imports():
    src = "import os\nfrom tinylab.core import ClaimTable, decide\nimport tinylab.lm\nfrom tinylab.kernels.cema import cema\n"
    assert imported_modules(src) == {"core", "lm", "kernels.cema"}
    assert imported_modules("from .cema import _check_sequence\nfrom ..core import seed_everything", "kernels") == \
        {"kernels.cema", "core"}
    assert imported_modules("from tinylab import core, lm") == {"core", "lm"}
    assert imported_modules("from tinylab.nothing import x") == set()


def test_each_scale_has_its_own_html_and_the_root_runs_last():
    assert html_dir("book").name == "html" and html_dir("ci") != html_dir("book")
    assert execution_order(["nbs/index", "nbs/a", "nbs/b"]) == ["nbs/a", "nbs/b", "nbs/index"]
    text = summary({"nbs/a": 12.4, "nbs/index": None})
    assert "nbs/a" in text and "12 s" in text and "up to date" in text and "1 executed, 1 up to date" in text


def test_rendered_page_shows_the_parameters_it_was_built_with(tmp_path):
    params = nbformat.v4.new_code_cell('scale = "ci"\nresults_path = None', metadata={"tags": ["parameters"]})
    injected = nbformat.v4.new_code_cell('scale = "book"\nresults_path = "/tmp/x/book/_build/executed/book/results/11_m.json"',
                                         metadata={"tags": ["injected-parameters"]})
    path = tmp_path / "nb.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[params, injected]), path)
    for_reading(path)
    cells = nbformat.read(path, as_version=4).cells
    assert len(cells) == 1 and 'scale = "book"' in cells[0].source
    assert 'results_path = "results/11_m.json"' in cells[0].source and "/tmp" not in cells[0].source


def test_import_cells_are_folded():
    assert is_setup("#| export\nfrom __future__ import annotations\n\nimport os\nimport torch  # the model\n"
                    "from tinylab.core import (ClaimTable,\n    decide)\n")
    assert is_setup("import os\nos.environ.setdefault('TRITON_INTERPRET', '1')")
    assert not is_setup("import torch\nx = torch.zeros(3)")
    assert not is_setup("#| export\n")


def test_every_bibliography_file_parses():
    "A syntax error in one .bib file stops the whole book build: catch it here, in a second."
    import pybtex.database
    import yaml
    config = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())
    for name in config["bibtex_bibfiles"]:
        pybtex.database.parse_file(ROOT / "book" / name, "bibtex")
