"""`pip install tinylab` as a user takes it: the wheel and sdist build, and the wheel, installed on its own
(no editable install, no repository on the path), imports every module."""
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    "The sdist and wheel, built from a copy of the project (a build writes build/ and *.egg-info beside its sources)."
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("setup.py", "pyproject.toml", "settings.ini", "README.md", "LICENSE", "MANIFEST.in", "constraints.txt"):
        shutil.copy(ROOT / name, src / name)
    for name in ("nbs", "tinylab"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(src)],
                   check=True, capture_output=True)
    return next(out.glob("*.whl")), next(out.glob("*.tar.gz"))


def test_sdist_carries_license_readme_and_notebooks(dists):
    names = tarfile.open(dists[1]).getnames()
    for wanted in ("LICENSE", "README.md", "settings.ini", "nbs/00_core.ipynb"):
        assert any(n.endswith("/" + wanted) for n in names), f"sdist lacks {wanted}"


def test_wheel_installs_alone_and_imports_every_module(dists, tmp_path):
    wheel = dists[0]
    modules = sorted(n[:-3].replace("/", ".") for n in zipfile.ZipFile(wheel).namelist()
                     if n.startswith("tinylab/") and n.endswith(".py") and not n.endswith("__init__.py"))
    assert "tinylab.core" in modules and "tinylab.kernels.selective_scan" in modules
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    code = ("import importlib, tinylab; assert tinylab.__file__.startswith(%r), tinylab.__file__; "
            "[importlib.import_module(m) for m in %r]; print(tinylab.__version__)") % (str(site), modules)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
