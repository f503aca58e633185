"""Commands' help as paragraphs: a docstring's line breaks inside a paragraph are not kept.

Typer's rich help keeps every line break of a docstring after its first paragraph, so help
wrapped at the source's 99 columns came out ragged at the terminal's width (`demo --help`).
:func:`reflow` gives each command its docstring with the paragraphs joined; a paragraph whose
lines are indented, or are list items, keeps its breaks.
"""

from __future__ import annotations

import inspect

import typer


def paragraphs(doc: str) -> str:
    """``doc`` (cleaned) with single line breaks inside ordinary paragraphs made spaces."""
    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = para.split("\n")
        keep = any(line.startswith((" ", "-", "*", "\b")) for line in lines)
        out.append(para if keep else " ".join(line.strip() for line in lines))
    return "\n\n".join(out)


def reflow(app: typer.Typer) -> None:
    """Set the help of every command and group under ``app`` that takes it from a docstring."""
    for command in app.registered_commands:
        if command.help is None and command.callback is not None and command.callback.__doc__:
            command.help = paragraphs(command.callback.__doc__)
    info = app.registered_callback
    doc = info.callback.__doc__ if info is not None and info.callback is not None else None
    if info is not None and doc and info.help is None:
        info.help = paragraphs(doc)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            reflow(group.typer_instance)
