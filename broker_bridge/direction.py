"""One direction of the bridge: take from the source broker, queue durably, forward to the far one.

A received message is acknowledged to its source broker only after the transaction holding it
has committed (group commit: everything received while one transaction runs goes into the next);
it leaves the queue only after the far broker's PUBACK (:class:`edgewise.outbox.Forwarder`).

When the queue is full it evicts (oldest first, messages before retained state) and says so:
:attr:`Lane.evicting` (the bridge's ``degraded: evicting``) from the first eviction until the
queue holds less than :data:`EVICTING_CLEARS_BELOW` of its budget again, and a log line with
what was evicted per rule, at most every :data:`EVICTION_LOG_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass

from broker_bridge.acks import ResultConfirmer
from broker_bridge.echo import EchoLedger
from broker_bridge.rules import CompiledRule, Direction, first_match, maker
from edgewise.mqtt import Inbound, MqttSession
from edgewise.outbox import AsyncOutbox, Forwarder, OutboxError, Record, StorageFull

log = logging.getLogger(__name__)

#: Queue record kinds, evicted first → last: a retained message is state, kept longest.
KIND_MESSAGE = "message"
KIND_RETAINED = "retained"
EVICTION_ORDER = (KIND_MESSAGE, KIND_RETAINED)
#: ``evicting`` clears once the queue holds less than this share of its budget: room for new
#: messages again, with some hysteresis so that a queue at its bound does not flap.
EVICTING_CLEARS_BELOW = 0.9
#: Seconds between two log lines about evictions (the first one of an episode comes at once).
EVICTION_LOG_INTERVAL_S = 10.0
#: How logs name records whose topic no rule gives (the rules changed since they were queued).
NO_RULE = "(no rule)"

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
        self.evicting = False  # since an eviction, until the queue is below its bound again
        self.evicted_by_rule: Counter[str] = Counter()  # since start, by rule label
        self._unlogged: Counter[str] = Counter()  # evicted since the last log line
        self._episode: Counter[str] = Counter()  # evicted since evicting began
        self._logged_at = 0.0
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
        # End-to-end mode (ADR 0078): told what was queued, to confirm it to its node.
        self.confirmer: ResultConfirmer | None = None

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

    def _classify(self, batch: list[Inbound]) -> list[tuple[Inbound, Record]]:
        records: list[tuple[Inbound, Record]] = []
        now = time.monotonic()
        for message in batch:
            try:
                record = self._record_of(message, now)
            except Exception as exc:  # a bug must not stop the lane
                self._failed(1, "classify", exc)
                continue
            if record is not None:
                records.append((message, record))
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
        taken = self._classify(batch)
        # In transactions of at most the queue's transaction size, so that the WAL stays within
        # its share of the bound at every instant (the messages of a batch need not be atomic:
        # they are acknowledged once all are stored).
        for chunk in _chunks(taken, self.outbox.max_txn_bytes):
            records = [record for _, record in chunk]
            try:
                ids = await self._append(records)
            except Exception as exc:
                self._failed(len(chunk), "store", exc)
            else:
                self.stats.queued += len(chunk)
                self._offer(records, ids)
                self._confirm(chunk, evicted=ids is None)
        source = self.source
        if source is not None:
            for message in batch:
                try:
                    source.ack(message)
                except Exception as exc:  # the broker redelivers it after a reconnect
                    self.stats.ack_failures += 1
                    log.error("%s: acknowledging a message failed: %s", self.direction, exc)

    def _confirm(self, chunk: list[tuple[Inbound, Record]], *, evicted: bool) -> None:
        """End-to-end mode: tell the nodes what is queued now. Not what an append that evicted
        queued: it may have evicted those very records (their nodes send them again)."""
        confirmer = self.confirmer
        if confirmer is None:
            return
        try:
            if evicted:
                confirmer.withheld(len(chunk))
            else:
                confirmer.queued([message for message, _ in chunk])
        except Exception as exc:  # queued all the same: the nodes send them again
            log.error("%s: confirming queued results failed: %s", self.direction, exc)

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
            if self._evicted() == before:
                return ids
            await self._note_evictions()
            return None

    def _evicted(self) -> int:
        return self.outbox.stats().evicted_total

    # -- evictions -----------------------------------------------------------------------------

    async def _note_evictions(self) -> None:
        """Count what the queue evicted per rule; say ``evicting``; log (rate-limited)."""
        by_rule: Counter[str] = Counter()
        for topic, n in (await self.outbox.take_evicted_topics()).items():
            rule = maker(self.rules, topic)
            by_rule[NO_RULE if rule is None else rule.label] += n
        if not by_rule:
            return
        self.evicted_by_rule.update(by_rule)
        self._unlogged.update(by_rule)
        self._episode.update(by_rule)
        now = time.monotonic()
        if not self.evicting or now - self._logged_at >= EVICTION_LOG_INTERVAL_S:
            stats = self.outbox.stats()
            log.warning(
                "%s queue full (%d records, %d of %d bytes): %s %d (%s); %d since start",
                self.direction,
                stats.rows,
                stats.bytes,
                stats.budget_bytes,
                "evicted" if not self.evicting else "still evicting, evicted",
                self._unlogged.total(),
                _per_rule(self._unlogged),
                self.evicted_by_rule.total(),
            )
            self._unlogged.clear()
            self._logged_at = now
        self.evicting = True

    def check_evicting(self) -> bool:
        """Clear :attr:`evicting` once the queue is below its bound again; the current value."""
        if not self.evicting:
            return False
        stats = self.outbox.stats()
        if stats.bytes >= EVICTING_CLEARS_BELOW * stats.budget_bytes:
            return True
        log.warning(
            "%s queue below its bound again (%d of %d bytes) after evicting %d (%s)",
            self.direction,
            stats.bytes,
            stats.budget_bytes,
            self._episode.total(),
            _per_rule(self._episode),
        )
        self._unlogged.clear()
        self._episode.clear()
        self.evicting = False
        return False


def _chunks(
    taken: list[tuple[Inbound, Record]], max_bytes: int
) -> list[list[tuple[Inbound, Record]]]:
    chunks: list[list[tuple[Inbound, Record]]] = []
    size = 0
    for pair in taken:
        record = pair[1]
        n = len(record.topic) + len(record.payload)
        if not chunks or size + n > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(pair)
        size += n
    return chunks


def _per_rule(counts: Counter[str]) -> str:
    return ", ".join(f"{rule}: {n}" for rule, n in counts.most_common())
