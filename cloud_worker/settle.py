"""Settling a message: reply with the verdicts of its answered cases, and acknowledge the
escalation (in arrival order, :class:`~edgewise.serving.acks.InOrderAcker`) only once the reply
has its PUBACK and the message's hard-example rows are committed: a worker that dies leaves its
unanswered work unacknowledged, and the broker hands it out again."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from cloud_worker import reply_topic
from cloud_worker.jobs import Message
from cloud_worker.stats import WorkerStats
from edgewise.mqtt import MqttError, MqttSession, PublishProperties
from edgewise.mqtt.properties import expiry_interval_s
from edgewise.serving.acks import InOrderAcker
from schemas import CaseVerdict, ReplyBatch, encode_replies

log = logging.getLogger(__name__)


class Settler:
    """Replies, then acknowledges once the reply and the rows are durable."""

    def __init__(
        self, worker_id: str, *, session: MqttSession, acker: InOrderAcker, stats: WorkerStats
    ) -> None:
        self.worker_id = worker_id
        self.session = session
        self.acker = acker
        self.stats = stats
        self.settling: set[Message] = set()
        """Messages replied to, waiting for their reply's PUBACK and their rows' commits."""
        self.all_settled = asyncio.Event()
        self.all_settled.set()

    def settle(self, message: Message) -> None:
        """None of ``message``'s cases waits any more: reply now, acknowledge once the reply
        has its PUBACK and the message's rows are committed (callbacks on those futures, not a
        task per message: a task's creation and steps cost more than the rest of this). A reply
        that cannot be made or sent (a bug, a fault) leaves the cases unanswered (the node
        falls back at their deadlines); the message is acknowledged all the same."""
        try:
            send, verdicts = self._reply(message)
        except Exception as exc:
            self.stats.failures["reply"] += 1
            self.stats.reply_failures += 1
            log.error(
                "reply to %s not sent (%d cases unanswered): %s: %s",
                message.batch.node,
                len(message.answered),
                type(exc).__name__,
                exc,
            )
            send, verdicts = None, 0
        # A commit can cover several of the message's groups: each future once.
        message.stored = list({id(f): f for f in message.stored}.values())
        waits = message.stored if send is None else [*message.stored, send]
        message.unsettled = len(waits)
        if not waits:
            self._acknowledge(message, send, verdicts)
            return
        self.settling.add(message)
        self.all_settled.clear()
        done = functools.partial(self._step, message, send, verdicts)
        for fut in waits:
            fut.add_done_callback(done)

    def _step(
        self,
        message: Message,
        send: asyncio.Future[None] | None,
        verdicts: int,
        _done: asyncio.Future[Any],
    ) -> None:
        message.unsettled -= 1
        if message.unsettled:
            return
        self.settling.discard(message)
        if not self.settling:
            self.all_settled.set()
        self._acknowledge(message, send, verdicts)

    def _reply(self, message: Message) -> tuple[asyncio.Future[None] | None, int]:
        """Publish the reply with the verdicts of ``message``'s answered cases that are still
        in time; returns its PUBACK future (None: nothing to send) and its verdict count."""
        batch = message.batch
        if not batch.wants_reply:
            self.stats.uploads += len(message.answered)
            return None, 0
        now = time.time()
        verdicts: list[CaseVerdict] = []
        for esc, answer in message.answered:
            deadline = esc.deadline
            if deadline is not None and now > deadline:  # esc.expired(now)
                self.stats.expired += 1
                continue
            assert esc.corr is not None
            verdicts.append(
                CaseVerdict(esc.id, esc.corr, answer.label, answer.confidence, answer.model)
            )
        if not verdicts:
            return None, 0
        return self._send_reply(message, verdicts), len(verdicts)

    def _acknowledge(
        self, message: Message, send: asyncio.Future[None] | None, verdicts: int
    ) -> None:
        """The reply's PUBACK and the rows' commits are in (every future is done): count how
        they went and acknowledge the escalation, unless the connection dropped first."""
        ok = True
        for stored in message.stored:
            if stored.cancelled():
                return  # the store shut down under it: the broker hands it out again
            exc = stored.exception()
            if exc is not None:
                self.stats.store_errors += 1
                log.error("hard examples not stored: %s", exc)
        if send is not None:
            if send.cancelled():
                return
            if send.exception() is not None:
                ok = False
                self.stats.reply_failures += 1
            else:
                self.stats.replies += 1
                self.stats.verdicts += verdicts
        if ok or self.session.connected:
            # Delivered, or refused for good on a live connection (retrying cannot help).
            self.acker.finish(message.ticket)
        # else: the connection dropped; the broker redelivers the escalation on the next one.

    def _send_reply(self, message: Message, verdicts: list[CaseVerdict]) -> asyncio.Future[None]:
        batch = message.batch
        assert batch.reply_to is not None and batch.corr is not None
        reply = ReplyBatch(
            node=batch.node,
            corr=batch.corr,
            worker=self.worker_id,
            ts=time.time(),
            verdicts=verdicts,
        )
        topic = batch.reply_to
        props: PublishProperties | None = None
        if self.session.protocol == "5":
            inbound = message.msg.properties
            corr = batch.corr.encode()
            if inbound is not None:
                corr = getattr(inbound, "CorrelationData", None) or corr
                response_topic = getattr(inbound, "ResponseTopic", None)
                if isinstance(response_topic, str) and reply_topic.is_reply_topic(
                    response_topic, batch.node
                ):
                    topic = response_topic
            deadlines = [e.deadline for e, _ in message.answered if e.deadline is not None]
            # Clamped to what the wire carries, whatever deadline the escalation named.
            expiry = expiry_interval_s(max(deadlines) - time.time()) if deadlines else None
            props = PublishProperties(correlation_data=corr, message_expiry_interval_s=expiry)
        payload = encode_replies(reply)
        try:
            return self.session.publish_nowait(topic, payload, qos=1, properties=props)
        except MqttError as exc:  # pragma: no cover - publish_nowait reports through the future
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
            return fut
