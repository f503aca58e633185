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
    """Run :meth:`run` as a task beside the session; call :meth:`kick` after every append."""

    def __init__(
        self,
        outbox: AsyncOutbox,
        session: MqttSession,
        *,
        window: int = 256,
        delete_batch: int = 256,
        retry_s: float = 1.0,
    ) -> None:
        if window < 1 or delete_batch < 1:
            raise ValueError("window and delete_batch must be >= 1")
        self._outbox = outbox
        self._session = session
        self._window = window
        self._delete_batch = delete_batch
        self._retry_s = retry_s
        self._deletes_failing = False
        self._wake = asyncio.Event()
        self._in_flight: dict[int, asyncio.Future[None]] = {}
        self._done: list[int] = []
        self._idle = asyncio.Event()
        self.stats = ForwarderStats()

    def kick(self) -> None:
        """New records were appended: look at the outbox again."""
        self._idle.clear()
        self._wake.set()

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
        after = 0  # a new connection resends everything still stored, oldest first
        while self._session.connected and self._session.connection == connection:
            self._wake.clear()
            room = min(self._window, self._session.broker_receive_maximum) - len(self._in_flight)
            batch: list[Stored] = []
            if room > 0:
                batch = await self._outbox.pending(room, after_id=after)
                for record in batch:
                    self._send(record)
                    after = record.id
            if len(self._done) >= self._delete_batch or (not batch and self._done):
                if not await self._flush_deletes():
                    # Delivered but not deletable (a full disk: deletes need log space too).
                    # Try again later; meanwhile the records are only resent after a reconnect.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._retry_s):
                            await self._wake.wait()
                continue
            if not batch:
                if not self._in_flight:
                    self._idle.set()
                await self._wake.wait()

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
            self._done.append(record_id)
        elif isinstance(exc, PublishRejected | PublishFailed):
            # Retrying cannot help and would block everything behind it.
            self.stats.refused += 1
            log.error("dropping outbox record %d: %s", record_id, exc)
            self._done.append(record_id)
        self._wake.set()

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
        try:
            await self._outbox.delete(ids)
        except OutboxError as exc:
            self._done = ids + self._done
            if not self._deletes_failing:
                log.warning("cannot delete delivered records from the outbox yet: %s", exc)
            self._deletes_failing = True
            return False
        if self._deletes_failing:
            log.info("deleting delivered records from the outbox works again")
            self._deletes_failing = False
        return True
