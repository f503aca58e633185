"""``edgewise model``: publish, promote, roll back, watch and clean up signed model releases.

The command group's wiring: ``publish`` is :mod:`edgewise.cli.model_publish`; ``promote``,
``rollback``, ``status`` and ``gc`` are :mod:`edgewise.cli.model_fleet`; what they share (options,
publish history, signed payloads) is :mod:`edgewise.cli.model_releases`.
"""

from __future__ import annotations

import typer

from edgewise.cli.model_fleet import gc, promote, rollback, status
from edgewise.cli.model_publish import publish

model_app = typer.Typer(
    help="Signed model releases: publish, promote, rollback, status, gc; "
    "quantize and check a model before publishing it.",
    no_args_is_help=True,
)
model_app.command("publish")(publish)
model_app.command("promote")(promote)
model_app.command("rollback")(rollback)
model_app.command("status")(status)
model_app.command("gc")(gc)
