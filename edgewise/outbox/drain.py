"""The drain loop of a :class:`edgewise.outbox.Forwarder`: one connection at a time, it sends
what is offered live, then the backlog (oldest first, at a capped rate), and settles each
record at its PUBACK.

On every new connection the loop starts again from the oldest record still stored (nothing the
previous client had in flight is known to have arrived); what was stored after the link was last
known down goes first (ADR 0007). A record the broker refuses for good is deleted and logged; one
the client refused for a moment is sent again. The loop's state is made by
:class:`edgewise.outbox.Forwarder`, which adds what callers use (offers, confirmations).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque

from edgewise.mqtt import Disconnected, MqttSession, PublishFailed, PublishRejected
from edgewise.outbox.async_outbox import AsyncOutbox
from edgewise.outbox.confirmation import Confirmation, HeldRecords
from edgewise.outbox.errors import OutboxError
from edgewise.outbox.forwarder_stats import ForwarderStats
from edgewise.outbox.rate import TokenBucket
from edgewise.outbox.record import Stored
from edgewise.outbox.settling import Settlement

log = logging.getLogger(__name__)


class DrainLoop:
    """The loop and the sending side of a forwarder (its state: :class:`Forwarder`'s init)."""

    stats: ForwarderStats
    _total: TokenBucket  # everything sent
    _drain: TokenBucket  # the backlog
    _kinds: frozenset[str] | None
    _exclude_kinds: frozenset[str] | None
    _live_first: bool
    _outbox: AsyncOutbox
    _session: MqttSession
    _window: int
    _retry_s: float
    _wake: asyncio.Event
    _idle: asyncio.Event
    _in_flight: dict[int, tuple[asyncio.Future[None], Stored, bool]]
    _sent_times: dict[int, float]
    _backlog_in_flight: int
    _settling: Settlement
    _serving: int
    _live: deque[Stored]
    _claimed: set[int]
    _retry: deque[Stored]
    _after: int
    _at_tail: bool
    _kicks: int
    _fresh_since: float | None
    _fresh_from: int
    _confirm: Confirmation | None
    _held: HeldRecords
    _blocked: bool

    async def run(self) -> None:
        while True:
            await self._session.wait_connected()
            connection = self._session.connection
            await self._settling.flush()
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
            await self._settling.flush()

    async def _serve(self, connection: int) -> None:
        # A new connection resends everything still stored, oldest first, as backlog; what was
        # stored after the link was last known down goes first.
        self._live.clear()
        self._claimed.clear()
        self._retry.clear()
        settling = self._settling
        settling.unsettled.difference_update(settling.guarded)
        settling.guarded.clear()
        self._after, self._at_tail = 0, False
        self._held.confirmed_in_flight.clear()
        self._blocked = False
        self._held.rewait_all()
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
            if record.id not in self._settling.unsettled:
                self._settling.unsettled.add(record.id)
                self._settling.guarded.add(record.id)
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
            next_due = self._held.next_due()
            if next_due is not None and next_due <= time.monotonic() and self._window_room() > 0:
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
            linger_left = self._settling.linger_left()
            if self._settling.batch_due(linger_left):
                if not await self._settling.flush():
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
            if self._settling.done:
                wait_s = linger_left if wait_s is None else min(wait_s, linger_left)
            next_due = self._held.next_due()
            if next_due is not None and self._window_room() > 0:  # (full: a PUBACK wakes it)
                due_s = max(0.0, next_due - time.monotonic())
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
            if self._confirm is not None and record.id not in self._held.held and self._room() <= 0:
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
            self._held.hold(record)
        self._settling.unsettled.add(record.id)
        self._settling.guarded.discard(record.id)  # protected as sent from now on
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
            held = self._held
            if held.confirmed_in_flight and record_id in held.confirmed_in_flight:
                held.confirmed_in_flight.discard(record_id)  # confirmed first: deleted already
            elif record_id in held.held:
                # It waits for its consumer's confirmation, sent again when due; not protected
                # from eviction while it waits (it may wait long: ADR 0078).
                held.acknowledged(record_id)
                self._settling.unsettled.discard(record_id)
            else:
                self._settling.mark_done(record_id)
        elif isinstance(exc, PublishRejected) or (
            isinstance(exc, PublishFailed) and not exc.transient
        ):
            # Retrying cannot help and would block everything behind it.
            self.stats.refused += 1
            log.error("dropping outbox record %d: %s", record_id, exc)
            self._held.forget(record_id)
            self._settling.mark_done(record_id)
        elif self._session.connected and self._serving == self._session.connection:
            # Not sent, yet the link is up (a transient client refusal): send it again.
            self._retry.append(record)
        self._wake.set()

    # ------------------------------------------------------------------ end-to-end mode
    async def _resend_due(self) -> None:
        """Queue the held records whose wait is over to be sent again (at most the window's
        room); those the outbox no longer has were evicted while they waited: forgotten."""
        now = time.monotonic()
        due = self._held.take_due(now, self._window_room())
        if not due:
            return
        try:
            found = await self._outbox.records(due)
        except OutboxError as exc:
            log.warning("reading records to send again failed (%s); trying later", exc)
            for record_id in due:
                if record_id in self._held.held and record_id not in self._in_flight:
                    self._held.retry_at(record_id, now + self._retry_s)
            return
        present = {r.id for r in found}
        for record_id in due:
            if record_id not in present and record_id in self._held.held:
                self.stats.unconfirmed_evicted += 1
                self._held.forget(record_id)
        for record in found:
            if record.id in self._held.held and record.id not in self._in_flight:
                self._retry.append(record)

    def _abandon_in_flight(self) -> None:
        for fut, _, _ in self._in_flight.values():
            if not fut.done():
                fut.cancel()
        self._in_flight.clear()
        self._sent_times.clear()
        self._backlog_in_flight = 0
