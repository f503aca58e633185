"""edgewise/cli/logs.py: one line per record, control characters from the wire escaped, the
format from the flag, the environment or the terminal."""

from __future__ import annotations

import io
import json
import logging

import pytest

from edgewise.cli import logs

HOSTILE = "sensors/cam\n2026-01-01T00:00:00.000Z ERROR forged: \x1b[31mred\x1b[0m\r\u2028\x85\x00"


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("edge_node.node", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_escape_leaves_no_control_character() -> None:
    out = logs.escape(HOSTILE)
    assert "\n" not in out and "\r" not in out and "\x1b" not in out and "\x00" not in out
    assert "\u2028" not in out and "\x85" not in out
    assert out.startswith("sensors/cam\\n2026") and "\\x1b[31mred" in out and "\\u2028" in out
    assert logs.escape("plain ünïcode / path") == "plain ünïcode / path"


def test_text_record_is_one_line_with_iso_utc_time_and_extras() -> None:
    record = _record("rejected a frame on %s: %s", HOSTILE, "bad_shape", topic=HOSTILE, n=3)
    record.created = 1796657189.123456  # 2026-12-07T15:26:29.123Z
    line = logs.TextFormatter().format(record)
    assert "\n" not in line and "\x1b" not in line
    assert line.startswith("2026-12-07T15:26:29.123Z WARNING edge_node.node: rejected a frame on ")
    assert " n=3" in line and " topic=sensors/cam\\n" in line


def test_a_traceback_stays_in_its_record() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), exc_info=__import__("sys").exc_info()
        )
    text = logs.TextFormatter().format(record)
    assert "\n" not in text and "Traceback" in text and "ValueError: bad\\nthing" in text
    doc = json.loads(logs.JsonFormatter("node", "gw-1").format(record))
    assert "ValueError" in doc["exc"]


def test_json_record_names_service_and_id_and_keeps_the_bytes_escaped() -> None:
    record = _record("from %s", HOSTILE, topic=HOSTILE, payload=b"\xff\x00ab")
    line = logs.JsonFormatter("node", "gw-1").format(record)
    assert "\n" not in line and "\x1b" not in line and "\u2028" not in line and "\x85" not in line
    doc = json.loads(line)
    assert doc["service"] == "node" and doc["service_id"] == "gw-1"
    assert doc["logger"] == "edge_node.node" and doc["level"] == "WARNING"
    assert doc["message"] == f"from {HOSTILE}"  # escaped on the line, exact once parsed
    assert doc["event"] == "from %s"
    assert doc["topic"] == HOSTILE
    assert doc["payload"] == "\\xff\\x00ab"
    assert doc["ts"].endswith("Z") and "T" in doc["ts"]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_format_comes_from_the_flag_then_the_environment_then_the_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(logs.ENV, raising=False)
    assert logs.resolve(None, io.StringIO()) == "text"
    assert logs.resolve(None, _Tty()) == "rich"
    monkeypatch.setenv(logs.ENV, "JSON")
    assert logs.resolve(None, _Tty()) == "json"
    assert logs.resolve("text", _Tty()) == "text"
    with pytest.raises(ValueError, match="EDGEWISE_LOG_FORMAT"):
        logs.resolve("xml", io.StringIO())


def test_rich_in_a_terminal_escapes_the_message_too() -> None:
    out = _Tty()
    handler = logs.handler("rich", service="node", stream=out)
    handler.handle(_record("from %s", HOSTILE))
    text = out.getvalue()  # rich's own colours are there; the record's escape sequences not
    assert "\x1b[31mred" not in text and "\x1b[0m\r" not in text
    assert "\\x1b" in text and "31mred" in text
