"""Write docs/cli.md, the command-line reference: every ``edgewise`` command's real ``--help``.

Run it after changing a command, an option or a help text::

    .venv/bin/python scripts/cli_reference.py          # rewrite docs/cli.md
    .venv/bin/python scripts/cli_reference.py --check  # exit 1 if docs/cli.md is stale

The help is rendered at a fixed width (COLUMNS=100) without colour, so the text depends on the
code alone; tests/test_cli_reference.py fails when the committed file differs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

WIDTH = 100
REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "docs" / "cli.md"

# Before typer and rich are imported: they read the terminal's settings once.
os.environ["COLUMNS"] = str(WIDTH)
os.environ["TERM"] = "dumb"
os.environ["NO_COLOR"] = "1"
for _name in ("TERMINAL_WIDTH", "FORCE_COLOR", "_TYPER_FORCE_DISABLE_TERMINAL", "LINES"):
    os.environ.pop(_name, None)
sys.path.insert(0, str(REPO))

import typer  # noqa: E402
import typer.main  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from edgewise.cli.app import app  # noqa: E402

HEADER = f"""# Command-line reference

<!-- Written by scripts/cli_reference.py from every command's real `--help` (COLUMNS={WIDTH}).
Do not edit by hand: change the command, then run `.venv/bin/python scripts/cli_reference.py`;
tests/test_cli_reference.py fails while this file is stale. -->

Every command takes `-h`/`--help`; `edgewise --version` prints the version. How a command finds
its broker (flags, `EDGEWISE_BROKER`, a service's `[mqtt]`) and its log formats:
[configuration.md](configuration.md#command-line).
"""


def command_paths(command: Any = None, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command's words after ``edgewise``, the root first, in the order --help lists."""
    command = command or typer.main.get_command(app)
    paths = [path]
    if hasattr(command, "list_commands"):
        ctx = typer.Context(command, info_name=path[-1] if path else "edgewise")
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                paths += command_paths(sub, (*path, name))
    return paths


def help_text(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(
        app, [*path, "--help"], prog_name="edgewise", env={"COLUMNS": str(WIDTH)}
    )
    if result.exit_code != 0:
        raise RuntimeError(f"edgewise {' '.join(path)} --help exited {result.exit_code}")
    lines = [line.rstrip() for line in result.output.splitlines()]
    return "\n".join(lines).strip("\n")


def render() -> str:
    parts = [HEADER]
    for path in command_paths():
        title = " ".join(("edgewise", *path))
        parts.append(f"## `{title}`\n\n```text\n{help_text(path)}\n```\n")
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(
                f"{TARGET.relative_to(REPO)} is stale: run .venv/bin/python"
                " scripts/cli_reference.py",
                file=sys.stderr,
            )
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(REPO)} ({len(command_paths())} commands)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
