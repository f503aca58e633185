"""End-to-end mode, the bridge's side: confirm to each node the results messages the bridge has
durably queued (docs/adr/0078-end-to-end-acks.md).

A node in end-to-end mode keeps each results message in its outbox after the site broker's
PUBACK, until a confirmation names it on ``edge/{node}/acks``. Once a results message is in the
up queue (committed), the bridge publishes that confirmation on the site broker: the message's
id (:func:`schemas.message_id`, its first result's id), batched per node, at most ``max_ids``
per confirmation. From there the bridge's own promise holds (the up queue keeps it until the far
broker's PUBACK; eviction is counted and alarmed).

What is confirmed is exactly what is queued: a message dropped on the way (too big, no rule, a
failed stage) or queued by an append that evicted (it may have evicted that very message) is not
confirmed, and the node sends it again. The payload comes from the network: it is decoded with
the wire contract's caps and checks (:func:`schemas.decode_results`); one that is not a results
message is forwarded as any other message, counted, and not confirmed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from broker_bridge.rules import CompiledRule
from edgewise.mqtt import MqttSession
from edgewise.mqtt.message import Inbound
from schemas import ContractError, Limits, ResultAcks, decode_results, encode_acks, message_id

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ConfirmStats:
    confirmed: int = 0
    """Results messages named in a confirmation handed to the site broker."""
    withheld: int = 0
    """Results messages queued by an append that evicted: not confirmed (sent again)."""
    undecodable: int = 0
    """Messages on a confirmed topic that are no valid results message: forwarded, not
    confirmed."""
    published: int = 0
    """Confirmation messages the site broker acknowledged."""
    failed: int = 0
    """Confirmation messages not delivered (link down, refused): the nodes send those results
    again and the bridge confirms them then."""


class ResultConfirmer:
    """``queued(messages)`` after the transaction holding them committed."""

    def __init__(
        self,
        session: MqttSession,
        rule: CompiledRule,
        *,
        by: str,
        max_ids: int,
        limits: Limits,
    ) -> None:
        self._session = session
        self._rule = rule
        self._by = by
        self._max_ids = max_ids
        self._limits = limits
        self.stats = ConfirmStats()

    def queued(self, messages: Sequence[Inbound]) -> None:
        """These messages are in the queue: confirm those that are results messages."""
        by_topic: dict[str, list[str]] = {}
        for message in messages:
            topic = self._rule.translate(message.topic)
            if topic is None:
                continue
            try:
                key = message_id(decode_results(message.payload, self._limits))
            except ContractError as exc:
                self.stats.undecodable += 1
                if self.stats.undecodable == 1:
                    log.warning(
                        "not confirming a message on %r: not a results message (%s)",
                        message.topic[:128],
                        exc,
                    )
                continue
            by_topic.setdefault(topic, []).append(key)
        for topic, keys in by_topic.items():
            for start in range(0, len(keys), self._max_ids):
                ids = keys[start : start + self._max_ids]
                payload = encode_acks(ResultAcks(ids=ids, by=self._by))
                fut = self._session.publish_nowait(topic, payload, qos=1)
                fut.add_done_callback(self._sent)
                self.stats.confirmed += len(ids)

    def withheld(self, n: int) -> None:
        self.stats.withheld += n

    def _sent(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.stats.failed += 1
        else:
            self.stats.published += 1
