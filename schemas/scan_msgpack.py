"""Iterative structural pre-scan of untrusted MessagePack, run before msgspec sees the bytes.

msgspec decodes nested containers recursively (also when it skips a field it does not know)
and builds one Python object per value, so a small payload can recurse ~1000 C frames deep
or, decoded generically, allocate ~70x its own size (1 MiB of ``0x90`` = a million empty
lists). This walker reads only the headers, with an explicit stack, and refuses before any
object is built:

* truncation, trailing bytes, the reserved byte ``0xc1``;
* ext types (the contract has none), map keys that are not strings, invalid UTF-8;
* nesting deeper than ``max_depth`` and more than ``max_items`` values in total;
* a container header claiming more entries than bytes remain (each entry takes >= 1 byte),
  so a 5-byte ``array32`` of 2**32-1 is refused at once.

Cost is one loop iteration per value (runs of one-byte scalars are skipped by a regex) and
it allocates only the stack and, per string, its decoded text, which is dropped at once.
"""

from __future__ import annotations

import codecs
import re
from typing import Final

from .errors import ContractError

_SCALAR, _STR, _BIN, _ARRAY, _MAP, _EXT, _RESERVED = range(7)

# One-byte values that need no checking: positive/negative fixint, nil, false, true.
_ONE_BYTE_SCALARS: Final = re.compile(rb"[\x00-\x7f\xc0\xc2\xc3\xe0-\xff]+")


def _header_table() -> tuple[tuple[int, int, int], ...]:
    """(kind, header size, n) per first byte; n is the inline length/count, or -width when
    the length/count follows the first byte as a ``width``-byte big-endian integer."""
    table = [(_RESERVED, 1, 0)] * 256
    for b in range(0x00, 0x80):
        table[b] = (_SCALAR, 1, 0)
    for b in range(0x80, 0x90):
        table[b] = (_MAP, 1, b & 0x0F)
    for b in range(0x90, 0xA0):
        table[b] = (_ARRAY, 1, b & 0x0F)
    for b in range(0xA0, 0xC0):
        table[b] = (_STR, 1, b & 0x1F)
    for b in (0xC0, 0xC2, 0xC3):
        table[b] = (_SCALAR, 1, 0)
    for b, width in ((0xC4, 1), (0xC5, 2), (0xC6, 4)):
        table[b] = (_BIN, 1 + width, -width)
    for b, width in ((0xC7, 1), (0xC8, 2), (0xC9, 4)):
        table[b] = (_EXT, 1 + width, -width)
    for b, size in ((0xCA, 4), (0xCB, 8), (0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        table[b] = (_SCALAR, 1 + size, 0)
    for b, size in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
        table[b] = (_SCALAR, 1 + size, 0)
    for b in range(0xD4, 0xD9):
        table[b] = (_EXT, 1, 0)
    for b, width in ((0xD9, 1), (0xDA, 2), (0xDB, 4)):
        table[b] = (_STR, 1 + width, -width)
    table[0xDC] = (_ARRAY, 3, -2)
    table[0xDD] = (_ARRAY, 5, -4)
    table[0xDE] = (_MAP, 3, -2)
    table[0xDF] = (_MAP, 5, -4)
    for b in range(0xE0, 0x100):
        table[b] = (_SCALAR, 1, 0)
    return tuple(table)


_HEADERS: Final = _header_table()


def _malformed(detail: str, pos: int) -> ContractError:
    return ContractError("malformed", f"msgpack: {detail} at byte {pos}")


def scan_msgpack(payload: bytes, *, max_depth: int, max_items: int) -> int:
    """Check that ``payload`` is exactly one well-formed value within the caps.

    Returns the number of values (containers and scalars) it holds; raises
    ``ContractError("malformed")`` on the first problem found.
    """
    view = memoryview(payload)
    end = len(payload)
    headers = _HEADERS
    skip_run = _ONE_BYTE_SCALARS.match
    pos = 0
    items = 0
    # The open containers: (values still to read, is a map). The top level is an array of one.
    stack: list[tuple[int, bool]] = []
    remaining = 1
    in_map = False
    while True:
        if remaining == 0:
            if not stack:
                break
            remaining, in_map = stack.pop()
            continue
        if pos >= end:
            raise _malformed("truncated", pos)
        kind, head, n = headers[payload[pos]]
        if in_map and not remaining & 1 and kind != _STR:
            raise _malformed("map key is not a string", pos)
        if kind == _SCALAR:
            if head == 1 and not in_map:
                run = skip_run(payload, pos, pos + remaining)
                assert run is not None  # payload[pos] is a one-byte scalar
                count = run.end() - pos
                pos += count
            else:
                count = 1
                pos += head
                if pos > end:
                    raise _malformed("truncated", pos - head)
            remaining -= count
            items += count
            if items > max_items:
                raise _malformed(f"more than {max_items} values", pos)
            continue
        if kind == _EXT:
            raise _malformed("ext type is not allowed", pos)
        if kind == _RESERVED:
            raise _malformed("reserved byte 0xc1", pos)
        start = pos
        if n < 0:
            if pos + head > end:
                raise _malformed("truncated", start)
            n = int.from_bytes(payload[pos + 1 : pos + head], "big")
        pos += head
        remaining -= 1
        items += 1
        if items > max_items:
            raise _malformed(f"more than {max_items} values", start)
        if kind in (_STR, _BIN):
            if n > end - pos:
                raise _malformed(f"truncated ({n}-byte value, {end - pos} bytes left)", start)
            if kind == _STR and n:
                try:
                    codecs.utf_8_decode(view[pos : pos + n], "strict", True)
                except UnicodeDecodeError:
                    raise _malformed("invalid UTF-8 in string", start) from None
            pos += n
            continue
        need = 2 * n if kind == _MAP else n
        if need > end - pos:
            raise _malformed(f"truncated (container of {n} entries, {end - pos} bytes left)", start)
        if len(stack) >= max_depth:
            raise _malformed(f"nested deeper than {max_depth}", start)
        stack.append((remaining, in_map))
        remaining = need
        in_map = kind == _MAP
    if pos != end:
        raise _malformed(f"{end - pos} trailing bytes", pos)
    return items
