"""The linters are tests: mypy strict, ruff, and the layer contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("cmd", [
    (str(BIN / "mypy"), "vmdriver", "tests", "bench"),
    (str(BIN / "ruff"), "check", "vmdriver", "tests", "bench"),
    (str(BIN / "lint-imports"),),
], ids=["mypy", "ruff", "import-linter"])
def test_linter(cmd: tuple[str, ...]) -> None:
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
