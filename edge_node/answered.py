"""Which frames may have been answered already: a cheap first look before the outbox's table.

Every frame the node takes is looked up, whatever path brought it again: a broker's redelivery
(DUP flag), a sensor that re-sends after reconnecting with a clean session, a broker restarted
from an older save (no DUP flag on either). The outbox's ``answered`` table (frame key -> result
id, the newest ``storage.answered_keep`` keys) holds the truth, but a query per frame would cost
a thread hop each. :class:`AnsweredFilter` answers "surely not" for almost every new frame in
well under a microsecond, with no false negatives among the keys added last; only a "maybe" is
asked of the table (docs/adr/0076-intake-bounds.md).

It is a Bloom filter with two probes, in two generations: keys go into the current one; when
it has taken ``generation`` keys it becomes the previous one and a fresh one starts. A key is
therefore found until at least ``generation`` more have been added after it. The table keeps
the newest ``answered_keep`` keys (fewer if they outgrow their share of the outbox), so with
``generation`` a little above ``answered_keep`` every key the table holds is found. Bits stay
set for keys the table has pruned: those are false "maybe"s, one table look-up each, as are
the filter's own collisions (well under 1 % at 32 bits per key).
"""

from __future__ import annotations

_BITS_PER_KEY = 32
_MIN_BITS = 1 << 16


class AnsweredFilter:
    """A set of frame keys that may err only on the side of "maybe" (see the module doc)."""

    __slots__ = ("_count", "_current", "_mask", "_previous", "generation")

    def __init__(self, keep: int) -> None:
        """``keep``: the newest keys that must always be found (0: none, the filter is off)."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        # Slack for keys committed in another order than they were added here (group commit).
        self.generation = keep + max(1024, keep // 8) if keep else 0
        bits = max(_MIN_BITS, 1 << (self.generation * _BITS_PER_KEY - 1).bit_length())
        self._mask = bits - 1
        size = bits // 8 if keep else 0
        self._current = bytearray(size)
        self._previous = bytearray(size)
        self._count = 0

    def add(self, key: str) -> None:
        if not self.generation:
            return
        h = hash(key)  # str hashes are SipHash, seeded per process: fine for a process's filter
        a = h & self._mask
        b = (h >> 32) & self._mask
        cur = self._current
        cur[a >> 3] |= 1 << (a & 7)
        cur[b >> 3] |= 1 << (b & 7)
        self._count += 1
        if self._count >= self.generation:
            self._previous = cur
            self._current = bytearray(len(cur))
            self._count = 0

    def __contains__(self, key: object) -> bool:
        if not self.generation:
            return False
        h = hash(key)
        a = h & self._mask
        b = (h >> 32) & self._mask
        ia, ma, ib, mb = a >> 3, 1 << (a & 7), b >> 3, 1 << (b & 7)
        cur = self._current
        if cur[ia] & ma and cur[ib] & mb:
            return True
        prev = self._previous
        return bool(prev[ia] & ma and prev[ib] & mb)

    @property
    def nbytes(self) -> int:
        """Memory the bits take (both generations)."""
        return len(self._current) + len(self._previous)
