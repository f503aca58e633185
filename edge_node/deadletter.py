"""Rejected input: counted by reason, published on the dead-letter topic, logged sparingly.

An attacker (or a broken sensor) can send garbage far faster than we should publish or log it:
publications are capped by a token bucket (the rest only counted as suppressed) and each reason
is logged at most once per ``log_interval_s`` with the number seen since.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from edge_node.token_bucket import TokenBucket
from schemas import DeadLetter, encode_deadletter, log_text, new_id

log = logging.getLogger(__name__)


class DeadLetters:
    def __init__(
        self,
        node: str,
        topic: str,
        publish: Callable[[str, bytes], object],
        *,
        max_per_s: float = 100.0,
        log_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._node = node
        self._topic = topic
        self._publish = publish
        self._clock = clock
        # A bucket holds at least one token, so a rate below 1/s still lets letters through.
        self._bucket = TokenBucket(max_per_s, max(1.0, max_per_s), clock())
        self._log_interval_s = log_interval_s
        self._last_log: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()
        self.by_reason: Counter[str] = Counter()
        self.published = 0
        self.suppressed = 0
        self._seq = 0

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def reject(self, topic: str, payload: bytes, reason: str, detail: str) -> None:
        self.by_reason[reason] += 1
        now = self._clock()
        self._log(reason, topic, detail, now)
        if not self._bucket.take(now):
            self.suppressed += 1
            return
        self._seq += 1
        letter = DeadLetter(
            node=self._node,
            id=new_id(),
            seq=self._seq,
            ts=time.time(),
            topic=topic[:256],
            reason=reason,
            detail=detail[:256],
            payload_bytes=len(payload),
            payload_head=bytes(payload[:64]),
        )
        self._publish(self._topic, encode_deadletter(letter))
        self.published += 1

    def _log(self, reason: str, topic: str, detail: str, now: float) -> None:
        last = self._last_log.get(reason)
        if last is not None and now - last < self._log_interval_s:
            self._unlogged[reason] += 1
            return
        more = self._unlogged.pop(reason, 0)
        suffix = f" (+{more} more since last report)" if more else ""
        log.warning(
            "rejected input on %s: %s: %s%s", log_text(topic, 128), reason, log_text(detail), suffix
        )
        self._last_log[reason] = now
