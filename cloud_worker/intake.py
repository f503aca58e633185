"""Intake: escalation messages in, cases out to their model's batcher, in arrival order.

Per message: size cap, decode and validate (rejects counted, per message; the message is
acknowledged at once). Per case: drop it if expired (the broker drops a whole message earlier
when its MQTT 5 message expiry, the earliest deadline, has passed; the payload's deadlines cover
MQTT 3.1.1), answer a duplicate case id with the answer already given (bounded in-memory cache;
the store is asked later, per batch), join a copy still in progress, else queue it for its
model's batcher. While a model has :data:`QUEUED_BATCHES_MAX` batches' worth of cases waiting,
messages wait undecoded and reading from the broker pauses.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from cloud_worker import reply_topic
from cloud_worker.cache import BoundedCache
from cloud_worker.jobs import NO_COPIES, Job, Message
from cloud_worker.stats import WorkerStats
from cloud_worker.store import Answer
from edgewise.mqtt import Inbound, MqttSession
from edgewise.serving.acks import InOrderAcker, Ticket
from edgewise.serving.batcher import MicroBatcher
from schemas import ContractError, Limits, Topics, decode_escalations, log_text

log = logging.getLogger(__name__)

QUEUED_BATCHES_MAX = 4
"""Intake stops while a model has cases for this many full batches waiting to be batched, and
goes on as batches are formed: messages received meanwhile wait, undecoded, in arrival order,
and reading from the broker pauses (it resumes once they are taken and half of this is left).
Taking in everything the socket holds would otherwise keep the event loop on intake for as long
as the broker has messages queued (paho reads as many packets per call as replies are in
flight, a few hundred µs of decoding and bookkeeping each), while the handler idles for want
of its next batch (docs/adr/0035-worker-model-thread.md)."""


class Intake:
    """Takes escalation messages in (``on_message``) and hands their cases to batchers."""

    def __init__(
        self,
        *,
        topics: Topics,
        limits: Limits,
        max_batch_size: int,
        session: MqttSession,
        acker: InOrderAcker,
        stats: WorkerStats,
        batchers: dict[str, MicroBatcher[Job]],
        answered: BoundedCache[Answer],
        in_progress: dict[str, list[Job]],
        settle: Callable[[Message], None],
    ) -> None:
        self.topics = topics
        self.limits = limits
        self.session = session
        self.acker = acker
        self.stats = stats
        self.batchers = batchers
        self.answered = answered
        self.in_progress = in_progress
        self.settle = settle
        self.pause_at = QUEUED_BATCHES_MAX * max_batch_size
        self.deferred: deque[tuple[Inbound, Ticket]] = deque()
        """Messages received while a model was saturated, in arrival order (not decoded)."""
        self.draining = False
        """Set when the worker drains: new messages are left unacknowledged."""

    def on_message(self, msg: Inbound) -> None:
        if self.draining:
            self.stats.ignored_draining += 1
            return
        self.stats.received += 1
        ticket = self.acker.track(msg)
        if self.deferred or self.saturated():
            self.deferred.append((msg, ticket))
            self.session.pause_reading()
            return
        self.take(msg, ticket)

    def saturated(self) -> bool:
        """Some model has :data:`QUEUED_BATCHES_MAX` batches' worth of cases waiting."""
        pause_at = self.pause_at
        return any(len(b) >= pause_at for b in self.batchers.values())

    def before_batch(self) -> None:
        """A batch was formed: room for the messages held back, if any."""
        if self.deferred or self.session.reading_paused:
            self.take_deferred()

    def take_deferred(self) -> None:
        """Take the messages held back, in order, until a model is saturated again; resume
        reading once none is held back and half of the limit is left."""
        deferred = self.deferred
        while deferred and (self.draining or not self.saturated()):
            self.take(*deferred.popleft())
        half = self.pause_at // 2
        if (
            not deferred
            and self.session.reading_paused
            and all(len(b) <= half for b in self.batchers.values())
        ):
            self.session.resume_reading()

    def take(self, msg: Inbound, ticket: Ticket) -> None:
        try:
            batch = decode_escalations(msg.payload, self.limits)
            if msg.topic != self.topics.escalations(batch.model):
                raise ContractError("bad_topic", f"escalation for {batch.model!r} on {msg.topic!r}")
            if batch.reply_to is not None and not reply_topic.is_reply_topic(
                batch.reply_to, batch.node
            ):
                raise ContractError("bad_topic", f"reply_to {batch.reply_to!r} is not node's reply")
        except ContractError as exc:
            self.stats.rejects[exc.reason] += 1
            log.debug("rejected escalation on %s: %s", log_text(msg.topic, 128), log_text(str(exc)))
            self.acker.finish(ticket)
            return
        except Exception as exc:  # a bug must not hold back every later acknowledgement
            self.stats.failures["intake"] += 1
            self.stats.rejects["internal_error"] += 1
            log.error("escalation on %r rejected: %s: %s", msg.topic[:128], type(exc).__name__, exc)
            self.acker.finish(ticket)
            return
        if batch.model not in self.batchers:
            self.stats.rejects["no_handler"] += 1
            self.acker.finish(ticket)
            return
        cases = batch.cases_view()
        self.stats.cases += len(cases)
        parent = Message(batch, msg, ticket)
        now = time.time()
        in_progress = self.in_progress
        cached = self.answered.get
        fresh: list[Job] = []
        for esc in cases:
            deadline = esc.deadline
            if deadline is not None and now > deadline:  # esc.expired(now)
                self.stats.expired += 1
                continue
            id_ = esc.id
            copies = in_progress.get(id_)
            if copies is not None:  # answered together with the first copy
                self.stats.duplicates += 1
                parent.waiting += 1
                if copies is NO_COPIES:
                    in_progress[id_] = [(esc, parent)]
                else:
                    copies.append((esc, parent))
                continue
            answer = cached(id_)
            if answer is not None:
                self.stats.duplicates += 1
                parent.answered.append((esc, answer))
                continue
            in_progress[id_] = NO_COPIES
            fresh.append((esc, parent))
        parent.waiting += len(fresh)
        try:
            self.batchers[batch.model].add_many(fresh)
        except Exception as exc:  # never answered: forget them, settle the message without
            self.stats.failures["intake"] += 1
            log.error("%d cases not queued: %s: %s", len(fresh), type(exc).__name__, exc)
            for esc, _ in fresh:
                in_progress.pop(esc.id, None)
            parent.waiting -= len(fresh)
        if parent.waiting == 0:
            self.settle(parent)
