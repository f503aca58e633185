"""An MQTT session that lives in one asyncio event loop.

paho-mqtt 2.x does the protocol; this package drives its socket from the event loop (no network
thread), keeps one connection alive with capped, jittered reconnects, and turns acknowledgements
into awaitables that fail when the connection drops first. :class:`MqttSession` is the face and
the wiring; each promise lives in a module of its own:

* :mod:`edgewise.mqtt.socket_driver`: the socket, read and written from the loop (buffered
  reads, joined writes, paused reading with the keep-alive kept);
* :mod:`edgewise.mqtt.reconnect`: the reconnect machine (backoff, MQTT 5 → 3.1.1 fallback,
  takeover guard hooks), with :mod:`edgewise.mqtt.connection` for one attempt;
* :mod:`edgewise.mqtt.pending_acks`: publishes and SUBSCRIBEs awaited, failed by a lost
  connection;
* :mod:`edgewise.mqtt.subscriptions`: what is subscribed, sent again where the broker lacks it.

Why paho and not a higher-level asyncio client: we need manual acknowledgement of received QoS 1
messages (a frame is acked only once its result is safe), which paho 2.x has and aiomqtt does not
expose (docs/adr/0002-mqtt-client.md).

Each connection uses a fresh paho client, so nothing unacknowledged hides in a client's memory
across reconnects: an unacknowledged publish fails with :class:`Disconnected` and its owner sends it
again; an unacknowledged received message is redelivered by the broker (persistent session).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

import paho.mqtt.client as paho
from paho.mqtt.properties import Properties

from edgewise.mqtt.backoff import Backoff
from edgewise.mqtt.config import MqttConfig
from edgewise.mqtt.connection import ConnectInfo as ConnectInfo
from edgewise.mqtt.connection import Connector, Protocol
from edgewise.mqtt.connection import Will as Will
from edgewise.mqtt.errors import Disconnected
from edgewise.mqtt.limits import MAX_PACKET_LIMIT
from edgewise.mqtt.limits import PACKET_OVERHEAD_BYTES as PACKET_OVERHEAD_BYTES
from edgewise.mqtt.limits import max_packet_for as max_packet_for
from edgewise.mqtt.limits import packet_size as packet_size
from edgewise.mqtt.message import Inbound
from edgewise.mqtt.pending_acks import PendingAcks, unless_lost
from edgewise.mqtt.reconnect import Reconnector
from edgewise.mqtt.socket_driver import SocketDriver
from edgewise.mqtt.stats import SessionStats as SessionStats
from edgewise.mqtt.subscriptions import Subscription as Subscription
from edgewise.mqtt.subscriptions import Subscriptions, refusal
from edgewise.mqtt.takeover import Conflict, TakeoverGuard

log = logging.getLogger(__name__)

MessageHandler = Callable[[Inbound], None]
ConnectHook = Callable[[ConnectInfo], Awaitable[None]]
TakeoverHook = Callable[[int], None]


class MqttSession:
    """One logical MQTT session, kept connected until the context exits.

    Use::

        async with MqttSession(config, client_id="gw-1", on_message=handle) as session:
            session.subscribe("sensors/+/+")  # a future: the granted QoS at the SUBACK
            await session.wait_connected()
            await session.publish("edge/gw-1/results", payload)

    ``on_message`` is called on the event loop for every received PUBLISH; with ``manual_ack``
    (the default) the application calls :meth:`ack` when it is done with a QoS 1 message.
    ``on_connect`` runs after every successful CONNECT (after re-subscribing), e.g. to publish a
    retained status. ``keep_properties`` keeps each message's MQTT 5 properties on
    :attr:`Inbound.properties` (read only for those who ask: edgewise/mqtt/client.py).

    ``resubscribe`` sends every subscription again on the first connection even when the broker
    kept the session: for a service whose filters come from a config that may have changed
    since the session was made (the bridge). The broker then sends matching retained messages
    again.

    :meth:`pause_reading` stops reading from the socket until :meth:`resume_reading`: the
    kernel's buffers fill and TCP makes the broker wait. That bounds what an application holds
    even where the broker does not honour our Receive Maximum (Mosquitto before 2.0.13). Writing
    goes on, and so does the keep-alive (``SocketDriver._keepalive_while_paused``); but whatever
    the broker sends on this connection (PUBACKs of our publishes, SUBACKs) waits unread behind what
    is held back: an application that must not wait for those publishes on another connection.

    ``client_id`` is the connection's base id; :meth:`MqttConfig.client_id_for` makes the id
    used (``{username}:{base}`` with a username). A connection another one with the same id
    takes over is detected (:mod:`edgewise.mqtt.takeover`): :attr:`client_id_conflict` turns
    true, ``on_takeover(connection)`` is called, and reconnects back off, down to one try every
    5 minutes (docs/adr/0073-client-id-conflict.md). The sessions of one service share one
    ``conflict`` (:class:`~edgewise.mqtt.takeover.Conflict`): it gives way after 5 takeovers of
    any of them. A session with ``announce_conflict`` (one that publishes the service's status
    in its ``on_connect``) connects once more when the service gives way while it is down, so
    the status says why, then leaves too.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        client_id: str,
        on_message: MessageHandler | None = None,
        on_connect: ConnectHook | None = None,
        will: Will | None = None,
        manual_ack: bool = True,
        persistent: bool = True,
        keep_properties: bool = False,
        resubscribe: bool = False,
        on_takeover: TakeoverHook | None = None,
        conflict: Conflict | None = None,
        announce_conflict: bool = False,
        max_packet_bytes: int | None = None,
    ) -> None:
        if max_packet_bytes is not None and not 16 <= max_packet_bytes <= MAX_PACKET_LIMIT:
            raise ValueError(f"max_packet_bytes must be 16..{MAX_PACKET_LIMIT}")
        self.config = config
        self.max_packet_bytes = max_packet_bytes
        self.client_id = config.client_id_for(client_id)
        self._takeover = TakeoverGuard(
            self.client_id, config.takeover_backoff_first_s, conflict or Conflict()
        )
        self._on_takeover = on_takeover
        self._conflict_token: int | None = None
        self._announce_conflict = announce_conflict
        self._on_message = on_message
        self._on_connect = on_connect
        self._will = will
        self._manual_ack = manual_ack
        self._persistent = persistent
        self._keep_properties = keep_properties
        self._resubscribe = resubscribe
        self._protocol: Protocol = "3.1.1" if config.protocol == "3.1.1" else "5"
        self.stats = SessionStats()
        self._driver = SocketDriver(self.stats)
        self._acks = PendingAcks()
        self._subs = Subscriptions()
        self._connector = Connector(self)
        self._reconnect = Reconnector(self)
        self._connection = 0
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._background: list[asyncio.Task[None]] = []
        self._backoff = Backoff.of(config)
        self.broker_max_packet_bytes: int | None = None
        """The broker's Maximum Packet Size (MQTT 5 CONNACK); None: it named none."""
        self.broker_receive_maximum = 65535
        self.last_error: str | None = None
        self.known_down_at = 0.0
        """``time.monotonic()`` when the broker was last known out of reach: a connection lost
        or a connect attempt failed (0.0: never). What happened after it may have happened
        while the link was back and the next attempt not yet due."""

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._driver.start(self._loop)
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        self._conflict_token = self._takeover.shared.join(self._reconnect.give_way)
        self._background = [
            self._tasks.create_task(self._reconnect.run(), name=f"mqtt-session-{self.client_id}"),
            self._tasks.create_task(self._misc_loop(), name=f"mqtt-misc-{self.client_id}"),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping = True
        if self._conflict_token is not None:
            self._takeover.shared.leave(self._conflict_token)
        client = self._client
        if client is not None and self._connected.is_set():
            # A clean DISCONNECT, written now: the broker then discards our will.
            client.disconnect()
            with contextlib.suppress(Exception):
                client.loop_write()
        self._connected.clear()
        self._lost.set()
        self._acks.fail_all(Disconnected("session closed"))
        self._subs.fail_waiting(Disconnected("session closed"))
        assert self._tasks is not None
        for task in self._background:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._tasks.__aexit__(None, None, None)
        self._driver.close()

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._driver.tick()

    # ------------------------------------------------------------------ public API
    @property
    def _client(self) -> paho.Client | None:
        """The paho client of the current connection (None between connections)."""
        return self._driver.client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def protocol(self) -> Protocol:
        return self._protocol

    @property
    def connection(self) -> int:
        return self._connection

    @property
    def bytes_received(self) -> int:
        """Bytes read from the broker since the start, over every connection."""
        return self._driver.bytes_received

    @property
    def client_id_conflict(self) -> bool:
        """Another connection has been taking this session's client id (ADR 0073)."""
        return self._takeover.conflict

    @property
    def giving_way(self) -> bool:
        """The service gave way to another with its client ids: take no work (what arrives is
        handed to the other process when this connection leaves)."""
        return self._takeover.shared.pause_left_s() > 0

    def lost_to_takeover(self, connection: int) -> bool:
        """Connection number ``connection`` ended because another took its client id (or gave
        way to it): what it left unacknowledged is redelivered to that other connection."""
        return connection in self._reconnect.taken_over

    @property
    def lost_any_to_takeover(self) -> bool:
        return bool(self._reconnect.taken_over)

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        async with asyncio.timeout(timeout_s):
            await self._connected.wait()

    async def wait_connected_or_failed(self, timeout_s: float | None = None) -> None:
        """Wait for the connection, but raise :class:`ConnectFailed` (the attempt's error as its
        cause) as soon as an attempt fails, instead of waiting through the retries: for a
        command, which says why and exits; a service waits with :meth:`wait_connected`."""
        await self._reconnect.wait_connected_or_failed(timeout_s)

    async def wait_disconnected(self) -> None:
        """Return once the connection in hand is lost (at once if there is none). Lost is
        lost: the reconnect loop clears ``connected`` only when its turn comes, and waiting on
        ``_lost`` while it stays set would never yield (an asyncio.Event that is set does not)."""
        if self._connected.is_set() and not self._lost.is_set():
            await self._lost.wait()

    def subscribe(
        self,
        topic_filter: str,
        qos: int = 1,
        *,
        no_local: bool = False,
        retain_as_published: bool = False,
    ) -> asyncio.Future[int]:
        """Subscribe now (if connected) and after every reconnect that lost the session (or that
        came before this subscription's SUBACK).

        The future (awaiting it is optional) tells what the broker answered: the QoS granted
        (a session the broker kept holds the subscription already: the QoS asked for),
        :class:`SubscribeRefused` (the subscription is kept, and sent again on the next
        connection that lost it), or :class:`Disconnected` if the connection the SUBSCRIBE
        went out on drops first, or the session closes before it went out. Not connected now,
        it goes out when the next connection comes up, and the future waits for that."""
        sub = Subscription(topic_filter, qos, no_local, retain_as_published)
        self._subs.add(sub)
        suback = None
        if self._client is not None and self._connected.is_set():
            suback = self._send_subscribe([sub])
        return self._subs.answer(self._loop or asyncio.get_running_loop(), sub, suback)

    async def subscribe_confirmed(self, topic_filter: str, qos: int = 1) -> int:
        """:meth:`subscribe` and wait for the broker's answer: the QoS granted, or
        :class:`SubscribeRefused` with the broker's reason (the subscription is then dropped).
        :class:`Disconnected` if not connected or the connection drops first (the subscription
        is kept for the next connection)."""
        sub = Subscription(topic_filter, qos)
        self._subs.add(sub)
        fut = self._send_subscribe([sub]) if self._connected.is_set() else None
        if fut is None:
            raise Disconnected("not connected")
        if not await unless_lost(fut, self._lost) or fut.cancelled():
            raise Disconnected("connection lost before SUBACK")
        code = fut.result()[0]
        if code < 0x80:
            return code
        self._subs.drop(sub)
        raise refusal(topic_filter, code)

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> asyncio.Future[None]:
        """Queue a publish; the future resolves at PUBACK (QoS 1) or once written (QoS 0).

        It fails with :class:`Disconnected` if the connection is down now or drops first.
        """
        assert self._loop is not None, "use the session inside 'async with'"
        client = self._client
        if client is None or not self._connected.is_set() or self._lost.is_set():
            fut: asyncio.Future[None] = self._loop.create_future()
            fut.set_exception(Disconnected("not connected"))
            return fut
        return self._acks.publish(
            self._loop,
            client,
            topic,
            payload,
            qos=qos,
            retain=retain,
            properties=properties,
            v5=self._protocol == "5",
            broker_max_packet_bytes=self.broker_max_packet_bytes,
        )

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        await self.publish_nowait(topic, payload, qos=qos, retain=retain, properties=properties)

    def ack(self, message: Inbound) -> None:
        """Acknowledge a received QoS 1 message (no-op for QoS 0 or a stale connection)."""
        if not self._manual_ack or message.qos == 0:
            return
        client = self._client
        if client is None or message.connection != self._connection:
            return
        client.ack(message.mid, message.qos)

    # ------------------------------------------------------------------ backpressure
    @property
    def reading_paused(self) -> bool:
        return self._driver.reading_paused

    def pause_reading(self) -> None:
        """Stop reading from the broker until :meth:`resume_reading` (or the next connection)."""
        self._driver.pause_reading()

    def resume_reading(self) -> None:
        self._driver.resume_reading()

    # ------------------------------------------------------------------ each connection
    def _make_client(self) -> paho.Client:
        return self._connector.make_client()

    async def _after_connect(self, info: ConnectInfo) -> None:
        subs = self._subs.due(
            session_present=info.session_present,
            first=self.stats.connects == 1,
            resubscribe=self._resubscribe,
        )
        if subs:
            await self._subscribe_and_wait(subs)
        if self._on_connect is not None:
            await self._on_connect(info)

    async def _subscribe_and_wait(self, subs: list[Subscription]) -> None:
        fut = self._send_subscribe(subs)
        if fut is None:
            raise Disconnected("not connected")
        if not await unless_lost(fut, self._lost) or fut.cancelled():
            raise Disconnected("connection lost before SUBACK")
        for sub, code in zip(subs, fut.result(), strict=False):
            if code >= 0x80:
                log.error(
                    "broker refused subscription %r (reason code 0x%02x)", sub.topic_filter, code
                )

    def _send_subscribe(self, subs: list[Subscription]) -> asyncio.Future[list[int]] | None:
        assert self._loop is not None
        return self._subs.send(self._loop, self._client, subs, self._acks, v5=self._protocol == "5")
