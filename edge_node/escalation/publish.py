"""The publish path: pending cases to the workers in batches, hard examples to the outbox.

The cases handed over in one turn of the event loop go out together at the next turn: one
message per model holds up to ``schemas.CASES_MAX`` of them and about
``escalation.max_message_bytes`` (docs/adr/0032-escalation-batches.md). Over MQTT 5 a message
also carries its response topic, correlation data and an expiry at its earliest deadline. A
message lost on the way is no matter: its cases fall back at their deadlines.

Cases decided ``edge_offline`` go as hard-example uploads (``offline: true``, no deadline) into
an outbox, which the forwarder drains once the uplink is back (ADR 0069).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import TypeVar

from edge_node.escalation.cases import Case, Entry
from edge_node.escalation.config import EscalationConfig
from edge_node.escalation.stats import EscalationStats
from edgewise.mqtt import MqttSession, PublishProperties
from edgewise.mqtt.properties import expiry_interval_s
from edgewise.outbox import AsyncOutbox, Forwarder, OutboxError, Record
from schemas import (
    CASES_MAX,
    EscalationCase,
    Topics,
    encode_escalations,
    make_case,
    make_escalation_batch,
)

log = logging.getLogger(__name__)

HARD_EXAMPLE = "hard_example"
"""The outbox record kind of hard-example uploads (evicted before results by default)."""

_E = TypeVar("_E")
_CASE_OVERHEAD_BYTES = 256
"""Roughly what a case adds to a message besides its tensor (ids, edge verdict, keys)."""


class CaseSender:
    def __init__(
        self,
        config: EscalationConfig,
        *,
        node_id: str,
        topics: Topics,
        reply_topic: str,
        uplink: MqttSession,
        stats: EscalationStats,
        is_pending: Callable[[str], bool],
    ) -> None:
        """``is_pending(result_id)``: the case still waits (not resolved before it is sent)."""
        self._config = config
        self._node_id = node_id
        self._topics = topics
        self._reply_topic = reply_topic
        self._uplink = uplink
        self._stats = stats
        self._is_pending = is_pending
        self._outgoing: list[Entry] = []
        self._flush_scheduled = False

    def send(self, e: Entry) -> None:
        """Send ``e`` (pending) at the next turn of the event loop."""
        self._outgoing.append(e)
        if not self._flush_scheduled:
            # Sent at the next turn of the event loop: cases handed over by other micro-batches
            # in this turn go in the same messages.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def probe(self, entry: Entry, now: float) -> bool:
        """Send ``entry`` (a case decided already) at once; False if it could not be sent."""
        c = entry.case
        try:
            case = wire_case(c, corr=entry.corr, deadline=time.time() + (entry.deadline - now))
            self._publish(c.result.model, [(entry, case)], time.time(), now)
        except Exception as exc:  # the case is decided already; the next one probes
            log.warning("probe not sent: %s: %s", type(exc).__name__, exc)
            return False
        return True

    def _flush(self) -> None:
        self._flush_scheduled = False
        outgoing, self._outgoing = self._outgoing, []
        now_wall, now = time.time(), time.monotonic()
        by_model: dict[str, list[tuple[Entry, EscalationCase]]] = {}
        for e in outgoing:
            if not self._is_pending(e.case.result.id):
                continue  # resolved already (its deadline passed meanwhile)
            case = wire_case(e.case, corr=e.corr, deadline=now_wall + (e.deadline - now))
            by_model.setdefault(e.case.result.model, []).append((e, case))
        for model, pairs in by_model.items():
            for chunk in chunks(pairs, self._config.max_message_bytes):
                self._publish(model, chunk, now_wall, now)

    def _publish(
        self, model: str, chunk: list[tuple[Entry, EscalationCase]], now_wall: float, now: float
    ) -> None:
        corr = secrets.token_hex(8)
        for e, _ in chunk:
            e.message_corr = corr.encode()
        batch = make_escalation_batch(
            node=self._node_id,
            model=model,
            ts=now_wall,
            cases=[c for _, c in chunk],
            reply_to=self._reply_topic,
            corr=corr,
        )
        props: PublishProperties | None = None
        if self._uplink.protocol == "5":
            remaining = min(e.deadline for e, _ in chunk) - now
            props = PublishProperties(
                response_topic=self._reply_topic,
                correlation_data=corr.encode(),
                message_expiry_interval_s=expiry_interval_s(remaining),
            )
        fut = self._uplink.publish_nowait(
            self._topics.escalations(model), encode_escalations(batch), qos=1, properties=props
        )
        fut.add_done_callback(lambda f: f.exception())  # a lost one falls back at its deadline
        self._stats.escalated += len(chunk)
        self._stats.messages += 1
        self._stats.batch_sizes[len(chunk)] += 1


class HardExamples:
    """Hard-example uploads of the cases decided while the uplink was down."""

    def __init__(
        self,
        config: EscalationConfig,
        *,
        node_id: str,
        topics: Topics,
        outbox: AsyncOutbox,
        forwarder: Forwarder,
        stats: EscalationStats,
    ) -> None:
        self._config = config
        self._node_id = node_id
        self._topics = topics
        self._outbox = outbox
        self._forwarder = forwarder
        self._stats = stats

    async def store(self, cases: list[Case], now_wall: float) -> None:
        """Keep ``cases`` in the outbox (then offered to the forwarder); lost if it refuses."""
        records = self._uploads(cases, now_wall)
        n = len(cases)
        try:
            ids = await self._outbox.append([r for r, _ in records])
        except (OutboxError, ValueError) as exc:
            self._stats.hard_examples_lost += n
            log.error("hard examples not kept (%s): the results stand, the examples are lost", exc)
            return
        self._stats.hard_examples_stored += n
        now = time.time()
        self._forwarder.offer([r.stored(i, now) for (r, _), i in zip(records, ids, strict=True)])

    def _uploads(self, cases: list[Case], now_wall: float) -> list[tuple[Record, int]]:
        """Hard-example upload messages of ``cases`` (per model), with their case counts."""
        by_model: dict[str, list[tuple[Case, EscalationCase]]] = {}
        for c in cases:
            by_model.setdefault(c.result.model, []).append((c, wire_case(c)))
        records: list[tuple[Record, int]] = []
        for model, pairs in by_model.items():
            for chunk in chunks(pairs, self._config.max_message_bytes):
                batch = make_escalation_batch(
                    node=self._node_id,
                    model=model,
                    ts=now_wall,
                    cases=[e for _, e in chunk],
                    offline=True,
                )
                payload = encode_escalations(batch)
                topic = self._topics.escalations(model)
                record = Record(HARD_EXAMPLE, topic, payload, items=len(chunk))
                records.append((record, len(chunk)))
        return records


def chunks(
    pairs: list[tuple[_E, EscalationCase]], max_bytes: int
) -> list[list[tuple[_E, EscalationCase]]]:
    """``pairs`` in runs of at most ``CASES_MAX`` cases and about ``max_bytes`` (a case bigger
    than that goes alone)."""
    out: list[list[tuple[_E, EscalationCase]]] = []
    run: list[tuple[_E, EscalationCase]] = []
    size = 0
    for pair in pairs:
        n = len(pair[1].data) + _CASE_OVERHEAD_BYTES
        if run and (len(run) >= CASES_MAX or size + n > max_bytes):
            out.append(run)
            run, size = [], 0
        run.append(pair)
        size += n
    if run:
        out.append(run)
    return out


def wire_case(c: Case, *, corr: str | None = None, deadline: float | None = None) -> EscalationCase:
    """``c`` as it goes on the wire: to the workers (with ``corr`` and ``deadline``) or in a
    hard-example upload (without)."""
    r = c.result
    return make_case(
        id=r.id,
        release=r.release,
        device=r.device,
        sensor=r.sensor,
        frame_seq=r.frame_seq,
        tensor=c.tensor,
        edge=c.verdict,
        corr=corr,
        deadline=deadline,
    )
