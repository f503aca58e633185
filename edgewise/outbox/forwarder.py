"""Forward what an outbox holds to a broker, deleting each record only after the broker's PUBACK.

The outbox owns every unacknowledged message; the MQTT client is only ever handed a window of
them (never more than the broker's Receive Maximum). On every new connection the forwarder starts
again from the oldest record still stored, because nothing the previous client had in flight is
known to have arrived: a record may reach the broker twice, never zero times. Consumers
deduplicate by the message ids inside the payloads.

Live before backlog: what is stored while a connection is up (and handed to :meth:`Forwarder.offer`)
goes out at once; whatever waited in the outbox when the connection began (the backlog after an
outage) drains behind it, oldest first, at a capped rate and in at most half the window, so a
long outage does not delay fresh results by the time its backlog takes to drain. Records stored
after the link was last known down (its last failed connect attempt or the loss of the
connection) count as live on the next connection: they may have been made after the link came
back, while the next attempt was not yet due, and go out before the backlog (ADR 0007).

End-to-end mode (a :class:`Confirmation`; docs/adr/0078-end-to-end-acks.md): records of the
confirmed kinds stay in the outbox after the broker's PUBACK until :meth:`Forwarder.confirm`
names them (a consumer said it has them); unconfirmed, they are sent again ``resend_after_s``
after the PUBACK (doubling up to ``resend_max_s``) and on every new connection. At most
``max_unconfirmed`` such records are sent and unconfirmed at once: beyond that, new ones wait in
the outbox (where eviction works as always: records waiting for a confirmation are not
protected from it).

This module is what callers use (offers, confirmations, figures); the rest has its module:
:mod:`edgewise.outbox.drain` (the loop that serves each connection and sends),
:mod:`edgewise.outbox.rate` (the rate caps), :mod:`edgewise.outbox.settling` (what was sent and
not deleted yet, never evicted; deletes in batches), :mod:`edgewise.outbox.confirmation`
(end-to-end mode's bookkeeping).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable

from edgewise.mqtt import MqttSession
from edgewise.outbox.async_outbox import AsyncOutbox
from edgewise.outbox.confirmation import Confirmation, HeldRecords
from edgewise.outbox.drain import DrainLoop
from edgewise.outbox.forwarder_stats import ForwarderStats
from edgewise.outbox.rate import TokenBucket
from edgewise.outbox.record import Stored
from edgewise.outbox.settling import Settlement

__all__ = ["Confirmation", "Forwarder", "ForwarderStats"]


class Forwarder(DrainLoop):
    """Run :meth:`run` as a task beside the session; after every append call :meth:`offer`
    with what was stored (or :meth:`kick` when the records are not at hand).

    ``window`` caps the records in flight (further capped by the broker's Receive Maximum);
    ``drain_max_per_s`` caps how fast the backlog (what was stored before the current
    connection began) is sent, 0 for no cap; ``live_queue_max`` bounds offered records held in
    memory while the window is full (beyond it they are read back from the outbox in order);
    ``max_rate_per_s`` caps everything sent, live records included (None: no cap).
    ``live_first=False`` keeps strict id order instead (the bridge promises order per topic):
    offered records go out at once only when nothing older waits, and the whole window is
    the backlog's. ``kinds`` / ``exclude_kinds`` let two forwarders share one outbox, each
    reading only its records (the node's and its escalator's, over two connections).
    """

    def __init__(
        self,
        outbox: AsyncOutbox,
        session: MqttSession,
        *,
        window: int = 256,
        drain_max_per_s: float = 0.0,
        max_rate_per_s: float | None = None,
        live_first: bool = True,
        live_queue_max: int = 4096,
        delete_batch: int = 256,
        delete_linger_s: float = 0.5,
        retry_s: float = 1.0,
        kinds: frozenset[str] | None = None,
        exclude_kinds: frozenset[str] | None = None,
        confirmation: Confirmation | None = None,
    ) -> None:
        if window < 1 or delete_batch < 1 or live_queue_max < 1:
            raise ValueError("window, delete_batch and live_queue_max must be >= 1")
        if drain_max_per_s < 0:
            raise ValueError("drain_max_per_s must be >= 0")
        if max_rate_per_s is not None and max_rate_per_s <= 0:
            raise ValueError("max_rate_per_s must be > 0 (or None for no cap)")
        self.stats = ForwarderStats()
        # A cap on everything sent, live or backlog (the bridge's rate limit).
        self._total = TokenBucket(max_rate_per_s or 0.0)
        # Two forwarders may share one outbox, each with its kinds (each reads only its own).
        self._kinds = kinds
        self._exclude_kinds = exclude_kinds
        self._live_first = live_first
        self._outbox = outbox
        self._session = session
        self._window = window
        self._drain = TokenBucket(drain_max_per_s)
        self._live_queue_max = live_queue_max
        self._retry_s = retry_s
        self._wake = asyncio.Event()
        self._in_flight: dict[int, tuple[asyncio.Future[None], Stored, bool]] = {}
        self._sent_times: dict[int, float] = {}
        self._backlog_in_flight = 0
        # What was sent and not deleted yet (never evicted), and the batch of deletes.
        self._settling = Settlement(outbox, delete_batch, delete_linger_s)
        outbox.protect(self._settling.snapshot)
        self._idle = asyncio.Event()
        self._serving = 0  # the connection _serve works for; 0 while none
        # Per connection: live records offered and not yet sent, the ids handed to the live
        # path (the backlog reader skips them), the backlog cursor and whether it reached the end.
        self._live: deque[Stored] = deque()
        self._claimed: set[int] = set()
        self._retry: deque[Stored] = deque()
        self._after = 0
        self._at_tail = False
        self._kicks = 0
        # Stored while no connection was served: the first id offered after the session's
        # `known_down_at` (and that moment); ids from there on go first on the next connection.
        self._fresh_since: float | None = None
        self._fresh_from = 0
        # End-to-end mode (ADR 0078): records sent and not confirmed yet.
        self._confirm = confirmation
        self._held = HeldRecords(confirmation, self.stats)
        self._blocked = False  # the backlog reader waits for room for one more unconfirmed

    # ------------------------------------------------------------------ what callers use
    def kick(self) -> None:
        """New records were appended: look at the outbox again."""
        self._at_tail = False
        self._kicks += 1
        self._idle.clear()
        self._wake.set()

    def offer(self, records: list[Stored]) -> None:
        """Records just appended (ids ascending): sent ahead of any backlog, at once if room."""
        # The backlog reader may already have read (and sent) what was just committed.
        records = [r for r in records if r.id > self._after]
        if not records:
            return
        session = self._session
        if not (self._serving and self._serving == session.connection and session.connected):
            down_at = session.known_down_at
            if self._fresh_since != down_at:  # the first record since the link was known down
                self._fresh_since, self._fresh_from = down_at, records[0].id
            self.kick()  # read back once a connection is being served
            return
        if not self._live_first:
            self._offer_in_order(records)
            return
        if any(r.retain for r in records):
            # Retained state: the last one sent wins at the broker, so it must not overtake an
            # older stored record (e.g. an earlier event still in the backlog): read in order.
            self.kick()
            return
        if len(self._live) + len(records) > self._live_queue_max:
            self.kick()  # too many waiting in memory: these come back through the reader
            return
        self._idle.clear()
        if (
            not self._live
            and not self._retry
            and self._room() >= len(records)
            and self._total.available() >= len(records)
        ):
            in_line = self._at_tail and records[0].id == self._after + 1
            for record in records:
                if not in_line:
                    self._claimed.add(record.id)
                self._send(record, live=True)
            if in_line:  # nothing older waits: move the reader past them, claim nothing
                self._after = records[-1].id
            self._total.take(len(records))
            self._bound_claims()
            return
        for record in records:
            self._claimed.add(record.id)
            self._live.append(record)
        self._wake.set()
        self._bound_claims()

    def _bound_claims(self) -> None:
        """Ids of another forwarder's records (a shared outbox), or of appends that committed
        out of order, keep offers out of line, and each claims its id until the reader passes
        it. A read past them frees the claims; ask for one before they pile up."""
        if len(self._claimed) > 4 * self._window:
            self.kick()

    def _offer_in_order(self, records: list[Stored]) -> None:
        n = len(records)
        if (
            self._at_tail
            and records[0].id == self._after + 1
            and self._room() >= n
            and self._total.available() >= n
        ):
            for record in records:
                self._send(record, live=False)
            self._after = records[-1].id
            self._total.take(n)
            self._idle.clear()
        else:
            self.kick()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def unconfirmed(self) -> int:
        """End-to-end mode: records sent and not confirmed yet (0 without the mode)."""
        return len(self._held)

    @property
    def oldest_unconfirmed_s(self) -> float:
        """End-to-end mode: how long the oldest record the broker acknowledged has waited for
        its consumer's confirmation (0 if none)."""
        first = self._held.oldest_since()
        return 0.0 if first is None else time.monotonic() - first

    def confirm(self, keys: Iterable[str]) -> int:
        """A consumer has these records (by their confirmation key): delete them. Returns how
        many records that confirmed (unknown keys are counted, never an error)."""
        done = self._held.confirm(keys, self._in_flight)
        for rid in done:
            self._settling.mark_done(rid)
        if not done:
            return 0
        self.stats.confirmed += len(done)
        if self._retry:
            gone = set(done)
            self._retry = deque(r for r in self._retry if r.id not in gone)
        self._blocked = False
        self._wake.set()
        return len(done)

    @property
    def backlog_in_flight(self) -> int:
        return self._backlog_in_flight

    @property
    def oldest_in_flight_s(self) -> float:
        """How long the oldest unacknowledged PUBLISH has waited for its PUBACK (0 if none)."""
        if not self._in_flight:
            return 0.0
        first = next(iter(self._sent_times.values()), None)  # dicts keep insertion order
        return 0.0 if first is None else time.monotonic() - first

    async def wait_idle(self) -> None:
        """Return once the outbox held nothing to send and nothing was in flight."""
        await self._idle.wait()

    async def flush(self) -> bool:
        """Delete what the broker has acknowledged now (e.g. before shutting down)."""
        return await self._settling.flush()
