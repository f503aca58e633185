"""Recognise the bridge's own publishes coming back to it (echo suppression on MQTT 3.1.1).

MQTT 5's No Local subscription option makes the broker itself withhold a client's own
publishes; MQTT 3.1.1 has nothing like it, and the payload is not ours to mark. So a session on
3.1.1 remembers a fingerprint (topic + BLAKE2b-128 of the payload) of everything it publishes,
for ``ttl_s``; an inbound message matching a remembered fingerprint consumes it and is dropped.
Each publish cancels at most one arrival, so a third party publishing the same bytes to the same
topic loses at most as many messages as the bridge forwarded identical ones in that window
(docs/adr/0010-bridge-no-echo.md). Pure (no I/O); the clock is passed in.
"""

from __future__ import annotations

import hashlib
from collections import deque

Fingerprint = tuple[str, bytes]


def fingerprint(topic: str, payload: bytes) -> Fingerprint:
    return topic, hashlib.blake2b(payload, digest_size=16).digest()


class EchoLedger:
    """A bounded multiset of fingerprints that expire after ``ttl_s``; the oldest goes first."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError("ttl_s must be > 0 and max_entries >= 1")
        self._ttl_s = ttl_s
        self._max = max_entries
        self._seq = 0
        self._live: dict[Fingerprint, deque[int]] = {}  # per fingerprint: seqs not yet consumed
        self._order: deque[tuple[float, int, Fingerprint]] = deque()  # (expires, seq, key)
        self._size = 0
        self.expired = 0  # remembered publishes that never came back (e.g. no subscriber)
        self.consumed = 0  # echoes recognised

    def __len__(self) -> int:
        return self._size

    def sent(self, topic: str, payload: bytes, now: float) -> None:
        self._prune(now)
        key = fingerprint(topic, payload)
        self._seq += 1
        self._live.setdefault(key, deque()).append(self._seq)
        self._order.append((now + self._ttl_s, self._seq, key))
        self._size += 1
        while self._size > self._max:
            self._forget()

    def is_echo(self, topic: str, payload: bytes, now: float) -> bool:
        """True (and the oldest such fingerprint consumed) if this is our publish come back."""
        self._prune(now)
        key = fingerprint(topic, payload)
        seqs = self._live.get(key)
        if not seqs:
            return False
        seqs.popleft()
        if not seqs:
            del self._live[key]
        self._size -= 1
        self.consumed += 1
        return True

    def _prune(self, now: float) -> None:
        while self._order and self._order[0][0] <= now:
            self._drop_head()

    def _forget(self) -> None:
        """Drop the oldest entry still remembered (entries already consumed are skipped)."""
        while self._order and not self._drop_head():
            pass

    def _drop_head(self) -> bool:
        """Pop the oldest entry; True if it was still remembered (not consumed by an echo)."""
        _, seq, key = self._order.popleft()
        seqs = self._live.get(key)
        if not seqs or seqs[0] != seq:
            return False
        seqs.popleft()
        if not seqs:
            del self._live[key]
        self._size -= 1
        self.expired += 1
        return True
