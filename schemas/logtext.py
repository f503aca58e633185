"""Text from the wire, made safe for a log line: one helper for every service.

An attacker controls topics, payloads and the details of decoding errors built from them; a
raw control character in a log line can forge lines (``\\n``), rewrite a terminal (``\\x1b[``),
or hide text (``\\r``, bidirectional overrides). :func:`log_text` escapes as ``repr`` does
(``\\n``, ``\\x1b``, ``\\u202e``; a backslash as ``\\\\`` so an escape cannot be faked),
shows bytes that are not UTF-8 as ``\\xNN``, and cuts the text to a length.
"""

from __future__ import annotations

from typing import Final

_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def log_text(value: str | bytes | bytearray | memoryview, limit: int = 200) -> str:
    """``value`` with every character that is not printable (controls, format characters such
    as bidirectional overrides, line and paragraph separators, lone surrogates) and every
    backslash escaped, bytes that are not UTF-8 as ``\\xNN``; at most ``limit`` characters of
    it (then ``…``)."""
    if isinstance(value, str):
        text = value
    else:
        text = bytes(value[: limit * 4 + 4]).decode("utf-8", "surrogateescape")
    cut = len(text) > limit or len(value) > limit * 4 + 4
    shown = "".join(
        ch if ch == " " or (ch.isprintable() and ch != "\\") else _escape(ch) for ch in text[:limit]
    )
    return shown + "…" if cut else shown
