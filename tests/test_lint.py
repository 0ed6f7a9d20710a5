"""The tree passes `ruff check` with the project's config ([tool.ruff] in pyproject.toml).

ruff comes with the `test` extra (pinned in constraints.txt), so `make test` lints; the test skips
only where ruff is not installed at all.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("perl_core", "pipeline", "tests")


def _ruff() -> list[str] | None:
    """The command that runs ruff: this interpreter's module, else the script beside it."""
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent))
    return [exe] if exe else None


def test_ruff_check_passes():
    cmd = _ruff()
    if cmd is None:
        pytest.skip("ruff is not installed (pip install -c constraints.txt -e '.[test]')")
    config = ROOT / "pyproject.toml"
    proc = subprocess.run(
        [*cmd, "check", "--config", str(config), "--no-cache", "--output-format", "concise",
         *PATHS],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 0, (
        f"`ruff check {' '.join(PATHS)}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
