"""Every command answers -h and --help, every option and argument says what it is for, and
``edgewise --version`` prints the installed version."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from edgewise.cli.app import app


def _commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, command)]
    if hasattr(command, "list_commands"):
        ctx = typer.Context(command)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, name
            found += _commands(sub, (*path, name))
    return found


COMMANDS = _commands(typer.main.get_command(app))
IDS = [" ".join(p) or "edgewise" for p, _ in COMMANDS]


def test_the_walk_reaches_the_nested_commands() -> None:
    paths = {" ".join(p) for p, _ in COMMANDS}
    assert {"node", "worker export", "sensor simulate", "model publish", "cmd send"} <= paths
    assert len(paths) > 20


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_every_option_and_argument_has_help(path: tuple[str, ...], command: Any) -> None:
    missing = [
        p.name
        for p in command.params
        if not getattr(p, "hidden", False) and not (getattr(p, "help", None) or "").strip()
    ]
    assert not missing, f"edgewise {' '.join(path)}: no help for {missing}"


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=IDS)
def test_every_command_answers_dash_h(path: tuple[str, ...]) -> None:
    out = CliRunner().invoke(app, [*path, "-h"], env={"COLUMNS": "120"})
    assert out.exit_code == 0, out.output
    assert "Usage" in out.output
    assert "--help" in out.output and "-h" in out.output


def test_version_prints_the_installed_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"edgewise {version('edgewise')}"
