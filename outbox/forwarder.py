"""Forward what an outbox holds to a broker: oldest first, deleted only after the broker's PUBACK.

The outbox owns every unacknowledged message; the MQTT client is only ever handed a window of
them (never more than the broker's Receive Maximum). On every new connection the forwarder starts
again from the oldest record still stored, because nothing the previous client had in flight is
known to have arrived: a record may reach the broker twice, never zero times. Consumers
deduplicate by the message ids inside the payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass

from mqtt_session import Disconnected, MqttSession, PublishFailed, PublishRejected
from outbox.async_outbox import AsyncOutbox
from outbox.errors import OutboxError
from outbox.record import Stored

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ForwarderStats:
    published: int = 0
    """PUBLISH packets handed to the client (resends after a reconnect count again)."""
    delivered: int = 0
    """Records the broker acknowledged (each is then deleted from the outbox)."""
    refused: int = 0
    """Records the broker or the client refused for good (e.g. an ACL); deleted and logged."""


class Forwarder:
    """Run :meth:`run` as a task beside the session; after every append call :meth:`offer`
    with what was stored (or :meth:`kick`).

    While nothing older waits in the outbox, offered records are published at once from memory,
    saving a read back through the outbox's thread (which is busy committing the next group);
    otherwise they are read in order like any backlog.
    """

    def __init__(
        self,
        outbox: AsyncOutbox,
        session: MqttSession,
        *,
        window: int = 256,
        delete_batch: int = 256,
        delete_linger_s: float = 0.5,
        retry_s: float = 1.0,
        max_rate_per_s: float | None = None,
    ) -> None:
        if window < 1 or delete_batch < 1:
            raise ValueError("window and delete_batch must be >= 1")
        if max_rate_per_s is not None and max_rate_per_s <= 0:
            raise ValueError("max_rate_per_s must be > 0 (or None for no cap)")
        # Drain-rate cap: a token bucket holding at most a tenth of a second's worth (>= 1).
        self._rate = max_rate_per_s
        self._burst = 1.0 if max_rate_per_s is None else max(1.0, max_rate_per_s / 10)
        self._tokens = self._burst
        self._refilled = time.monotonic()
        self._outbox = outbox
        self._session = session
        self._window = window
        self._delete_batch = delete_batch
        self._retry_s = retry_s
        self._delete_linger_s = delete_linger_s
        self._done_since: float | None = None
        self._deletes_failing = False
        self._wake = asyncio.Event()
        self._in_flight: dict[int, asyncio.Future[None]] = {}
        self._done: list[int] = []
        self._idle = asyncio.Event()
        self._serving = 0  # the connection _serve works for; 0 while none
        self._after = 0  # every record up to this id was sent on that connection
        self._at_tail = False  # the last read found nothing stored after _after
        self._kicks = 0  # appends announced by kick(), to tell whether a read is still the tail
        self.stats = ForwarderStats()

    def kick(self) -> None:
        """New records were appended: look at the outbox again."""
        self._at_tail = False
        self._kicks += 1
        self._idle.clear()
        self._wake.set()

    def offer(self, records: list[Stored]) -> None:
        """Records just appended, ids ascending: sent now if they are next in line, else read."""
        session = self._session
        room = min(self._window, session.broker_receive_maximum) - len(self._in_flight)
        if not (
            records
            and self._at_tail
            and records[0].id == self._after + 1
            and self._serving == session.connection
            and session.connected
            and room >= len(records)
            and self._tokens_now() >= len(records)
        ):
            self.kick()
            return
        self._spend(len(records))
        for record in records:
            self._send(record)
        self._after = records[-1].id
        self._idle.clear()

    def _tokens_now(self) -> float:
        """Publishes the drain-rate cap allows now (infinite without a cap)."""
        if self._rate is None:
            return float("inf")
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        return self._tokens

    def _spend(self, n: int) -> None:
        if self._rate is not None:
            self._tokens -= n

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def wait_idle(self) -> None:
        """Return once the outbox held nothing to send and nothing was in flight."""
        await self._idle.wait()

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

    async def _serve(self, connection: int) -> None:
        # A new connection resends everything still stored, oldest first.
        self._serving, self._after, self._at_tail = connection, 0, False
        try:
            await self._serve_loop(connection)
        finally:
            self._serving = 0

    async def _serve_loop(self, connection: int) -> None:
        while self._session.connected and self._session.connection == connection:
            self._wake.clear()
            room = min(self._window, self._session.broker_receive_maximum) - len(self._in_flight)
            batch: list[Stored] = []
            throttled_s: float | None = None
            if room > 0 and not self._at_tail and self._rate is not None:
                tokens = self._tokens_now()
                if tokens < 1:
                    throttled_s = (1 - tokens) / self._rate
                room = min(room, int(tokens))
            if room > 0 and not self._at_tail:
                kicks = self._kicks
                read = await self._outbox.pending(room, after_id=self._after)
                # offer() may have sent some of these while the read was under way.
                batch = [r for r in read if r.id > self._after]
                self._spend(len(batch))
                for record in batch:
                    self._send(record)
                    self._after = record.id
                if len(read) < room and kicks == self._kicks:
                    self._at_tail = True
            linger_left = self._delete_linger_left()
            if self._done and (len(self._done) >= self._delete_batch or linger_left <= 0):
                if not await self._flush_deletes():
                    # Delivered but not deletable (a full disk: deletes need log space too).
                    # Try again later; meanwhile the records are only resent after a reconnect.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._retry_s):
                            await self._wake.wait()
                continue
            if not batch:
                if not self._in_flight and throttled_s is None:
                    self._idle.set()
                wait_s = linger_left if self._done else None
                if throttled_s is not None:
                    wait_s = throttled_s if wait_s is None else min(wait_s, throttled_s)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._wake.wait()

    def _delete_linger_left(self) -> float:
        if self._done_since is None:
            return self._delete_linger_s
        return self._done_since + self._delete_linger_s - time.monotonic()

    async def flush(self) -> bool:
        """Delete what the broker has acknowledged now (e.g. before shutting down)."""
        return await self._flush_deletes()

    def _send(self, record: Stored) -> None:
        fut = self._session.publish_nowait(
            record.topic, record.payload, qos=record.qos, retain=record.retain
        )
        self.stats.published += 1
        self._in_flight[record.id] = fut
        fut.add_done_callback(functools.partial(self._settled, record.id))

    def _settled(self, record_id: int, fut: asyncio.Future[None]) -> None:
        if self._in_flight.get(record_id) is not fut:
            return  # from a connection we already gave up on
        del self._in_flight[record_id]
        exc = fut.exception()
        if exc is None:
            self.stats.delivered += 1
            self._mark_done(record_id)
        elif isinstance(exc, PublishRejected) or (
            isinstance(exc, PublishFailed) and not exc.transient
        ):
            # Retrying cannot help and would block everything behind it.
            self.stats.refused += 1
            log.error("dropping outbox record %d: %s", record_id, exc)
            self._mark_done(record_id)
        elif self._session.connected and self._serving == self._session.connection:
            # Not sent, yet the link is up (a transient client refusal): send it again.
            self._after = min(self._after, record_id - 1)
            self._at_tail = False
        self._wake.set()

    def _mark_done(self, record_id: int) -> None:
        if not self._done:
            self._done_since = time.monotonic()
        self._done.append(record_id)

    def _abandon_in_flight(self) -> None:
        for fut in self._in_flight.values():
            if not fut.done():
                fut.cancel()
        self._in_flight.clear()

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
        if self._deletes_failing:
            log.info("deleting delivered records from the outbox works again")
            self._deletes_failing = False
        return True
