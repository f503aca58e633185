"""Run the ``edgewise`` command line from a test: in-process (typer's runner) or as a process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from edgewise.cli.app import app

__all__ = ["edgewise", "init_keys", "run"]

_runner = CliRunner()


def run(*args: str, code: int = 0) -> str:
    """``edgewise *args`` in-process (200 columns); asserts its exit code, returns its output."""
    result = _runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == code, result.output
    return result.output


def init_keys(out: Path) -> Path:
    """A fresh operator key directory made by ``edgewise keys init`` at ``out``."""
    run("keys", "init", "--out-dir", str(out))
    return out


def edgewise(
    *args: str, timeout_s: float = 60, columns: int = 200
) -> subprocess.CompletedProcess[str]:
    """``python -m edgewise.cli.app *args`` as a process, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={"COLUMNS": str(columns), "PATH": "/usr/bin:/bin"},
    )
