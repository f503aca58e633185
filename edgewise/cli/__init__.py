"""The ``edgewise`` command line: one module per command group (app.py wires them).

Nothing is imported here eagerly, so that ``edgewise.cli.connect`` and the other helpers can be
used without loading every command.
"""

from __future__ import annotations


def main() -> None:
    """Entry point of the ``edgewise`` console script."""
    from edgewise.cli.app import main as run

    run()
