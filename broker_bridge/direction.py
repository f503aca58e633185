"""One direction of the bridge: take from the source broker, queue durably, forward to the far one.

A received message is acknowledged to its source broker only after the transaction holding it
has committed (group commit: everything received while one transaction runs goes into the next);
it leaves the queue only after the far broker's PUBACK (:class:`outbox.Forwarder`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from broker_bridge.echo import EchoLedger
from broker_bridge.rules import CompiledRule, Direction, first_match
from mqtt_session import Inbound, MqttSession
from outbox import AsyncOutbox, Forwarder, OutboxError, Record, StorageFull

log = logging.getLogger(__name__)

#: Queue record kinds, evicted first → last: a retained message is state, kept longest.
KIND_MESSAGE = "message"
KIND_RETAINED = "retained"
EVICTION_ORDER = (KIND_MESSAGE, KIND_RETAINED)

_TOPIC_MAX_BYTES = 65_535
"""The longest topic MQTT carries (a two-byte length), UTF-8 encoded."""
_TOPIC_MAX_CHARS = _TOPIC_MAX_BYTES // 4
"""Topics of at most this many characters fit whatever they hold (4 bytes a character)."""


@dataclass(slots=True)
class DirectionStats:
    received: int = 0
    queued: int = 0
    echoes_dropped: int = 0
    oversize_dropped: int = 0
    unmatched: int = 0
    queue_errors: int = 0
    failed: int = 0
    """Messages dropped (and acknowledged) because a stage failed unexpectedly."""
    ack_failures: int = 0
    """Acknowledgements the session refused (the broker sends those messages again)."""


class Lane:
    """The pipeline of one direction. The bridge wires its sessions in, then runs :meth:`pump`."""

    def __init__(
        self,
        direction: Direction,
        rules: list[CompiledRule],
        outbox: AsyncOutbox,
        *,
        max_payload_bytes: int,
        max_batch: int,
        max_pending: int,
        retry_s: float = 1.0,
    ) -> None:
        self.direction = direction
        self.rules = rules
        self.outbox = outbox
        self.stats = DirectionStats()
        self.storage_error: str | None = None  # why the last append failed, until one works
        self._max_payload = max_payload_bytes
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._retry_s = retry_s
        self._intake: deque[Inbound] = deque()
        self._closed = False
        self._wake = asyncio.Event()
        self._busy = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.source: MqttSession | None = None
        self.target: MqttSession | None = None
        self.forwarder: Forwarder | None = None
        # Echo suppression on MQTT 3.1.1: what our publishes on the source broker looked like.
        self.source_ledger: EchoLedger | None = None

    def attach(
        self,
        source: MqttSession,
        target: MqttSession,
        forwarder: Forwarder,
        source_ledger: EchoLedger,
    ) -> None:
        self.source, self.target, self.forwarder = source, target, forwarder
        self.source_ledger = source_ledger

    # -- on the event loop, from the source session ------------------------------------------

    def close_intake(self) -> None:
        """Stop taking messages (shutdown): later ones stay unacknowledged at the source broker,
        which delivers them again to our persistent session next time."""
        self._closed = True

    def receive(self, message: Inbound) -> None:
        """The source session's message handler: queue it for the pump; pause reading if full."""
        if self._closed:
            return
        self.stats.received += 1
        self._intake.append(message)
        self._idle.clear()
        self._wake.set()
        if len(self._intake) >= self._max_pending and self.source is not None:
            self.source.pause_reading()

    @property
    def pending(self) -> int:
        return len(self._intake)

    async def wait_drained(self) -> None:
        """Return once everything received so far is queued and acknowledged."""
        while self._intake or self._busy:
            self._idle.clear()
            await self._idle.wait()

    # -- the pump ----------------------------------------------------------------------------

    async def pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._intake:
                n = min(len(self._intake), self._max_batch)
                batch = [self._intake.popleft() for _ in range(n)]
                self._busy = True
                try:
                    await self._take(batch)
                finally:
                    self._busy = False
                source = self.source
                if (
                    source is not None
                    and source.reading_paused
                    and len(self._intake) < self._max_pending // 2
                ):
                    source.resume_reading()
            self._idle.set()

    def _classify(self, batch: list[Inbound]) -> list[Record]:
        records: list[Record] = []
        now = time.monotonic()
        for message in batch:
            try:
                record = self._record_of(message, now)
            except Exception as exc:  # a bug must not stop the lane
                self._failed(1, "classify", exc)
                continue
            if record is not None:
                records.append(record)
        return records

    def _failed(self, n: int, stage: str, exc: Exception) -> None:
        self.stats.failed += n
        log.error(
            "%s: %d message(s) dropped at %s: %s: %s",
            self.direction,
            n,
            stage,
            type(exc).__name__,
            exc,
        )

    def _record_of(self, message: Inbound, now: float) -> Record | None:
        """The queue record of ``message``, or None (an echo, too big, no rule: counted)."""
        ledger = self.source_ledger
        if (
            ledger is not None
            and len(ledger)
            and ledger.is_echo(message.topic, message.payload, now)
        ):
            self.stats.echoes_dropped += 1
            return None
        if len(message.payload) > self._max_payload:
            self.stats.oversize_dropped += 1
            log.warning(
                "%s: not forwarding %d-byte message on %r (max_payload_bytes is %d)",
                self.direction,
                len(message.payload),
                message.topic,
                self._max_payload,
            )
            return None
        found = first_match(self.rules, message.topic)
        if found is None:
            self.stats.unmatched += 1
            return None
        rule, dest = found
        if len(dest) > _TOPIC_MAX_CHARS and len(dest.encode()) > _TOPIC_MAX_BYTES:
            # A template's prefix made it longer than MQTT can carry: it could never go.
            self.stats.oversize_dropped += 1
            log.warning(
                "%s: not forwarding a message on %r: its destination is longer than %d bytes",
                self.direction,
                message.topic[:128],
                _TOPIC_MAX_BYTES,
            )
            return None
        retain = message.retain and rule.retain
        return Record(
            kind=KIND_RETAINED if retain else KIND_MESSAGE,
            topic=dest,
            payload=message.payload,
            qos=min(rule.qos, message.qos),
            retain=retain,
        )

    async def _take(self, batch: list[Inbound]) -> None:
        """Queue ``batch`` and acknowledge it. A stage that fails unexpectedly (a bug, a
        fault) drops what it held, counted in ``failed``; the batch is acknowledged all the
        same, so the source broker's in-flight window never fills with messages we hold."""
        records = self._classify(batch)
        if records:
            try:
                ids = await self._append(records)
            except Exception as exc:
                self._failed(len(records), "store", exc)
            else:
                self.stats.queued += len(records)
                self._offer(records, ids)
        source = self.source
        if source is not None:
            for message in batch:
                try:
                    source.ack(message)
                except Exception as exc:  # the broker redelivers it after a reconnect
                    self.stats.ack_failures += 1
                    log.error("%s: acknowledging a message failed: %s", self.direction, exc)

    def _offer(self, records: list[Record], ids: list[int] | None) -> None:
        forwarder = self.forwarder
        if forwarder is None:
            return
        try:
            if ids is None:
                forwarder.kick()
            else:
                now = time.time()
                forwarder.offer([r.stored(i, now) for r, i in zip(records, ids, strict=True)])
        except Exception as exc:  # queued all the same: the forwarder reads them from there
            log.error("%s: handing records to the forwarder failed: %s", self.direction, exc)
            forwarder.kick()

    async def _append(self, records: list[Record]) -> list[int] | None:
        """Append until it works; the ids, or None if the append evicted (read them back)."""
        while True:
            before = self._evicted()
            try:
                ids = await self.outbox.append(records)
            except OutboxError as exc:
                self.stats.queue_errors += 1
                reason = "storage_full" if isinstance(exc, StorageFull) else "queue_error"
                if self.storage_error != reason:
                    log.error("%s queue: append failed (%s); retrying", self.direction, exc)
                self.storage_error = reason
                await asyncio.sleep(self._retry_s)
                continue
            if self.storage_error is not None:
                log.info("%s queue: appends work again", self.direction)
                self.storage_error = None
            # An append that evicted may have evicted some of its own records: never send
            # those from memory (what was evicted must be exactly what is missing downstream).
            return ids if self._evicted() == before else None

    def _evicted(self) -> int:
        return self.outbox.stats().evicted_total
