"""Build the tinylab book: execute every notebook in _toc.yml with Papermill, then render with Jupyter Book.

    python book/build.py --scale book      # the book (minutes per chapter on a CPU): book/_build/html
    python book/build.py --scale ci        # the same pipeline, small and fast (CI): book/_build/ci/html

Executed copies go to book/_build/executed/<scale>/ with each chapter's results JSON beside them. A
notebook is executed again only when its own source, its parameters, the tinylab modules it imports
(and theirs, transitively) or the recorded results in book/results/ changed: a manifest of hashes
records what each copy was made from. The tests execute the notebooks at `ci` scale through the same
function into the same folder, so the `ci` book build after them reuses their copies. The landing page
(the toc's root) runs last, so it can sum up the chapters' results. Each scale's HTML has its own folder
(the `book` scale's is the one the README names), MathJax is served from the build (no network needed to
read the math), and the build fails unless every page of the toc is in the HTML.
"""
from __future__ import annotations

import argparse
import ast
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


def html_dir(scale: str) -> Path:
    "Where a scale's HTML goes: the book's own at book/_build/html, any other scale's beside it."
    return BUILD / "html" if scale == "book" else BUILD / scale / "html"


def module_file(name: str) -> Path | None:
    "The source file of module `tinylab.<name>` (a dotted name), if there is one."
    base = ROOT / "tinylab" / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def imported_modules(source: str, package: str = "") -> set[str]:
    """The tinylab modules (dotted names under tinylab) that `source` imports, directly. `package` is the
    importing module's package, for relative imports inside tinylab."""
    found = set()
    for m in re.finditer(r"^[ \t]*from[ \t]+(\.+|tinylab\.?)([\w.]*)[ \t]+import[ \t]+\(?([\w, \t]+)"
                         r"|^[ \t]*import[ \t]+tinylab\.([\w.]+)", source, re.M):
        if m.group(4):
            found.add(m.group(4))
            continue
        dots, rest, names = m.group(1), m.group(2), m.group(3)
        if dots.startswith("."):  # relative: from .core / from ..core / from .kernels.cema
            parts = package.split(".") if package else []
            parts = parts[:len(parts) - (len(dots) - 1)] if len(dots) > 1 else parts
            base = ".".join(p for p in parts + [rest] if p)
        else:
            base = rest
        candidates = [base] if base else []
        candidates += [f"{base}.{n.strip()}" if base else n.strip() for n in names.split(",") if n.strip()]
        found.update(c for c in candidates if c and module_file(c))
    return {f for f in found if module_file(f)}


def dependency_hash(source: str) -> str:
    """A hash of what an executed copy depends on besides its notebook: the tinylab modules the notebook
    imports, the modules those import (transitively), and the recorded results in book/results/."""
    todo, seen = list(imported_modules(source)), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo.extend(imported_modules(path.read_text(), package))
    h = hashlib.sha256()
    for path in sorted({module_file(n) for n in seen} | set((BOOK / "results").glob("*.json"))):
        h.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def execute(entry: str, scale: str, seed: int, out_dir: Path, manifest: dict) -> float | None:
    """Execute one notebook with Papermill into `out_dir` unless an up-to-date copy is there. Returns the
    seconds it took, or None when the copy was up to date."""
    src = ROOT / f"{entry}.ipynb"
    dst, results = out_dir / f"{entry}.ipynb", out_dir / "results" / f"{Path(entry).name}.json"
    params = {"scale": scale, "seed": seed, "results_path": str(results)}
    text = src.read_text()
    code = "\n".join(c.source for c in nbformat.reads(text, as_version=4).cells if c.cell_type == "code")
    key = hashlib.sha256(text.encode() + json.dumps(params, sort_keys=True).encode()
                         + dependency_hash(code).encode()).hexdigest()
    if manifest.get(entry) == key and dst.exists() and results.exists():
        return None
    dst.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    papermill.execute_notebook(str(src), str(dst), parameters=params, cwd=str(src.parent), progress_bar=False,
                               kernel_name="python3", log_output=False,
                               extra_arguments=["--IPKernelApp.log_level=CRITICAL"])  # no "TCP without encryption" line
    manifest[entry] = key
    return time.perf_counter() - t0


def executed_dir(scale: str) -> Path:
    "Where a scale's executed copies, their results JSON and their manifest go."
    return BUILD / "executed" / scale


def execute_entry(entry: str, scale: str, seed: int = 0) -> float | None:
    "Execute one toc entry at `scale` into its scale's folder, recording it in the manifest there."
    out_dir = executed_dir(scale)
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    seconds = execute(entry, scale, seed, out_dir, manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return seconds


def execution_order(entries: list[str]) -> list[str]:
    "The chapters first, the root page last: it sums up the chapters' results."
    return entries[1:] + entries[:1]


def execute_all(entries: list[str], scale: str, seed: int = 0) -> dict[str, float | None]:
    "Execute the toc's notebooks at `scale`; returns each entry's seconds (None: up to date)."
    times = {}
    for entry in execution_order(entries):
        times[entry] = execute_entry(entry, scale, seed)
        print(f"  {entry}: " + ("up to date" if times[entry] is None else f"executed in {times[entry]:.0f} s"), flush=True)
    return times


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


SETUP_CALLS = ("os.environ", "torch.set_num_threads", "warnings.filterwarnings", "warnings.simplefilter")


def _is_setup_statement(node: ast.stmt) -> bool:
    "An import, a setting of the environment (os.environ, threads, warnings), or an `if` holding only those."
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return True
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        return ast.unparse(node.value.func).startswith(SETUP_CALLS)
    if isinstance(node, ast.Assign):
        return all(ast.unparse(t).startswith("os.environ") for t in node.targets)
    if isinstance(node, ast.If):
        return all(_is_setup_statement(n) for n in node.body + node.orelse)
    return False


def is_setup(source: str) -> bool:
    "A code cell of imports and environment settings only (nbdev directives and comments aside)."
    try:
        body = ast.parse("\n".join(line for line in source.splitlines() if not line.startswith("#|"))).body
    except SyntaxError:
        return False
    return bool(body) and all(_is_setup_statement(n) for n in body)


def for_reading(nb_path: Path) -> None:
    """Prepare the rendered copy: strip nbdev's directives (`#| hide` cells go, other `#|` lines are
    dropped), fold the input of import/environment cells (`hide-input`), show the parameters the page was built with (Papermill's injected cell, without the builder's
    absolute paths) in place of the defaults, reduce progress bars to their final state, and set display
    math apart for MyST."""
    nb = nbformat.read(nb_path, as_version=4)
    cells = []
    injected = any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if injected and "parameters" in tags:
            continue  # Papermill's injected cell below holds the values this page was built with
        if "injected-parameters" in tags:
            cell.source = "# the parameters this page was built with\n" + re.sub(
                r'results_path = "[^"]*[\\/]([^"\\/]+)"', r'results_path = "results/\1"', cell.source)
        if cell.cell_type == "code" and is_setup(cell.source) and "hide-input" not in tags:
            cell.metadata["tags"] = tags + ["hide-input"]  # imports and environment: folded, one click away
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


def mathjax_dir() -> Path:
    "MathJax 3's browser build, from the PyPI package django-static-mathjax (a dev dependency), served with the book."
    import mathjax  # the package's import name; it holds only the static files
    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def stage(entries: list[str], out_dir: Path, stage_dir: Path) -> None:
    "Lay out a Jupyter Book source folder: config, toc, bibliography and the executed notebooks."
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    for name in ("_config.yml", "references.bib", "tinylab_sphinx.py", "favicon.svg"):
        shutil.copy(BOOK / name, stage_dir / name)
    shutil.copytree(BOOK / "bib", stage_dir / "bib")
    shutil.copy(ROOT / "_toc.yml", stage_dir / "_toc.yml")
    # not under _static/, which Jupyter Book would scan and load every .js file of into every page
    shutil.copytree(mathjax_dir(), stage_dir / "mathjax_static" / "mathjax")
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


def summary(times: dict[str, float | None]) -> str:
    "One line per notebook: executed in how long, or up to date; and the total."
    width = max(map(len, times))
    lines = [f"  {e:<{width}}  " + ("up to date" if t is None else f"{t:6.0f} s") for e, t in times.items()]
    total = sum(t for t in times.values() if t is not None)
    ran = sum(t is not None for t in times.values())
    return "\n".join(["notebooks:"] + lines + [f"  {ran} executed, {len(times) - ran} up to date, {total:.0f} s"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="book", choices=["ci", "book", "gpu"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    entries = toc_entries()
    print(f"executing {len(entries)} notebooks at scale={args.scale!r}", flush=True)
    t0 = time.perf_counter()
    times = execute_all(entries, args.scale, args.seed)

    stage_dir = BUILD / "source" / args.scale
    stage(entries, executed_dir(args.scale), stage_dir)
    html = html_dir(args.scale)
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    subprocess.run([str(jupyter_book), "build", str(stage_dir), "--path-output", str(stage_dir), "--builder", "html",
                    "--quiet"], check=True)
    if html.exists():
        shutil.rmtree(html)
    html.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(stage_dir / "_build" / "html", html)
    check_html(entries, html)
    print(summary(times))
    print(f"book built in {time.perf_counter() - t0:.0f} s: {(html / 'index.html').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
