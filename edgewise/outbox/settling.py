"""Settling what a forwarder sent: nothing it handed to a broker is evicted, and what the broker
acknowledged leaves the outbox in batches.

A record the forwarder handed to a broker and has not deleted yet is *unsettled* (in flight,
acknowledged, or in doubt after a lost connection): it may have arrived, so the outbox never
evicts it (ADR 0063). What the broker acknowledged (or a consumer confirmed) is deleted in
batches of up to ``delete_batch`` ids, or after ``delete_linger_s``, in one transaction; a
delete that fails (a full disk: deletes need log space too) keeps its ids for the next try.
"""

from __future__ import annotations

import logging
import time

from edgewise.outbox.async_outbox import AsyncOutbox
from edgewise.outbox.errors import OutboxError

log = logging.getLogger(__name__)


class Settlement:
    """The unsettled ids of one forwarder and its batch of deletes."""

    def __init__(self, outbox: AsyncOutbox, delete_batch: int, delete_linger_s: float) -> None:
        self._outbox = outbox
        self._delete_batch = delete_batch
        self._delete_linger_s = delete_linger_s
        # Sent and not yet deleted: in flight, acknowledged, or in doubt after a lost
        # connection. The outbox never evicts these (they may have arrived; ADR 0063).
        self.unsettled: set[int] = set()
        # Fresh records waiting to be sent, protected from eviction until sent (ADR 0063).
        self.guarded: set[int] = set()
        self.done: list[int] = []
        self._done_since: float | None = None
        self._deletes_failing = False

    def snapshot(self) -> frozenset[int]:
        """Called on the outbox's thread: one C-level copy, atomic under the GIL."""
        return frozenset(self.unsettled)

    def mark_done(self, record_id: int) -> None:
        """Delete this record with the next batch."""
        if not self.done:
            self._done_since = time.monotonic()
        self.done.append(record_id)

    def linger_left(self) -> float:
        if self._done_since is None:
            return self._delete_linger_s
        return self._done_since + self._delete_linger_s - time.monotonic()

    def batch_due(self, linger_left: float) -> bool:
        """A batch of deletes is waiting and full, or has waited long enough."""
        return bool(self.done) and (len(self.done) >= self._delete_batch or linger_left <= 0)

    async def flush(self) -> bool:
        """Delete what the broker acknowledged; False (ids kept for later) if the outbox can't."""
        if not self.done:
            return True
        ids, self.done = self.done, []
        since, self._done_since = self._done_since, None
        try:
            await self._outbox.delete(ids)
        except OutboxError as exc:
            self.done = ids + self.done
            self._done_since = since
            if not self._deletes_failing:
                log.warning("cannot delete delivered records from the outbox yet: %s", exc)
            self._deletes_failing = True
            return False
        self.unsettled.difference_update(ids)
        if self._deletes_failing:
            log.info("deleting delivered records from the outbox works again")
            self._deletes_failing = False
        return True
