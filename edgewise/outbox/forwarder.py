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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from edgewise.mqtt import Disconnected, MqttSession, PublishFailed, PublishRejected
from edgewise.outbox.async_outbox import AsyncOutbox
from edgewise.outbox.errors import OutboxError
from edgewise.outbox.record import Stored

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ForwarderStats:
    published: int = 0
    """PUBLISH packets handed to the client (resends after a reconnect count again)."""
    live_published: int = 0
    """Of those, records offered while the connection was up, sent ahead of any backlog."""
    delivered: int = 0
    """Records the broker acknowledged (each is then deleted from the outbox)."""
    delivered_items: dict[str, int] = field(default_factory=dict)
    """What those records carried (``Record.items``: e.g. results), per kind."""
    refused: int = 0
    """Records the broker or the client refused for good (e.g. an ACL); deleted and logged."""
    fresh: int = 0
    """Records stored after the link was last known down, sent live on the next connection."""
    confirmed: int = 0
    """End-to-end mode: records a consumer confirmed (each is then deleted from the outbox)."""
    resent: int = 0
    """End-to-end mode: sends of a record sent before and not confirmed yet (a timeout, a new
    connection)."""
    unconfirmed_evicted: int = 0
    """End-to-end mode: records the outbox evicted while they waited for a confirmation."""
    confirmations_unknown: int = 0
    """End-to-end mode: confirmed ids of no record waiting here (a duplicate confirmation, a
    record confirmed already, or sent by an earlier run and not sent again yet)."""
    unkeyed: int = 0
    """End-to-end mode: records of a confirmed kind whose id could not be read (deleted at the
    PUBACK, as without the mode)."""


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
class _Held:
    """A record of a confirmed kind, sent and not confirmed yet."""

    key: str
    interval: float
    """The wait before its next resend (doubles each time)."""
    since: float | None = None
    """``time.monotonic()`` of its first PUBACK (None: never acknowledged by the broker)."""
    due: float = 0.0
    """When it is sent again, if still waiting then."""


class _TokenBucket:
    """At most ``rate`` takes per second on average, bursts of up to ``rate / 10`` (>= 1)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate / 10.0)
        self._tokens = self.capacity
        self._at = time.monotonic()

    def available(self) -> int:
        if self.rate <= 0:
            return 1 << 30
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return int(self._tokens)

    def take(self, n: int) -> None:
        if self.rate > 0:
            self._tokens -= n

    def wait_s(self) -> float:
        """Time until one more token is available."""
        if self.rate <= 0:
            return 0.0
        return max(0.0, (1.0 - self._tokens) / self.rate)


class Forwarder:
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
        # A cap on everything sent, live or backlog (the bridge's rate limit).
        self._total = _TokenBucket(max_rate_per_s or 0.0)
        # Two forwarders may share one outbox, each with its kinds (each reads only its own).
        self._kinds = kinds
        self._exclude_kinds = exclude_kinds
        self._live_first = live_first
        self._outbox = outbox
        self._session = session
        self._window = window
        self._drain = _TokenBucket(drain_max_per_s)
        self._live_queue_max = live_queue_max
        self._delete_batch = delete_batch
        self._retry_s = retry_s
        self._delete_linger_s = delete_linger_s
        self._done_since: float | None = None
        self._deletes_failing = False
        self._wake = asyncio.Event()
        self._in_flight: dict[int, tuple[asyncio.Future[None], Stored, bool]] = {}
        self._sent_times: dict[int, float] = {}
        self._backlog_in_flight = 0
        self._done: list[int] = []
        # Sent and not yet deleted: in flight, acknowledged, or in doubt after a lost
        # connection. The outbox never evicts these (they may have arrived; ADR 0063).
        self._unsettled: set[int] = set()
        outbox.protect(self._unsettled_snapshot)
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
        # Fresh records waiting in `_live`, protected from eviction until sent (ADR 0063).
        self._guarded: set[int] = set()
        # End-to-end mode (ADR 0078): records sent and not confirmed, by id; their ids by key;
        # those acknowledged by the broker (not in flight, not queued to be sent again); a heap
        # of (due, id) for their resends (stale entries are skipped); ids confirmed while in
        # flight (deleted already: their PUBACK changes nothing).
        self._confirm = confirmation
        self._held: dict[int, _Held] = {}
        self._by_key: dict[str, list[int]] = {}
        self._waiting: set[int] = set()
        self._due: list[tuple[float, int]] = []
        self._confirmed_in_flight: set[int] = set()
        self._blocked = False  # the backlog reader waits for room for one more unconfirmed
        self.stats = ForwarderStats()

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
        first = min((h.since for h in self._held.values() if h.since is not None), default=None)
        return 0.0 if first is None else time.monotonic() - first

    def confirm(self, keys: Iterable[str]) -> int:
        """A consumer has these records (by their confirmation key): delete them. Returns how
        many records that confirmed (unknown keys are counted, never an error)."""
        done: list[int] = []
        for key in keys:
            ids = self._by_key.pop(key, None)
            if ids is None:
                self.stats.confirmations_unknown += 1
                continue
            for rid in ids:
                self._held.pop(rid, None)
                self._waiting.discard(rid)
                if rid in self._in_flight:
                    self._confirmed_in_flight.add(rid)
                self._mark_done(rid)
                done.append(rid)
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
        return await self._flush_deletes()

    def _unsettled_snapshot(self) -> frozenset[int]:
        """Called on the outbox's thread: one C-level copy, atomic under the GIL."""
        return frozenset(self._unsettled)

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        while True:
            await self._session.wait_connected()
            connection = self._session.connection
            await self._flush_deletes()
            try:
                with contextlib.suppress(Disconnected):
                    await self._serve(connection)
            except OutboxError as exc:
                log.error("reading the outbox failed (%s); retrying in %.0f s", exc, self._retry_s)
                self._abandon_in_flight()
                await asyncio.sleep(self._retry_s)
                continue
            self._abandon_in_flight()
            # The link is gone: what the broker acknowledged leaves the outbox now, not at the
            # next connection, so that a crash during the outage resends only what was in
            # flight when it began (at most the window), never records known to have arrived.
            await self._flush_deletes()

    async def _serve(self, connection: int) -> None:
        # A new connection resends everything still stored, oldest first, as backlog; what was
        # stored after the link was last known down goes first.
        self._live.clear()
        self._claimed.clear()
        self._retry.clear()
        self._unsettled.difference_update(self._guarded)
        self._guarded.clear()
        self._after, self._at_tail = 0, False
        self._confirmed_in_flight.clear()
        self._blocked = False
        self._rewait_held()
        fresh_from = 0
        if self._fresh_since == self._session.known_down_at:
            fresh_from = self._fresh_from  # no failed attempt since: they may be live
        self._fresh_since, self._fresh_from = None, 0
        self._serving = connection
        # Wakes the loop the moment the link drops, even with nothing in flight to fail.
        watcher = asyncio.get_running_loop().create_task(self._wake_on_loss())
        try:
            if fresh_from and self._live_first:
                await self._queue_fresh(fresh_from)
            await self._serve_loop(connection)
        finally:
            self._serving = 0
            watcher.cancel()

    async def _wake_on_loss(self) -> None:
        await self._session.wait_disconnected()
        self._wake.set()

    async def _queue_fresh(self, first_id: int) -> None:
        """Queue the records stored from ``first_id`` on (at most one window) as live: sent
        before the backlog, as if offered on this connection, and kept from eviction while
        they wait (as the backlog reader, from the end of the read on). Retained records stay
        in id order: the last one sent is the state (ADR 0064). Read from the outbox, not kept
        from ``offer``: what was evicted meanwhile must not be sent."""
        window = min(self._window, self._session.broker_receive_maximum)
        for record in await self._read(window, first_id - 1):
            if record.retain or record.id in self._claimed or record.id in self._in_flight:
                continue  # retained: in id order; the others: offered live meanwhile
            self._claimed.add(record.id)
            self._live.append(record)
            if record.id not in self._unsettled:
                self._unsettled.add(record.id)
                self._guarded.add(record.id)
            self.stats.fresh += 1
        if self._live:
            self._idle.clear()

    async def _read(self, limit: int, after_id: int) -> list[Stored]:
        return await self._outbox.pending(
            limit, after_id, kinds=self._kinds, exclude=self._exclude_kinds
        )

    def _window_room(self) -> int:
        return min(self._window, self._session.broker_receive_maximum) - len(self._in_flight)

    def _room(self) -> int:
        """Room for records not sent before: the window, and in end-to-end mode the bound on
        unconfirmed records (sending one again needs only the window)."""
        room = self._window_room()
        if self._confirm is None:
            return room
        return min(room, self._confirm.max_unconfirmed - len(self._held))

    async def _serve_loop(self, connection: int) -> None:
        while self._session.connected and self._session.connection == connection:
            self._wake.clear()
            if self._due and self._due[0][0] <= time.monotonic() and self._window_room() > 0:
                await self._resend_due()
            sent = self._send_live()
            wait_s: float | None = None
            if not self._at_tail and not (self._blocked and self._room() <= 0):
                sent += await self._send_backlog()
                if not self._at_tail and self._drain.available() < 1:
                    wait_s = self._drain.wait_s()
            if (self._live or self._retry or not self._at_tail) and self._total.available() < 1:
                wait_s = (
                    self._total.wait_s() if wait_s is None else max(wait_s, self._total.wait_s())
                )
            linger_left = self._delete_linger_left()
            if self._done and (len(self._done) >= self._delete_batch or linger_left <= 0):
                if not await self._flush_deletes():
                    # Delivered but not deletable (a full disk: deletes need log space too).
                    # Try again later; meanwhile the records are only resent after a reconnect.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._retry_s):
                            await self._wake.wait()
                continue
            if sent:
                continue
            if (
                not self._in_flight
                and not self._retry
                and (not self._live or self._room() <= 0)
                and (self._at_tail or self._blocked)
            ):
                # Nothing to send now (with no room: until a confirmation makes some).
                self._idle.set()
            if self._done:
                wait_s = linger_left if wait_s is None else min(wait_s, linger_left)
            if self._due and self._window_room() > 0:  # (a full window: a PUBACK wakes it)
                due_s = max(0.0, self._due[0][0] - time.monotonic())
                wait_s = due_s if wait_s is None else min(wait_s, due_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()

    def _send_live(self) -> int:
        sent = 0
        while self._total.available() > 0:
            if self._retry and self._window_room() > 0:
                record = self._retry.popleft()
                if record.id in self._in_flight:
                    continue  # the backlog reader sent it meanwhile
                self._send(record, live=record.id in self._claimed)
            elif self._live and self._room() > 0:
                self._send(self._live.popleft(), live=True)
            else:
                break
            self._total.take(1)
            sent += 1
        return sent

    async def _send_backlog(self) -> int:
        window = min(self._window, self._session.broker_receive_maximum)
        share = max(1, window // 2) if self._live_first else window
        want = min(
            self._window_room(),
            share - self._backlog_in_flight,
            self._drain.available(),
            self._total.available(),
        )
        if want <= 0:
            return 0
        kicks = self._kicks
        read = await self._read(want, self._after)
        sent = 0
        for record in read:
            if record.id <= self._after:
                continue  # a concurrent read already went past it
            if record.id in self._claimed:
                self._after = record.id
                self._claimed.discard(record.id)  # the live path has it
                continue
            if record.id in self._in_flight:
                self._after = record.id
                continue
            if self._confirm is not None and record.id not in self._held and self._room() <= 0:
                # A record not sent before, and as many unconfirmed as allowed: it waits (in
                # the outbox) for a confirmation to make room; the reader stays before it.
                self._blocked = True
                return sent
            self._after = record.id
            self._send(record, live=False)
            self._drain.take(1)
            self._total.take(1)
            sent += 1
        self._blocked = False
        if len(read) < want and kicks == self._kicks:
            self._at_tail = True
        return sent

    def _send(self, record: Stored, *, live: bool) -> None:
        try:
            fut = self._session.publish_nowait(
                record.topic, record.payload, qos=record.qos, retain=record.retain
            )
        except Exception as exc:  # a bug must not stop the forwarder: refused, like a bad ACL
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(PublishFailed(f"publish to {record.topic[:128]!r} failed: {exc}"))
        self.stats.published += 1
        if live:
            self.stats.live_published += 1
        else:
            self._backlog_in_flight += 1
        self._in_flight[record.id] = (fut, record, live)
        if self._confirm is not None:
            self._hold(record)
        self._unsettled.add(record.id)
        self._guarded.discard(record.id)  # protected as sent from now on
        self._sent_times[record.id] = time.monotonic()
        fut.add_done_callback(functools.partial(self._settled, record.id))

    def _settled(self, record_id: int, fut: asyncio.Future[None]) -> None:
        entry = self._in_flight.get(record_id)
        if entry is None or entry[0] is not fut:
            return  # from a connection we already gave up on
        del self._in_flight[record_id]
        self._sent_times.pop(record_id, None)
        _, record, live = entry
        if not live:
            self._backlog_in_flight -= 1
        exc = fut.exception()
        if exc is None:
            self.stats.delivered += 1
            items = self.stats.delivered_items
            items[record.kind] = items.get(record.kind, 0) + record.items
            if self._confirmed_in_flight and record_id in self._confirmed_in_flight:
                self._confirmed_in_flight.discard(record_id)  # confirmed first: deleted already
            elif record_id in self._held:
                self._await_confirmation(record_id)
            else:
                self._mark_done(record_id)
        elif isinstance(exc, PublishRejected) or (
            isinstance(exc, PublishFailed) and not exc.transient
        ):
            # Retrying cannot help and would block everything behind it.
            self.stats.refused += 1
            log.error("dropping outbox record %d: %s", record_id, exc)
            self._forget(record_id)
            self._mark_done(record_id)
        elif self._session.connected and self._serving == self._session.connection:
            # Not sent, yet the link is up (a transient client refusal): send it again.
            self._retry.append(record)
        self._wake.set()

    def _mark_done(self, record_id: int) -> None:
        if not self._done:
            self._done_since = time.monotonic()
        self._done.append(record_id)

    # ------------------------------------------------------------------ end-to-end mode
    def _hold(self, record: Stored) -> None:
        """``record`` is being sent: if of a confirmed kind, it is held until confirmed."""
        assert self._confirm is not None
        held = self._held.get(record.id)
        if held is not None:
            self.stats.resent += 1
            self._waiting.discard(record.id)
            return
        if record.kind not in self._confirm.kinds:
            return
        try:
            key = self._confirm.key(record)
        except Exception as exc:  # a record nobody can confirm: delete it at the PUBACK
            self.stats.unkeyed += 1
            log.error("outbox record %d has no confirmation id (%s): not held", record.id, exc)
            return
        self._held[record.id] = _Held(key, self._confirm.resend_after_s)
        self._by_key.setdefault(key, []).append(record.id)

    def _await_confirmation(self, record_id: int) -> None:
        """The broker acknowledged a held record: it waits for its consumer's confirmation, and
        is sent again when due. Not protected from eviction while it waits (it may wait long;
        the outbox's bound and priorities apply: ADR 0078)."""
        assert self._confirm is not None
        held = self._held[record_id]
        now = time.monotonic()
        if held.since is None:
            held.since = now
        self._wait(record_id, held, now + held.interval)
        self._unsettled.discard(record_id)

    def _wait(self, record_id: int, held: _Held, due: float) -> None:
        held.due = due
        self._waiting.add(record_id)
        heapq.heappush(self._due, (due, record_id))
        if len(self._due) > 4 * len(self._waiting) + 1024:  # drop stale entries
            self._due = [(self._held[r].due, r) for r in self._waiting]
            heapq.heapify(self._due)

    def _rewait_held(self) -> None:
        """A new connection: every held record waits a whole wait again from now (the backlog
        reader sends them all again, as every stored record, once it reaches them; the timer,
        if it does not). A wait that ran out while the link was down proves nothing about the
        consumer: it must not lengthen the next one."""
        now = time.monotonic()
        for record_id, held in self._held.items():
            self._wait(record_id, held, now + held.interval)

    def _forget(self, record_id: int) -> None:
        held = self._held.pop(record_id, None)
        self._waiting.discard(record_id)
        if held is None:
            return
        ids = self._by_key.get(held.key)
        if ids is not None:
            with contextlib.suppress(ValueError):
                ids.remove(record_id)
            if not ids:
                del self._by_key[held.key]

    async def _resend_due(self) -> None:
        """Queue the held records whose wait is over to be sent again (at most the window's
        room); those the outbox no longer has were evicted while they waited: forgotten."""
        assert self._confirm is not None
        now = time.monotonic()
        room = self._window_room()
        due: list[int] = []
        while self._due and self._due[0][0] <= now and len(due) < room:
            at, record_id = heapq.heappop(self._due)
            held = self._held.get(record_id)
            if held is None or record_id not in self._waiting or held.due != at:
                continue  # confirmed, or sent again, since
            self._waiting.discard(record_id)
            # Unconfirmed for a whole wait: the next wait is twice as long (a consumer that
            # lags is not flooded); a resend after a new connection keeps the wait.
            held.interval = min(held.interval * 2, self._confirm.resend_max_s)
            due.append(record_id)
        if not due:
            return
        try:
            found = await self._outbox.records(due)
        except OutboxError as exc:
            log.warning("reading records to send again failed (%s); trying later", exc)
            for record_id in due:
                if record_id in self._held and record_id not in self._in_flight:
                    self._wait(record_id, self._held[record_id], now + self._retry_s)
            return
        present = {r.id for r in found}
        for record_id in due:
            if record_id not in present and record_id in self._held:
                self.stats.unconfirmed_evicted += 1
                self._forget(record_id)
        for record in found:
            if record.id in self._held and record.id not in self._in_flight:
                self._retry.append(record)

    def _abandon_in_flight(self) -> None:
        for fut, _, _ in self._in_flight.values():
            if not fut.done():
                fut.cancel()
        self._in_flight.clear()
        self._sent_times.clear()
        self._backlog_in_flight = 0

    def _delete_linger_left(self) -> float:
        if self._done_since is None:
            return self._delete_linger_s
        return self._done_since + self._delete_linger_s - time.monotonic()

    async def _flush_deletes(self) -> bool:
        """Delete what the broker acknowledged; False (ids kept for later) if the outbox can't."""
        if not self._done:
            return True
        ids, self._done = self._done, []
        since, self._done_since = self._done_since, None
        try:
            await self._outbox.delete(ids)
        except OutboxError as exc:
            self._done = ids + self._done
            self._done_since = since
            if not self._deletes_failing:
                log.warning("cannot delete delivered records from the outbox yet: %s", exc)
            self._deletes_failing = True
            return False
        self._unsettled.difference_update(ids)
        if self._deletes_failing:
            log.info("deleting delivered records from the outbox works again")
            self._deletes_failing = False
        return True
