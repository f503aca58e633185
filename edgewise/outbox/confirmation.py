"""End-to-end mode: records held after the broker's PUBACK until a consumer confirms them.

docs/adr/0078-end-to-end-acks.md. Records of the confirmed kinds stay in the outbox after the
PUBACK until :meth:`edgewise.outbox.Forwarder.confirm` names them; unconfirmed, they are sent
again ``resend_after_s`` after the PUBACK (doubling up to ``resend_max_s``) and on every new
connection. :class:`HeldRecords` is the bookkeeping: which records are held, by id and by key,
which wait for their resend, and when.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass

from edgewise.outbox.forwarder_stats import ForwarderStats
from edgewise.outbox.record import Stored

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Confirmation:
    """End-to-end mode: hold records of ``kinds`` after the PUBACK until a consumer confirms
    them by ``key(record)`` (for results: the id of the first result, :func:`schemas.message_id`).
    """

    kinds: frozenset[str]
    key: Callable[[Stored], str]
    resend_after_s: float = 10.0
    """An unconfirmed record is sent again this long after its PUBACK ..."""
    resend_max_s: float = 300.0
    """... the wait doubling at every resend up to this."""
    max_unconfirmed: int = 4096
    """Records sent and not confirmed at most (in memory: ~0.3 KB each); new ones wait."""

    def __post_init__(self) -> None:
        if not self.kinds:
            raise ValueError("Confirmation.kinds must name at least one kind")
        if not 0 < self.resend_after_s <= self.resend_max_s:
            raise ValueError("need 0 < resend_after_s <= resend_max_s")
        if self.max_unconfirmed < 1:
            raise ValueError("max_unconfirmed must be >= 1")


@dataclass(slots=True)
class Held:
    """A record of a confirmed kind, sent and not confirmed yet."""

    key: str
    interval: float
    """The wait before its next resend (doubles each time)."""
    since: float | None = None
    """``time.monotonic()`` of its first PUBACK (None: never acknowledged by the broker)."""
    due: float = 0.0
    """When it is sent again, if still waiting then."""


class HeldRecords:
    """Records sent and not confirmed, by id; their ids by key; those acknowledged by the broker
    (not in flight, not queued to be sent again); a heap of (due, id) for their resends (stale
    entries are skipped); ids confirmed while in flight (deleted already: their PUBACK changes
    nothing). Empty without the mode (``confirmation`` None)."""

    def __init__(self, confirmation: Confirmation | None, stats: ForwarderStats) -> None:
        self._confirm = confirmation
        self._stats = stats
        self.held: dict[int, Held] = {}
        self._by_key: dict[str, list[int]] = {}
        self._waiting: set[int] = set()
        self._due: list[tuple[float, int]] = []
        self.confirmed_in_flight: set[int] = set()

    def __len__(self) -> int:
        return len(self.held)

    def next_due(self) -> float | None:
        """When the first resend is due (None: none waits)."""
        return self._due[0][0] if self._due else None

    def oldest_since(self) -> float | None:
        """``time.monotonic()`` of the oldest PUBACK of a record still held (None if none)."""
        return min((h.since for h in self.held.values() if h.since is not None), default=None)

    def hold(self, record: Stored) -> None:
        """``record`` is being sent: if of a confirmed kind, it is held until confirmed."""
        assert self._confirm is not None
        held = self.held.get(record.id)
        if held is not None:
            self._stats.resent += 1
            self._waiting.discard(record.id)
            return
        if record.kind not in self._confirm.kinds:
            return
        try:
            key = self._confirm.key(record)
        except Exception as exc:  # a record nobody can confirm: delete it at the PUBACK
            self._stats.unkeyed += 1
            log.error("outbox record %d has no confirmation id (%s): not held", record.id, exc)
            return
        self.held[record.id] = Held(key, self._confirm.resend_after_s)
        self._by_key.setdefault(key, []).append(record.id)

    def acknowledged(self, record_id: int) -> None:
        """The broker acknowledged a held record: it waits for its consumer's confirmation, and
        is sent again when due."""
        held = self.held[record_id]
        now = time.monotonic()
        if held.since is None:
            held.since = now
        self.wait(record_id, held, now + held.interval)

    def wait(self, record_id: int, held: Held, due: float) -> None:
        held.due = due
        self._waiting.add(record_id)
        heapq.heappush(self._due, (due, record_id))
        if len(self._due) > 4 * len(self._waiting) + 1024:  # drop stale entries
            self._due = [(self.held[r].due, r) for r in self._waiting]
            heapq.heapify(self._due)

    def rewait_all(self) -> None:
        """A new connection: every held record waits a whole wait again from now (the backlog
        reader sends them all again, as every stored record, once it reaches them; the timer,
        if it does not). A wait that ran out while the link was down proves nothing about the
        consumer: it must not lengthen the next one."""
        now = time.monotonic()
        for record_id, held in self.held.items():
            self.wait(record_id, held, now + held.interval)

    def forget(self, record_id: int) -> None:
        held = self.held.pop(record_id, None)
        self._waiting.discard(record_id)
        if held is None:
            return
        ids = self._by_key.get(held.key)
        if ids is not None:
            with contextlib.suppress(ValueError):
                ids.remove(record_id)
            if not ids:
                del self._by_key[held.key]

    def retry_at(self, record_id: int, due: float) -> None:
        """A resend could not read its record: wait again until ``due``."""
        self.wait(record_id, self.held[record_id], due)

    def take_due(self, now: float, room: int) -> list[int]:
        """The held records whose wait is over at ``now`` (at most ``room``), each now waiting
        twice as long for its next resend."""
        assert self._confirm is not None
        due: list[int] = []
        while self._due and self._due[0][0] <= now and len(due) < room:
            at, record_id = heapq.heappop(self._due)
            held = self.held.get(record_id)
            if held is None or record_id not in self._waiting or held.due != at:
                continue  # confirmed, or sent again, since
            self._waiting.discard(record_id)
            # Unconfirmed for a whole wait: the next wait is twice as long (a consumer that
            # lags is not flooded); a resend after a new connection keeps the wait.
            held.interval = min(held.interval * 2, self._confirm.resend_max_s)
            due.append(record_id)
        return due

    def confirm(self, keys: Iterable[str], in_flight: Container[int]) -> list[int]:
        """Forget the records a consumer confirmed (by key); returns their ids (unknown keys are
        counted). Those still ``in_flight`` are remembered: their PUBACK changes nothing."""
        done: list[int] = []
        for key in keys:
            ids = self._by_key.pop(key, None)
            if ids is None:
                self._stats.confirmations_unknown += 1
                continue
            for rid in ids:
                self.held.pop(rid, None)
                self._waiting.discard(rid)
                if rid in in_flight:
                    self.confirmed_in_flight.add(rid)
                done.append(rid)
        return done
