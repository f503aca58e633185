"""Message ids: unique and time-ordered, so consumers can deduplicate and sort on them.

Ids are UUIDv7 (RFC 9562) in canonical text form: 48 bits of Unix time in milliseconds, then a
74-bit counter (RFC 9562 §6.2, method 1) seeded at random below 2**58 in each new millisecond
and counting up within it. One clock read and at most one draw from the OS's random source serve
a whole batch: a node names a micro-batch of results at once, and a draw per id (``uuid6.uuid7``)
was about 3 µs, a tenth of what the node spends per frame beside paho.

Order: every id sorts after every id made before it in the same thread. Calls in the same
millisecond (or after the clock stepped back) continue the previous counter, so the embedded
time never runs ahead of the clock by more than a step back.
"""

from __future__ import annotations

import secrets
import time
from typing import Final

_SEED_BITS: Final = 58
_COUNTER_MAX: Final = 2**74 - 1
_VERSION: Final = 7 << 76
_VARIANT: Final = 0b10 << 62
_MAX_PER_CALL: Final = 2**16
_last_ms = -1
_last_counter = 0


def new_id() -> str:
    """One UUIDv7 (36 characters); later calls sort after earlier ones. The one place
    :mod:`schemas` reads a clock (the id embeds it)."""
    return new_ids(1)[0]


def new_ids(n: int) -> list[str]:
    """``n`` UUIDv7s in ascending order, each after every id made earlier in this thread."""
    if not 0 <= n <= _MAX_PER_CALL:
        raise ValueError(f"n must be in 0..{_MAX_PER_CALL}, got {n}")
    global _last_ms, _last_counter
    ms = time.time_ns() // 1_000_000
    if ms > _last_ms:
        first = secrets.randbits(_SEED_BITS)
    else:  # the same millisecond, or the clock stepped back: go on counting
        ms, first = _last_ms, _last_counter + 1
        if first + n > _COUNTER_MAX:  # never in practice (2**74 - 2**58 ids in one ms)
            ms, first = ms + 1, secrets.randbits(_SEED_BITS)
    # Unlocked, as in uuid6: two threads may share a counter value only with different seeds.
    _last_ms, _last_counter = ms, first + n - 1
    high = (ms & 0xFFFF_FFFF_FFFF) << 80 | _VERSION | _VARIANT
    out: list[str] = []
    for counter in range(first, first + n):
        # 12 bits of the counter above the variant, 62 below it.
        h = f"{high | (counter >> 62) << 64 | (counter & 0x3FFF_FFFF_FFFF_FFFF):032x}"
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out
