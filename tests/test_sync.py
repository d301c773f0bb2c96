"""The package is generated from the notebooks, and the notebooks are committed clean (CI checks both)."""
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def copy_project(tmp_path: Path) -> Path:
    for name in ("settings.ini", "nbs", "tinylab"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    return tmp_path


def changed(a: Path, b: Path) -> list[str]:
    "Files that differ, or exist on one side only, between two folder trees."
    cmp, out = filecmp.dircmp(a, b, ignore=["__pycache__"]), []
    def walk(c, prefix=""):
        out.extend(prefix + f for f in c.diff_files + c.left_only + c.right_only)
        for name, sub in c.subdirs.items():
            walk(sub, f"{prefix}{name}/")
    walk(cmp)
    return out


def test_nbdev_export_leaves_package_unchanged(tmp_path):
    work = copy_project(tmp_path)
    subprocess.run([BIN / "nbdev_export"], cwd=work, check=True, capture_output=True)
    assert not changed(ROOT / "tinylab", work / "tinylab"), "tinylab/ is out of sync with nbs/: run nbdev_export"


def test_notebooks_are_clean(tmp_path):
    work = copy_project(tmp_path)
    subprocess.run([BIN / "nbdev_clean"], cwd=work, check=True, capture_output=True)
    assert not changed(ROOT / "nbs", work / "nbs"), "notebooks are not clean: run nbdev_clean"
