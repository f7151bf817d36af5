"""What users install is the built wheel: every source folder of progfl must be a package setuptools finds."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
APP_FOLDERS = {"progfl/flower_app"}  # a Flower app folder, shipped as package data (setup.cfg), not imported


def test_every_source_folder_is_a_package():
    found = set(find_packages(str(ROOT), include=["progfl", "progfl.*"]))
    folders = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "progfl").rglob("*.py")}
    missing = sorted(f for f in folders - APP_FOLDERS if f.replace("/", ".") not in found)
    assert not missing, f"no __init__.py, so a built wheel leaves them out: {missing}"


def test_device_runtime_never_imports_torch():
    """The torch backends live in progfl/device_torch; the device runtime folder stays torch-free (it is what an ORT
    device imports)."""
    import re

    pattern = re.compile(r"^\s*(import torch|from torch\b)", re.M)
    offenders = [p.name for p in (ROOT / "progfl" / "device_runtime").glob("*.py") if pattern.search(p.read_text())]
    assert not offenders, f"device_runtime imports torch in {offenders}: put torch code in progfl/device_torch"
