"""Outbound: everything the node sends goes into the outbox, then to a forwarder.

:meth:`Outbound.store_and_offer` is the one way in: append the record (with the frames it
answers) in one outbox transaction; once it is durable, run the caller's ``on_durable`` (where
the result path acknowledges the frames), then offer the stored record to the forwarder of its
kind (``to_uplink``), which publishes it and deletes it on the broker's PUBACK. Results have a
forwarder of their own in end-to-end mode (docs/adr/0078-end-to-end-acks.md).

Events (dead letters, update events) and telemetry windows go the same way; if the outbox
cannot take one, it is published directly, without a durable copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from edge_node.config import EndToEndConfig, StorageConfig
from edge_node.deadletter import DeadLetters
from edge_node.errors import ConfigError
from edge_node.escalation import HARD_EXAMPLE
from edge_node.stats import NodeStats, plural
from edge_node.status import NodeStatus
from edgewise.mqtt import Inbound, MqttSession
from edgewise.outbox import AsyncOutbox, Confirmation, Forwarder, Record, Stored
from schemas import ContractError, Limits, decode_acks, decode_results, message_id

log = logging.getLogger(__name__)

#: The record kind of results messages (what end-to-end mode holds until confirmed).
RESULT = "result"


def _message_id_of(record: Stored) -> str:
    """The id a consumer confirms a stored results message by (:func:`schemas.message_id`)."""
    return message_id(decode_results(record.payload))


def forwarders(
    outbox: AsyncOutbox, uplink: MqttSession, storage: StorageConfig, e2e: EndToEndConfig
) -> tuple[Forwarder, Forwarder]:
    """The forwarder of everything but results in end-to-end mode, and that of results (the
    same one unless end-to-end mode is on: docs/adr/0078-end-to-end-acks.md). In end-to-end
    mode results go through a forwarder of their own that holds each until its consumer
    confirms it on edge/{node}/acks; the rest (telemetry, events) never waits behind them."""
    held = frozenset({RESULT}) if e2e.enabled else frozenset()
    to_uplink = Forwarder(
        outbox,
        uplink,
        window=storage.uplink_window,
        drain_max_per_s=storage.drain_max_msgs_per_s,
        exclude_kinds=frozenset({HARD_EXAMPLE}) | held,  # the escalator's sends those
    )
    if not e2e.enabled:
        return to_uplink, to_uplink
    results_to_uplink = Forwarder(
        outbox,
        uplink,
        window=storage.uplink_window,
        drain_max_per_s=storage.drain_max_msgs_per_s,
        kinds=held,
        confirmation=Confirmation(
            kinds=held,
            key=_message_id_of,
            resend_after_s=e2e.resend_after_s,
            resend_max_s=e2e.resend_max_s,
            max_unconfirmed=e2e.max_unconfirmed,
        ),
    )
    return to_uplink, results_to_uplink


class Tasks:
    """The node's background stores: what a drain waits for."""

    def __init__(self) -> None:
        self.running: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self.running)

    def start(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return task


class Outbound:
    """The outbox and its forwarders, seen from the parts of the node that send."""

    def __init__(
        self,
        outbox: AsyncOutbox,
        uplink: MqttSession,
        storage: StorageConfig,
        e2e: EndToEndConfig,
        tasks: Tasks,
    ) -> None:
        self.outbox = outbox
        self._uplink = uplink
        self.to_uplink, self.results_to_uplink = forwarders(outbox, uplink, storage, e2e)
        self.forwarders = list(dict.fromkeys([self.to_uplink, self.results_to_uplink]))
        """Each forwarder once (one for everything unless end-to-end mode is on)."""
        self._tasks = tasks
        # Events made off the event loop (the updater's boot runs in a thread, before the
        # outbox is open): stored from the loop once it can (deque: thread-safe append/pop).
        self._offloop_events: deque[Record] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.is_open = False

    async def store_and_offer(
        self,
        record: Record,
        answered: Sequence[tuple[str, str]] = (),
        *,
        on_durable: Callable[[], None] | None = None,
    ) -> Exception | None:
        """Append ``record`` (and the frame keys it answers) in one transaction; once durable,
        run ``on_durable``, then offer the record to the forwarder of its kind. If the append
        fails, return why (nothing was stored, nothing offered)."""
        try:
            (record_id,) = await self.outbox.append([record], answered)
        except Exception as exc:  # OutboxError, or anything unexpected: the caller decides
            return exc
        if on_durable is not None:
            on_durable()
        forwarder = self.results_to_uplink if record.kind == RESULT else self.to_uplink
        forwarder.offer([record.stored(record_id, time.time())])
        return None

    async def send(self, record: Record) -> Exception | None:
        """Store and offer one record. If the outbox cannot take it, publish it directly (no
        durable copy) and return why."""
        failed = await self.store_and_offer(record)
        if failed is not None:
            fut = self._uplink.publish_nowait(
                record.topic, record.payload, qos=record.qos, retain=record.retain
            )
            fut.add_done_callback(lambda f: f.exception())
        return failed

    async def open(self, stack: contextlib.AsyncExitStack, status: NodeStatus, path: Path) -> None:
        """Open the outbox at ``path`` (closed with ``stack``), say what it holds from earlier
        runs, and store the events made off the loop so far, and from now on."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"storage.state_dir {path.parent} cannot be created: {exc}") from None
        await stack.enter_async_context(self.outbox)
        self._opened()
        stored = self.outbox.stats()
        if self.outbox.recovered_from is not None:
            # Said in the status until the next start, so that someone looks at the file.
            status.reasons.append("outbox_corrupt")
            log.error(
                "the outbox was unreadable: kept it as %s and started a fresh one",
                self.outbox.recovered_from,
            )
        log.info(
            "outbox %s: %s waiting from earlier runs; %s remembered",
            path,
            plural(stored.rows, "record")
            + (f" ({stored.bytes - stored.answered_bytes} bytes)" if stored.rows else ""),
            plural(stored.answered_keys, "answered frame"),
        )

    def _opened(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.is_open = True
        self._store_offloop_events()

    def store_event(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Dead letters and update events go through the outbox like results."""
        record = Record("event", topic, payload, retain=retain)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # another thread: the updater's boot, before the outbox is open
            self._offloop_events.append(record)
            if self._loop is not None and self.is_open:
                self._loop.call_soon_threadsafe(self._store_offloop_events)
            return
        # Storage trouble is reported by the results and telemetry paths; send it anyway.
        self._tasks.start(self._send_event(record))

    async def _send_event(self, record: Record) -> None:
        await self.send(record)

    def _store_offloop_events(self) -> None:
        while self._offloop_events:
            record = self._offloop_events.popleft()
            self.store_event(record.topic, record.payload, retain=record.retain)


class Confirmations:
    """End-to-end mode: the consumer's confirmations (``edge/{node}/acks``, on the uplink's
    connection) let the results forwarder delete what they name. Capped, schema-checked; a bad
    one is counted and dead-lettered (rate-capped), never raised."""

    def __init__(
        self,
        uplink: MqttSession,
        topic: str,
        results_to_uplink: Forwarder,
        limits: Limits,
        stats: NodeStats,
        deadletters: DeadLetters,
    ) -> None:
        self._uplink = uplink
        self.topic = topic
        self._results_to_uplink = results_to_uplink
        self._limits = limits
        self._stats = stats
        self._deadletters = deadletters

    def on_message(self, msg: Inbound) -> None:
        """A message on the uplink's connection: only confirmations are subscribed there."""
        try:
            if msg.topic == self.topic:
                self._confirm(msg)
        finally:
            self._uplink.ack(msg)

    def _confirm(self, msg: Inbound) -> None:
        try:
            acks = decode_acks(msg.payload, self._limits)
        except ContractError as exc:
            self._stats.acks_rejected += 1
            self._deadletters.reject(msg.topic, msg.payload, exc.reason, exc.detail)
            return
        self._stats.acks_received += 1
        self._results_to_uplink.confirm(acks.ids)
