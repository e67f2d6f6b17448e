"""The tree is clean under ruff, lint and format (pyproject.toml's [tool.ruff]), as pre-commit keeps it."""

import importlib.util
import subprocess
import sys

import pytest

from tests.support import ROOT


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[dev]')")
def test_ruff_check_is_clean():
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, (
        f"ruff check found problems (ruff check --fix . repairs the import order):\n{res.stdout}{res.stderr}"
    )


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[dev]')")
def test_ruff_format_is_clean():
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, f"files ruff format would change (ruff format . rewrites them):\n{res.stdout}{res.stderr}"
