"""One log set-up for every service and command: readable in a terminal, one line per record
everywhere else.

Three formats (``--log-format`` where a command has it, else ``EDGEWISE_LOG_FORMAT``, else
``auto``):

``auto``
    ``rich`` when stderr is a terminal, ``text`` otherwise (systemd, docker, a file).
``rich``
    coloured, aligned, wrapped to the terminal's width (for people).
``text``
    one line per record, never wrapped: ``2026-12-07T15:26:29.123Z INFO edge_node.node: message``
    (ISO 8601 UTC, milliseconds), then the record's extra fields as ``key=value``.
``json``
    one JSON object per line: ``ts``, ``level``, ``service`` (node, worker, bridge, or the
    command), ``service_id`` (the node, worker or bridge id), ``logger``, ``message``, ``event``
    (the message before its arguments were filled in: one value per kind of record) and the
    extra fields; a traceback is ``exc``.

Whatever came from the wire (a topic, a client id, a payload's field) may hold control
characters: every format escapes them (``\\n``, ``\\x1b``, ``\\u2028``), so no record is split over
lines and no terminal is sent escape sequences. A traceback stays one record: in ``text`` its
line breaks are escaped too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TextIO

import typer

LogFormat = Literal["auto", "rich", "text", "json"]
FORMATS: tuple[LogFormat, ...] = ("auto", "rich", "text", "json")
ENV = "EDGEWISE_LOG_FORMAT"

LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        envvar=ENV,
        help="auto (rich in a terminal, else text), rich, text (one line per record, ISO 8601"
        " UTC times) or json (one object per line).",
        show_default="auto",
    ),
]

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# What every LogRecord has: the rest of its __dict__ are extra fields (logging's ``extra=``).
_STANDARD = frozenset(
    set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
)


def escape(text: str) -> str:
    """``text`` with every control character (and U+2028, U+2029) written as an escape."""

    def one(m: re.Match[str]) -> str:
        ch = m.group()
        named = _NAMED.get(ch)
        if named is not None:
            return named
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROL.sub(one, text)


def _iso(created: float) -> str:
    stamp = datetime.fromtimestamp(created, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return escape(value.decode("utf-8", "backslashreplace"))
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class TextFormatter(logging.Formatter):
    """``ISO-TIME LEVEL LOGGER: MESSAGE key=value …``, always one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        parts = [_iso(record.created), record.levelname, f"{record.name}:", escape(message)]
        for key, value in _extras(record).items():
            parts.append(f"{key}={escape(str(_plain(value)))}")
        if record.exc_info:
            parts.append(escape(self.formatException(record.exc_info)))
        elif record.stack_info:
            parts.append(escape(self.formatStack(record.stack_info)))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the service and its id."""

    def __init__(self, service: str, service_id: str | None) -> None:
        super().__init__()
        self.service = service
        self.service_id = service_id

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "service": self.service,
            "service_id": self.service_id,
            "logger": record.name,
            "message": record.getMessage(),
            "event": str(record.msg),
        }
        for key, value in _extras(record).items():
            doc.setdefault(key, _plain(value))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        # json escapes C0 controls; DEL, C1 and U+2028/9 are escaped here (a terminal or a
        # line splitter may act on them).
        line = json.dumps(doc, ensure_ascii=False, default=str)
        return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


class _EscapedMessage(logging.Formatter):
    """The rich handler's message: the record's, with control characters escaped."""

    def format(self, record: logging.LogRecord) -> str:
        text = escape(record.getMessage())
        extras = _extras(record)
        if extras:
            text += " " + " ".join(f"{k}={escape(str(_plain(v)))}" for k, v in extras.items())
        return text


def resolve(fmt: str | None, stream: TextIO) -> LogFormat:
    """The format to use: ``fmt`` (a flag), else ``EDGEWISE_LOG_FORMAT``, else ``auto``; ``auto``
    becomes ``rich`` on a terminal and ``text`` elsewhere. ``ValueError`` names a bad value."""
    chosen = (fmt or os.environ.get(ENV) or "auto").strip().lower()
    if chosen not in FORMATS:
        raise ValueError(
            f"log format {chosen!r} is not one of {', '.join(FORMATS)} (--log-format or {ENV})"
        )
    if chosen == "auto":
        return "rich" if stream.isatty() else "text"
    return chosen


def handler(
    fmt: str | None = None,
    *,
    service: str,
    service_id: str | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """A handler writing to ``stream`` (stderr) in the format :func:`resolve` picks."""
    out = stream if stream is not None else sys.stderr
    kind = resolve(fmt, out)
    if kind == "rich":
        from rich.console import Console
        from rich.logging import RichHandler

        rich = RichHandler(
            console=Console(file=stream) if stream is not None else Console(stderr=True),
            show_path=False,
            rich_tracebacks=False,
            log_time_format="%H:%M:%S",
            markup=False,
        )
        rich.setFormatter(_EscapedMessage())
        return rich
    plain: logging.Handler = logging.StreamHandler(out) if stream is not None else _Stderr()
    plain.setFormatter(TextFormatter() if kind == "text" else JsonFormatter(service, service_id))
    return plain


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes, not what it was at set-up (a
    command run in-process, as the tests' CliRunner does, swaps and closes it between runs)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # always sys.stderr


def setup(
    level: str | int,
    fmt: str | None = None,
    *,
    service: str,
    service_id: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Send every logger's records at ``level`` and above to one handler on stderr (the root
    logger's; handlers set up before are replaced)."""
    logging.basicConfig(
        level=level,
        handlers=[handler(fmt, service=service, service_id=service_id, stream=stream)],
        force=True,
    )


def check_format(fmt: str | None) -> None:
    """Exit 2 with one line if ``fmt`` (or ``EDGEWISE_LOG_FORMAT``) is not a format."""
    try:
        resolve(fmt, sys.stderr)
    except ValueError as exc:
        from edgewise.cli.connect import fail

        fail(str(exc))
