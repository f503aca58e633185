"""The pending cases: each resolved exactly once, by a verdict or its deadline, then delivered.

A case sent to the cloud waits here until the first valid verdict for it (``cloud``) or its
deadline (``edge_fallback``), whichever comes first; later ones find it resolved (a late or
duplicate verdict). Its final result goes to the ``deliver`` callback, which stores it
durably; only then is its journal entry deleted (in the background, in order). Storage trouble
keeps the finals for another try; any other failure is narrowed down to the one final that
fails, which is given up (counted in ``finals_lost``) so it cannot hold back the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from edge_node.escalation.cache import CloudVerdict
from edge_node.escalation.cases import Deliver, Entry, Final, final_of
from edge_node.escalation.journal import Journal
from edge_node.escalation.stats import EscalationStats
from edgewise.outbox import OutboxError
from schemas import Source

log = logging.getLogger(__name__)

_RESOLVED_KEEP = 100_000


class PendingCases:
    def __init__(
        self,
        journal: Journal,
        deliver: Deliver,
        stats: EscalationStats,
        *,
        on_unanswered: Callable[[], None],
    ) -> None:
        """``on_unanswered()``: a case ended at its deadline with no reply."""
        self._journal = journal
        self._deliver = deliver
        self._stats = stats
        self._on_unanswered = on_unanswered
        self._pending: dict[str, Entry] = {}
        self._by_frame: dict[str, str] = {}
        self._resolved: OrderedDict[str, None] = OrderedDict()
        self._heap: list[tuple[float, str]] = []
        self._deadline_wake = asyncio.Event()
        self.finals: list[Final] = []
        """Final results waiting to be delivered."""
        self._finals_wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._settled.set()
        self._delivering = False
        self._removing: set[asyncio.Future[None]] = set()

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, rid: object) -> bool:
        return rid in self._pending

    def get(self, rid: str) -> Entry | None:
        return self._pending.get(rid)

    def entries(self) -> list[Entry]:
        return list(self._pending.values())

    def was_resolved(self, rid: str) -> bool:
        """Resolved already (one of the last 100,000): a verdict for it is late or a copy."""
        return rid in self._resolved

    def result_id_of(self, frame_key: str) -> str | None:
        return self._by_frame.get(frame_key)

    def hold(self) -> None:
        """Not settled: cases are about to be added."""
        self._settled.clear()

    def add(self, e: Entry) -> None:
        rid = e.case.result.id
        self._pending[rid] = e
        self._by_frame[e.case.frame_key] = rid
        if not self._heap or e.deadline < self._heap[0][0]:
            self._deadline_wake.set()
        heapq.heappush(self._heap, (e.deadline, rid))

    def decided(self, finals: list[Final]) -> None:
        """Finals decided without the cloud (cases pending at the last stop): delivered too."""
        self.finals.extend(finals)
        if self.finals:
            self._settled.clear()
            self._finals_wake.set()

    def resolve(self, entry: Entry, source: Source, verdict: CloudVerdict | None = None) -> None:
        rid = entry.case.result.id
        if self._pending.pop(rid, None) is None:
            return  # already resolved: exactly once
        self._by_frame.pop(entry.case.frame_key, None)
        self._resolved[rid] = None
        while len(self._resolved) > _RESOLVED_KEEP:
            self._resolved.popitem(last=False)
        self.finals.append(final_of(entry.case, source, verdict))
        self._finals_wake.set()

    async def wait_settled(self) -> None:
        """Return once nothing is pending, every final result has been delivered and its
        journal entry deleted."""
        while True:
            while self._pending or self.finals or self._delivering:
                self._settled.clear()
                await self._settled.wait()
            if not self._removing:
                return
            await asyncio.gather(*list(self._removing), return_exceptions=True)

    async def deadlines(self) -> None:
        while True:
            now = time.monotonic()
            while self._heap and self._heap[0][0] <= now:
                _, rid = heapq.heappop(self._heap)
                entry = self._pending.get(rid)
                if entry is not None:
                    self._stats.fallback += 1
                    self.resolve(entry, "edge_fallback")
                    self._on_unanswered()
            self._deadline_wake.clear()
            timeout = self._heap[0][0] - now if self._heap else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._deadline_wake.wait()

    def _removed(self, fut: asyncio.Future[None]) -> None:
        self._removing.discard(fut)
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:  # stays journaled: decided again (same id) after a restart
            log.error("escalation journal delete failed: %s", exc)

    async def _deliver_each(self, batch: list[Final]) -> list[Final]:
        """Deliver ``batch`` one result at a time; a result that fails alone for a reason other
        than storage is given up (logged, counted in ``finals_lost``), so it cannot hold back
        the others for ever; one that meets storage trouble waits for the next round. Returns
        the results done with (delivered or given up)."""
        done: list[Final] = []
        for i, final in enumerate(batch):
            try:
                await self._deliver([final])
            except (OutboxError, OSError):
                self.finals[:0] = batch[i:]
                break
            except Exception as exc:
                self._stats.finals_lost += 1
                why = f"{type(exc).__name__}: {exc}"
                log.error("final result %s given up: %s", final.result.id, why)
            done.append(final)
        return done

    async def deliveries(self) -> None:
        while True:
            if not self.finals:
                if not self._pending:
                    self._settled.set()
                self._finals_wake.clear()
                await self._finals_wake.wait()
                continue
            batch, self.finals = self.finals, []
            self._delivering = True
            try:
                await self._deliver(batch)
            except (OutboxError, OSError) as exc:  # storage trouble: keep them, try again
                log.error("storing %d final results failed (%s); retrying", len(batch), exc)
                self.finals[:0] = batch
                self._delivering = False
                await asyncio.sleep(0.5)
                continue
            except Exception as exc:  # not storage: one of them may be what fails, every time
                log.error("storing %d final results failed (%s); one by one", len(batch), exc)
                batch = await self._deliver_each(batch)
            # The delete commits in the background (in order, after this batch's insert): the
            # next final results need not wait for it.
            if batch:
                removed = self._journal.remove_nowait([f.result.id for f in batch])
                self._removing.add(removed)
                removed.add_done_callback(self._removed)
            self._delivering = False
