"""Structural pre-scan of untrusted JSON, run before msgspec sees the bytes.

msgspec parses JSON containers recursively (also the ones it skips), so ``[[[[…`` 100,000
deep would recurse until Python's recursion limit. This scan measures the nesting depth and
an upper bound on the number of values without recursing and without building objects:

1. the payload must be UTF-8 (JSON text is; msgspec checks only the strings it keeps);
2. fast path: if the payload holds at most ``max_depth`` brackets and ``max_items`` values
   even counting brackets and commas inside strings, it is within bounds;
3. otherwise escaped backslashes and quotes are removed, everything but ``"[]{},`` is
   dropped (both C-speed byte operations), and numpy finds, chunk by chunk, which brackets
   and commas lie outside strings, the running depth and its maximum.

Up to the first syntax error (where msgspec stops) the depth found is exact; after it the
scan may over-count, which only turns a malformed payload into a refused one. Memory is
bounded by three copies of the payload plus a fixed-size chunk of work arrays.
"""

from __future__ import annotations

import codecs
from typing import Final

import numpy as np

from .errors import ContractError

_QUOTE: Final = ord('"')
_COMMA: Final = ord(",")
_KEEP: Final = frozenset(b'"[]{},')
_DROP: Final = bytes(b for b in range(256) if b not in _KEEP)
_CHUNK: Final = 1 << 14


def _step_table() -> np.ndarray:
    steps = np.zeros(256, dtype=np.int8)
    steps[list(b"[{")] = 1
    steps[list(b"]}")] = -1
    return steps


_STEPS: Final = _step_table()


def scan_json(payload: bytes, *, max_depth: int, max_items: int) -> None:
    """Raise ``ContractError("malformed")`` unless ``payload`` is UTF-8, nests at most
    ``max_depth`` containers deep and holds at most ``max_items`` values."""
    if not payload.isascii():
        try:
            codecs.utf_8_decode(payload, "strict", True)
        except UnicodeDecodeError as exc:
            raise ContractError("malformed", f"json: invalid UTF-8 at byte {exc.start}") from None
    opens = payload.count(b"[") + payload.count(b"{")
    if opens <= max_depth and opens + payload.count(b",") + 1 <= max_items:
        return
    structure = payload
    if b"\\" in structure:
        structure = structure.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = structure.translate(None, _DROP)
    _check_structure(np.frombuffer(structure, dtype=np.uint8), max_depth, max_items)


def _check_structure(chars: np.ndarray, max_depth: int, max_items: int) -> None:
    depth = 0
    in_string = 0
    values = 1
    for start in range(0, chars.size, _CHUNK):
        chunk = chars[start : start + _CHUNK]
        quotes = np.cumsum(chunk == _QUOTE, dtype=np.int32)
        outside = ((quotes + in_string) & 1) == 0
        steps = _STEPS[chunk] * outside
        levels = np.cumsum(steps, dtype=np.int32)
        levels += depth
        deepest = int(levels.max())
        if deepest > max_depth:
            raise ContractError("malformed", f"json: nested deeper than {max_depth}")
        depth = int(levels[-1])
        in_string = (in_string + int(quotes[-1])) & 1
        values += int(np.count_nonzero(steps > 0))
        values += int(np.count_nonzero((chunk == _COMMA) & outside))
        if values > max_items:
            raise ContractError("malformed", f"json: more than {max_items} values")
