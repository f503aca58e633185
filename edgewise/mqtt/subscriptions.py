"""A session's subscriptions, kept across connections and sent again where the broker lacks them.

Every subscription is sent on a connection whose broker session is new (Session Present = 0).
One the broker has not confirmed yet (no SUBACK) is sent again on any reconnect, since a
session the broker kept may lack it; on the first connection of a process, a kept session
holds what the service subscribed to before (ADR 0002), unless the session is told to
``resubscribe`` (its filters come from a config that may have changed).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgewise.mqtt.errors import Disconnected, MqttError, SubscribeRefused
from edgewise.mqtt.pending_acks import PendingAcks


@dataclass(frozen=True, slots=True)
class Subscription:
    topic_filter: str
    qos: int = 1
    no_local: bool = False
    retain_as_published: bool = False


class Subscriptions:
    """Every subscription of a session, and those no SUBACK has confirmed yet."""

    def __init__(self) -> None:
        self.all: dict[str, Subscription] = {}
        self.unconfirmed: dict[str, Subscription] = {}
        """Not yet confirmed by a SUBACK: a session the broker kept (Session Present = 1) may
        lack them, so they are sent again on reconnect."""
        self.waiting: dict[str, list[asyncio.Future[int]]] = {}
        """Answers promised by :meth:`answer` to subscriptions not sent yet: each is told by the
        SUBACK of the next SUBSCRIBE of its filter."""
        self.answers: dict[str, asyncio.Future[int]] = {}
        """The answer to the latest :meth:`MqttSession.subscribe` of each filter."""

    def add(self, sub: Subscription) -> None:
        self.all[sub.topic_filter] = sub
        self.unconfirmed[sub.topic_filter] = sub

    def drop(self, sub: Subscription) -> None:
        """The broker refused ``sub``: forget it (unless a newer one replaced it)."""
        if self.all.get(sub.topic_filter) is sub:
            del self.all[sub.topic_filter]

    def due(self, *, session_present: bool, first: bool, resubscribe: bool) -> list[Subscription]:
        """What to send on a connection that just came up (``first``: the process's first)."""
        if session_present and first and not resubscribe:
            # A session kept from an earlier run holds the service's subscriptions (ADR 0002).
            self.unconfirmed.clear()
        subs = self.unconfirmed if session_present else self.all
        for topic_filter in [f for f in self.waiting if f not in subs]:
            # The broker's session holds it: no SUBSCRIBE, so no SUBACK to wait for.
            sub = self.all.get(topic_filter)
            for fut in self.waiting.pop(topic_filter):
                if not fut.done():
                    fut.set_result(sub.qos if sub is not None else 0)
        return list(subs.values())

    def answer(
        self,
        loop: asyncio.AbstractEventLoop,
        sub: Subscription,
        suback: asyncio.Future[list[int]] | None,
    ) -> asyncio.Future[int]:
        """The future :meth:`MqttSession.subscribe` returns: the QoS granted to ``sub``, or
        :class:`SubscribeRefused`, or :class:`Disconnected` if the connection its SUBSCRIBE went
        out on drops first. ``suback``: of the SUBSCRIBE just sent; None: not sent yet (it goes
        out when the next connection comes up)."""
        fut: asyncio.Future[int] = loop.create_future()
        self.answers[sub.topic_filter] = fut
        if suback is None:
            self.waiting.setdefault(sub.topic_filter, []).append(fut)
        else:
            suback.add_done_callback(partial(_settle, fut, sub.topic_filter, 0))
        return fut

    def fail_waiting(self, exc: MqttError) -> None:
        """The session closes: what waits for a SUBSCRIBE not sent yet fails."""
        waiting, self.waiting = self.waiting, {}
        for futs in waiting.values():
            for fut in futs:
                _fail(fut, exc)

    def send(
        self,
        loop: asyncio.AbstractEventLoop,
        client: paho.Client | None,
        subs: list[Subscription],
        acks: PendingAcks,
        *,
        v5: bool,
    ) -> asyncio.Future[list[int]] | None:
        """Send one SUBSCRIBE for ``subs``; the future of its SUBACK's reason codes (None: not
        sent, the client is gone)."""
        if client is None:
            return None
        if v5:
            topics: list[tuple[str, Any]] = [
                (
                    s.topic_filter,
                    SubscribeOptions(
                        qos=s.qos, noLocal=s.no_local, retainAsPublished=s.retain_as_published
                    ),
                )
                for s in subs
            ]
        else:
            topics = [(s.topic_filter, s.qos) for s in subs]
        rc, mid = client.subscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return None
        fut = acks.expect_suback(loop, mid)
        fut.add_done_callback(lambda f: self._confirmed(f, subs))
        for i, sub in enumerate(subs):
            for waiter in self.waiting.pop(sub.topic_filter, ()):
                fut.add_done_callback(partial(_settle, waiter, sub.topic_filter, i))
        return fut

    def _confirmed(self, suback: asyncio.Future[list[int]], subs: list[Subscription]) -> None:
        if suback.cancelled():
            return
        for sub in subs:
            if self.unconfirmed.get(sub.topic_filter) is sub:
                del self.unconfirmed[sub.topic_filter]


def refusal(topic_filter: str, code: int) -> SubscribeRefused:
    """The error of a SUBACK that refused ``topic_filter`` with reason ``code``."""
    reason = ReasonCode(PacketTypes.SUBACK, identifier=code)
    return SubscribeRefused(
        f"the broker refused the subscription to {topic_filter!r} ({reason},"
        f" reason code 0x{code:02x})",
        topic_filter=topic_filter,
        reason_code=code,
    )


def _fail(fut: asyncio.Future[int], exc: MqttError) -> None:
    if not fut.done():
        fut.set_exception(exc)
        fut.exception()  # mark retrieved: a caller that does not await it must not log noise


def _settle(
    fut: asyncio.Future[int], topic_filter: str, index: int, suback: asyncio.Future[list[int]]
) -> None:
    """Tell ``fut`` what the SUBACK said of the ``index``-th filter of its SUBSCRIBE."""
    if fut.done():
        return
    if suback.cancelled():
        _fail(fut, Disconnected("connection lost before SUBACK"))
        return
    codes = suback.result()
    code = codes[index] if index < len(codes) else 0x80
    if code < 0x80:
        fut.set_result(code)
    else:
        _fail(fut, refusal(topic_filter, code))
