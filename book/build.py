"""Build the tinylab book: execute every notebook in _toc.yml with Papermill, then render with Jupyter Book.

    python book/build.py --scale book      # the book (minutes per chapter on a CPU)
    python book/build.py --scale ci        # the same pipeline, small and fast (CI)

Executed copies go to book/_build/executed/<scale>/ with each chapter's results JSON beside them. A
notebook is executed again only when its source, its parameters or the tinylab package changed (a
manifest of hashes records what each copy was made from). The landing page (the toc's root) runs last,
so it can sum up the chapters' results. The HTML is book/_build/html; the build fails unless every
page of the toc is in it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import papermill
import yaml

ROOT = Path(__file__).resolve().parent.parent
BOOK, BUILD = ROOT / "book", ROOT / "book" / "_build"


def toc_entries(toc_path: Path = ROOT / "_toc.yml") -> list[str]:
    "Every page of the table of contents, root first, as paths without suffix (e.g. 'nbs/00_core')."
    toc = yaml.safe_load(toc_path.read_text())
    entries = [toc["root"]]
    def walk(items):
        for item in items or []:
            if "file" in item:
                entries.append(item["file"])
            walk(item.get("sections"))
    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return entries


def package_hash() -> str:
    "A hash of the tinylab package source: a chapter's output depends on it as much as on its notebook."
    h = hashlib.sha256()
    for path in sorted((ROOT / "tinylab").rglob("*.py")):
        h.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def execute(entry: str, scale: str, seed: int, out_dir: Path, manifest: dict, pkg: str) -> bool:
    "Execute one notebook with Papermill into `out_dir` unless an up-to-date copy is there; True if it ran."
    src = ROOT / f"{entry}.ipynb"
    dst, results = out_dir / f"{entry}.ipynb", out_dir / "results" / f"{Path(entry).name}.json"
    params = {"scale": scale, "seed": seed, "results_path": str(results)}
    key = hashlib.sha256(src.read_bytes() + json.dumps(params, sort_keys=True).encode() + pkg.encode()).hexdigest()
    if manifest.get(entry) == key and dst.exists() and results.exists():
        print(f"  {entry}: up to date")
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    papermill.execute_notebook(str(src), str(dst), parameters=params, cwd=str(src.parent), progress_bar=False,
                               kernel_name="python3")
    manifest[entry] = key
    print(f"  {entry}: executed in {time.perf_counter() - t0:.0f} s")
    return True


# warnings that say nothing to a reader of the static page (no widgets there, by design)
NOISE = ("TqdmWarning: IProgress not found", "from .autonotebook import tqdm as notebook_tqdm")


def final_stream_state(outputs: list) -> list:
    """Merge consecutive stream outputs and keep what a terminal would show: progress bars (tqdm) redraw
    a line with carriage returns, and only the last drawing of each line is worth reading."""
    merged = []
    for out in outputs:
        if out.output_type == "stream" and merged and merged[-1].output_type == "stream" and merged[-1].name == out.name:
            merged[-1].text += out.text
        else:
            merged.append(out)
    for out in merged:
        if out.output_type == "stream":
            lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in out.text.split("\n")]
            out.text = "\n".join(line for line in lines if not any(n in line for n in NOISE))
    return [out for out in merged if out.output_type != "stream" or out.text.strip()]


def display_math_as_blocks(markdown: str) -> str:
    """Give every `$$` display-math block its own paragraph. Jupyter renders `$$...$$` inside a paragraph;
    MyST (Jupyter Book) reads it there as inline math and garbles it."""
    lines, out, i = markdown.split("\n"), [], 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("$$"):
            out.append(lines[i]); i += 1
            continue
        j = i
        if lines[i].count("$$") < 2:  # a block over several lines: find its closing $$
            j = i + 1
            while j < len(lines) and "$$" not in lines[j]:
                j += 1
        if out and out[-1].strip():
            out.append("")
        out.extend(lines[i:j + 1])
        if j + 1 < len(lines) and lines[j + 1].strip():
            out.append("")
        i = j + 1
    return "\n".join(out)


# A measured number in prose: a decimal (95.7, 0.674), or an integer with a unit of time, a percentage or a
# ratio ("8 minutes", "40%", "3x"). Math, inline code, links and arXiv ids are not prose.
NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+|\d+(?=\s?(?:%|x\b|×|ms\b|s\b|seconds?\b|minutes?\b|min\b|hours?\b)))")
NOT_PROSE = re.compile(r"\$\$.*?\$\$|\$[^$\n]+\$|`[^`\n]*`|\]\([^)]*\)|https?://\S+|arXiv[: ]\s*\d{4}\.\d{4,5}(v\d+)?"
                       r"|\{cite[^}]*\}`[^`]*`", re.S)


def numbers_not_from_the_run(nb) -> list[str]:
    """Numbers in a notebook's Markdown that neither its code nor its outputs contain: prose that states a
    measurement from an earlier run instead of rendering it from this one (render such sentences in code,
    e.g. `Markdown(f"...")`; a paper's figure belongs in the code that quotes it, such as its claim table)."""
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    outputs = "\n".join(json.dumps(c.get("outputs", [])) for c in nb.cells if c.cell_type == "code")
    produced = set(re.findall(r"(?<![\d.])\d+(?:\.\d+)?", code + outputs))
    found = []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for number in NUMBER.findall(NOT_PROSE.sub(" ", cell.source)):
            if number not in produced and number not in found:
                found.append(number)
    return found


def for_reading(nb_path: Path) -> None:
    """Prepare the rendered copy: strip nbdev's directives (`#| hide` cells go, other `#|` lines are
    dropped), reduce progress bars to their final state, and set display math apart for MyST."""
    nb = nbformat.read(nb_path, as_version=4)
    cells = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            lines = cell.source.splitlines()
            if any(line.strip() in ("#| hide", "#|hide") for line in lines) or \
               any(line.startswith("#| default_exp") for line in lines) and len(lines) == 1:
                continue
            cell.source = "\n".join(line for line in lines if not line.startswith("#|"))
            cell.outputs = final_stream_state(cell.outputs)
        elif cell.cell_type == "markdown":
            cell.source = display_math_as_blocks(cell.source)
        cells.append(cell)
    nb.cells = cells
    nbformat.write(nb, nb_path)


def stage(entries: list[str], out_dir: Path, stage_dir: Path) -> None:
    "Lay out a Jupyter Book source folder: config, toc, bibliography and the executed notebooks."
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    for name in ("_config.yml", "references.bib"):
        shutil.copy(BOOK / name, stage_dir / name)
    shutil.copytree(BOOK / "bib", stage_dir / "bib")
    shutil.copy(ROOT / "_toc.yml", stage_dir / "_toc.yml")
    for entry in entries:
        dst = stage_dir / f"{entry}.ipynb"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out_dir / f"{entry}.ipynb", dst)
        for_reading(dst)


def check_html(entries: list[str], html: Path) -> None:
    "Fail unless every page of the toc was rendered."
    missing = [e for e in entries if not (html / f"{e}.html").exists()]
    if missing:
        sys.exit(f"book: pages missing from {html}: {missing}")
    print(f"book: all {len(entries)} pages of _toc.yml are in {html.relative_to(ROOT)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="book", choices=["ci", "book", "gpu"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    entries = toc_entries()
    out_dir = BUILD / "executed" / args.scale
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    pkg = package_hash()
    print(f"executing {len(entries)} notebooks at scale={args.scale!r}")
    t0 = time.perf_counter()
    # the root page sums up the chapters, so it runs last
    for entry in entries[1:] + entries[:1]:
        execute(entry, args.scale, args.seed, out_dir, manifest, pkg)
        manifest_path.write_text(json.dumps(manifest, indent=1))
    print(f"notebooks done in {time.perf_counter() - t0:.0f} s")

    stage_dir = BUILD / "source"
    stage(entries, out_dir, stage_dir)
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    subprocess.run([str(jupyter_book), "build", str(stage_dir), "--path-output", str(BOOK), "--builder", "html"],
                   check=True)
    check_html(entries, BUILD / "html")


if __name__ == "__main__":
    main()
