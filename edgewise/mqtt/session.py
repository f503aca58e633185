"""An MQTT session that lives in one asyncio event loop.

paho-mqtt 2.x does the protocol; this module drives its socket from the event loop (no network
thread), keeps one connection alive with capped, jittered reconnects, and turns acknowledgements
into awaitables that fail when the connection drops first.

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
import select
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgewise.mqtt.backoff import Backoff
from edgewise.mqtt.client import DirectClient
from edgewise.mqtt.config import MqttConfig
from edgewise.mqtt.errors import (
    ConnectFailed,
    Disconnected,
    MqttError,
    NoConnack,
    ProtocolRefused,
    PublishFailed,
    PublishRejected,
    SubscribeRefused,
)
from edgewise.mqtt.message import Inbound
from edgewise.mqtt.takeover import Conflict, TakeoverGuard

log = logging.getLogger(__name__)

Protocol = Literal["5", "3.1.1"]
_UNSUPPORTED_PROTOCOL = (0x84, 0x01)  # MQTT 5 "Unsupported Protocol Version"; 3.1.1 CONNACK rc 1
READS_PER_WAKEUP = 256
"""Most ``loop_read`` calls for one readable event: buffered packets are read in one go (see
``MqttSession._read``), and then the loop's other tasks get their turn."""


_MAX_PACKET_LIMIT = 268_435_460
"""The largest MQTT packet there can be: a 268,435,455-byte remaining length and its header."""
_KEEP_ALIVE_TIMEOUT = 0x8D
"""The reason code paho reports when it ends a connection for a missing PINGRESP."""
_PROTOCOL_ERROR = 0x82
_NORMAL = 0x00


PACKET_OVERHEAD_BYTES = 65_536
"""Room for everything in a PUBLISH but its payload: the topic (at most 65,535 bytes), the
fixed header, the packet id and the common properties (not hostile user properties)."""


def max_packet_for(payload_bytes: int) -> int:
    """The Maximum Packet Size a connection that takes payloads of up to ``payload_bytes``
    tells the broker: a payload over the cap by less than the overhead still arrives (and is
    refused and counted by the application); a packet larger than this, the broker drops."""
    return min(payload_bytes + PACKET_OVERHEAD_BYTES, _MAX_PACKET_LIMIT)


def packet_size(topic: str, payload: bytes, qos: int, properties: bytes | None) -> int:
    """Bytes of the PUBLISH packet for ``topic`` and ``payload``; ``properties``: the packed
    MQTT 5 properties (their length included), None for MQTT 3.1.1."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + len(payload)
    if properties is not None:
        remaining += len(properties)
    header = 2 if remaining < 128 else 3 if remaining < 16_384 else 4 if remaining < 2**21 else 5
    return header + remaining


def _os_text(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


class _ClosedBeforeConnack(NoConnack):
    """The broker (or a proxy before it) closed the connection after the CONNECT, with no
    CONNACK and no socket error."""


class _ClosedAfterConnack(ConnectFailed):
    """The broker closed the connection right after its CONNACK."""

    takeover_delay: float | None = None


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Subscription:
    topic_filter: str
    qos: int = 1
    no_local: bool = False
    retain_as_published: bool = False


@dataclass(frozen=True, slots=True)
class ConnectInfo:
    """What the broker told us when a connection came up."""

    connection: int
    protocol: Protocol
    session_present: bool
    broker_receive_maximum: int


MessageHandler = Callable[[Inbound], None]
ConnectHook = Callable[[ConnectInfo], Awaitable[None]]
TakeoverHook = Callable[[int], None]


@dataclass(slots=True)
class SessionStats:
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    handler_errors: int = 0
    read_pauses: int = 0
    paused_keepalives: int = 0
    """seconds of paused reading in which the keep-alive was kept (bytes waited unread)"""
    read_wakeups: int = 0
    """readable events served (each reads every packet buffered, up to READS_PER_WAKEUP calls)"""
    takeovers: int = 0
    """connections another connection with our client id took over (edgewise.mqtt.takeover)"""


class MqttSession:
    """One logical MQTT session, kept connected until the context exits.

    Use::

        async with MqttSession(config, client_id="gw-1", on_message=handle) as session:
            session.subscribe("sensors/+/+")
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
    goes on, and so does the keep-alive (:meth:`_keepalive_while_paused`); but whatever the
    broker sends on this connection (PUBACKs of our publishes, SUBACKs) waits unread behind what
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
        if max_packet_bytes is not None and not 16 <= max_packet_bytes <= _MAX_PACKET_LIMIT:
            raise ValueError(f"max_packet_bytes must be 16..{_MAX_PACKET_LIMIT}")
        self.config = config
        self.max_packet_bytes = max_packet_bytes
        self.client_id = config.client_id_for(client_id)
        self._takeover = TakeoverGuard(
            self.client_id, config.takeover_backoff_first_s, conflict or Conflict()
        )
        self._on_takeover = on_takeover
        self._conflict_token: int | None = None
        self._announce_conflict = announce_conflict
        self._farewell = False
        """The service gave way while this session was down: it connects once to say so."""
        self._taken_over: set[int] = set()
        """Numbers of the connections another connection took over (the last few)."""
        self._server_reason: int | None = None
        self._peer_closed = False
        self._on_message = on_message
        self._on_connect = on_connect
        self._will = will
        self._manual_ack = manual_ack
        self._persistent = persistent
        self._keep_properties = keep_properties
        self._resubscribe = resubscribe
        self._reading_paused = False
        self._poller = select.poll()
        self._poll_sock: Any = None
        self._protocol: Protocol = "3.1.1" if config.protocol == "3.1.1" else "5"
        self._protocol_on_trial = False
        self._subscriptions: dict[str, Subscription] = {}
        # Not yet confirmed by a SUBACK: a session the broker kept (Session Present = 1) may lack
        # them, so they are sent again on reconnect.
        self._unconfirmed: dict[str, Subscription] = {}
        self._client: paho.Client | None = None
        self._writes_due: set[paho.Client] = set()
        """Clients whose packets are written at the next turn of the loop."""
        self._connection = 0
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._stopping = False
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._suback: dict[int, asyncio.Future[list[int]]] = {}
        self._connack: asyncio.Future[ConnectInfo] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._background: list[asyncio.Task[None]] = []
        self._backoff = Backoff.of(config)
        self._up_since = 0.0
        """``time.monotonic()`` when the current (or last) connection came up."""
        self._bytes_before = 0
        """Bytes received on the connections closed so far."""
        self._trial_spent = False
        """An MQTT 3.1.1 trial after a close before CONNACK failed in this outage: no more."""
        self._end_reason: str | None = None
        self.broker_max_packet_bytes: int | None = None
        """The broker's Maximum Packet Size (MQTT 5 CONNACK); None: it named none."""
        self.stats = SessionStats()
        self.broker_receive_maximum = 65535
        self.last_error: str | None = None
        self._failure_waiter: asyncio.Future[BaseException] | None = None
        """Told of the next failed connect attempt (:meth:`wait_connected_or_failed`)."""
        self.known_down_at = 0.0
        """``time.monotonic()`` when the broker was last known out of reach: a connection lost
        or a connect attempt failed (0.0: never). What happened after it may have happened
        while the link was back and the next attempt not yet due."""

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        self._conflict_token = self._takeover.shared.join(self._give_way)
        self._background = [
            self._tasks.create_task(self._run(), name=f"mqtt-session-{self.client_id}"),
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
        self._fail_pending(Disconnected("session closed"))
        assert self._tasks is not None
        for task in self._background:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._tasks.__aexit__(None, None, None)
        self._close_client()

    # ------------------------------------------------------------------ public API
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
        client = self._client
        now = client.bytes_received if isinstance(client, DirectClient) else 0
        return self._bytes_before + now

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
        return connection in self._taken_over

    @property
    def lost_any_to_takeover(self) -> bool:
        return bool(self._taken_over)

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        async with asyncio.timeout(timeout_s):
            await self._connected.wait()

    async def wait_connected_or_failed(self, timeout_s: float | None = None) -> None:
        """Wait for the connection, but raise :class:`ConnectFailed` (the attempt's error as its
        cause) as soon as an attempt fails, instead of waiting through the retries: for a
        command, which says why and exits; a service waits with :meth:`wait_connected`."""
        if self._connected.is_set():
            return
        assert self._loop is not None, "use the session inside 'async with'"
        failed: asyncio.Future[BaseException] = self._loop.create_future()
        self._failure_waiter = failed
        connected = asyncio.ensure_future(self._connected.wait())
        either: list[asyncio.Future[Any]] = [failed, connected]
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            connected.cancel()
            self._failure_waiter = None
        if self._connected.is_set():
            return
        exc = failed.result()
        code = exc.reason_code if isinstance(exc, ConnectFailed) else None
        raise ConnectFailed(str(exc) or type(exc).__name__, reason_code=code) from exc

    async def wait_disconnected(self) -> None:
        """Return once the connection in hand is lost (at once if there is none). Lost is
        lost: ``_run`` clears ``connected`` only when its turn comes, and waiting on ``_lost``
        while it stays set would never yield (an asyncio.Event that is set does not)."""
        if self._connected.is_set() and not self._lost.is_set():
            await self._lost.wait()

    def subscribe(
        self,
        topic_filter: str,
        qos: int = 1,
        *,
        no_local: bool = False,
        retain_as_published: bool = False,
    ) -> None:
        """Subscribe now (if connected) and after every reconnect that lost the session (or that
        came before this subscription's SUBACK)."""
        sub = Subscription(topic_filter, qos, no_local, retain_as_published)
        self._subscriptions[topic_filter] = sub
        self._unconfirmed[topic_filter] = sub
        if self._client is not None and self._connected.is_set():
            self._send_subscribe([sub])

    async def subscribe_confirmed(self, topic_filter: str, qos: int = 1) -> int:
        """:meth:`subscribe` and wait for the broker's answer: the QoS granted, or
        :class:`SubscribeRefused` with the broker's reason (the subscription is then dropped).
        :class:`Disconnected` if not connected or the connection drops first (the subscription
        is kept for the next connection)."""
        sub = Subscription(topic_filter, qos)
        self._subscriptions[topic_filter] = sub
        self._unconfirmed[topic_filter] = sub
        fut = self._send_subscribe([sub]) if self._connected.is_set() else None
        if fut is None:
            raise Disconnected("not connected")
        if not await self._unless_lost(fut) or fut.cancelled():
            raise Disconnected("connection lost before SUBACK")
        code = fut.result()[0]
        if code < 0x80:
            return code
        if self._subscriptions.get(topic_filter) is sub:
            del self._subscriptions[topic_filter]
        reason = ReasonCode(PacketTypes.SUBACK, identifier=code)
        raise SubscribeRefused(
            f"the broker refused the subscription to {topic_filter!r} ({reason},"
            f" reason code 0x{code:02x})",
            topic_filter=topic_filter,
            reason_code=code,
        )

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
        fut: asyncio.Future[None] = self._loop.create_future()
        client = self._client
        if client is None or not self._connected.is_set() or self._lost.is_set():
            fut.set_exception(Disconnected("not connected"))
            return fut
        limit = self.broker_max_packet_bytes
        if limit is not None and (
            properties is not None or len(payload) + 4 * len(topic) + 16 > limit
        ):
            # A packet over the broker's limit would make it drop the connection (Mosquitto:
            # DISCONNECT 0x95), and the same publish, sent again, the next one: refuse it here.
            packed = b"\x00" if properties is None else bytes(properties.pack())  # type: ignore[no-untyped-call]
            size = packet_size(topic, payload, qos, packed if self._protocol == "5" else None)
            if size > limit:
                fut.set_exception(
                    PublishFailed(
                        f"publish to {topic[:128]!r} refused: a {size}-byte packet, over the"
                        f" broker's maximum packet size ({limit} bytes)"
                    )
                )
                return fut
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except ValueError as exc:
            fut.set_exception(PublishFailed(f"publish to {topic!r} refused: {exc}"))
            return fut
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_QUEUE_SIZE):
            fut.set_exception(Disconnected(f"publish not sent: {paho.error_string(info.rc)}"))
            return fut
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            fut.set_exception(PublishFailed("client queue full", transient=True))
            return fut
        self._pending[info.mid] = fut
        return fut

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

    # ------------------------------------------------------------------ connection loop
    async def _run(self) -> None:
        while not self._stopping:
            pause = self._takeover.shared.pause_left_s()
            # The service gave way to another with its client ids (ADR 0073); a session that
            # speaks for it connects once more first, to say so (its on_connect hook).
            farewell, self._farewell = self._farewell and pause > 0, False
            if pause > 0 and not farewell:
                await asyncio.sleep(pause)
                continue
            try:
                info = await self._connect_once()
            except ProtocolRefused as exc:
                self.known_down_at = time.monotonic()
                self._close_client()
                if self.config.protocol == "auto" and self._protocol == "5":
                    log.warning("broker refused MQTT 5 (%s); falling back to MQTT 3.1.1", exc)
                    self._protocol = "3.1.1"
                    continue
                self._end_protocol_trial()
                await self._after_failure(exc)
                continue
            except NoConnack as exc:
                self.known_down_at = time.monotonic()
                self._close_client()
                auto5 = self.config.protocol == "auto" and self._protocol == "5"
                if auto5 and not isinstance(exc, _ClosedBeforeConnack):
                    # Silence to an MQTT 5 CONNECT (for connect_timeout_s) may mean a 3.1.1-only
                    # broker: try that at once, and keep it only if it works.
                    log.warning("no answer to an MQTT 5 CONNECT; trying MQTT 3.1.1")
                    self._protocol = "3.1.1"
                    self._protocol_on_trial = True
                    continue
                if auto5 and not self._trial_spent:
                    # Closed after our MQTT 5 CONNECT without a CONNACK: a broker that does not
                    # speak 5 may do that, but so does a broker going down, or a proxy whose
                    # broker is away. The next attempt, at its ordinary time (no extra
                    # connect), tries MQTT 3.1.1, once an outage (ADR 0077).
                    self._protocol = "3.1.1"
                    self._protocol_on_trial = True
                    await self._after_failure(exc, next_try="MQTT 3.1.1")
                    continue
                self._end_protocol_trial()
                await self._after_failure(exc)
                continue
            except (ConnectFailed, OSError, TimeoutError) as exc:
                self.known_down_at = time.monotonic()
                self._close_client()
                self._end_protocol_trial()
                await self._after_failure(exc)
                continue
            self._protocol_on_trial = False  # MQTT 3.1.1 on trial worked: keep it
            self._trial_spent = False
            self._up_since = time.monotonic()
            self._takeover.connected()
            self.stats.connects += 1
            if self.stats.connects > 1:
                self.stats.reconnects += 1
            self.last_error = None
            log.info(
                "connected to %s:%d as %s (MQTT %s, session present: %s)",
                self.config.host,
                self.config.port,
                self.client_id,
                info.protocol,
                info.session_present,
            )
            try:
                await self._after_connect(info)
            except MqttError as exc:
                log.warning("connection dropped while setting up: %s", exc)
            if self._takeover.shared.pause_left_s() > 0:
                self._give_way()  # said what it had to (or connected as the service gave way)
            await self._lost.wait()
            self.known_down_at = time.monotonic()
            lived = self.known_down_at - self._up_since
            self._connected.clear()
            self._fail_pending(Disconnected("connection lost"))
            self._close_client()
            if not self._stopping:
                why = self._end_reason or "connection lost"
                taken = self._takeover_delay()
                if taken is None and self._takeover.shared.pause_left_s() > 0:
                    continue  # this one gave way: the loop's top waits the pause out
                if taken is None:
                    self.last_error = why
                    if lived >= self.config.reconnect_reset_after_s:
                        self._backoff.reset()  # a fresh outage; else the last one goes on
                    delay = self._backoff.next_delay_s()
                    log.warning(
                        "connection to %s:%d ended after %.1f s: %s; reconnecting in %.2f s",
                        self.config.host,
                        self.config.port,
                        lived,
                        why,
                        delay,
                    )
                else:
                    delay = taken  # the guard said why
                await asyncio.sleep(delay)

    def _end_protocol_trial(self) -> None:
        """MQTT 3.1.1 on trial failed too: the broker was just down, so speak MQTT 5 again
        (and try no more MQTT 3.1.1 after a close until a connection has been made)."""
        if self._protocol_on_trial:
            self._protocol = "5"
            self._protocol_on_trial = False
            self._trial_spent = True

    def _give_way(self) -> None:
        """The service stops fighting for its client ids: leave the broker, cleanly (no will,
        and no takeover for the other process)."""
        client = self._client
        if client is None or not self._connected.is_set() or self._stopping:
            self._farewell = self._announce_conflict and not self._stopping
            return
        log.info("client id %r gives way to the other connection", self.client_id)
        if self._announce_conflict and self._on_takeover is not None and not self._lost.is_set():
            # The session that speaks for the service says why first: what its hook publishes
            # is queued before the DISCONNECT and written with it (another connection's
            # takeover may have been the last straw, so its hook has not run here yet).
            try:
                self._on_takeover(self._connection)
            except Exception:
                log.exception("takeover hook failed")
        self._taken_over.add(self._connection)  # what it holds goes to the other process
        client.disconnect()
        with contextlib.suppress(Exception):
            client.loop_write()  # the DISCONNECT, now

    def _takeover_delay(self) -> float | None:
        """The lost connection was taken over: how long to wait (the guard logs it)."""
        delay = self._takeover.lost(
            server_reason=self._server_reason, peer_closed=self._peer_closed
        )
        if delay is None:
            return None
        self.stats.takeovers = self._takeover.total
        self._taken_over.add(self._connection)
        self._taken_over.discard(self._connection - 64)
        self.last_error = f"client id {self.client_id!r} taken over by another connection"
        if self._on_takeover is not None:
            try:
                self._on_takeover(self._connection)
            except Exception:
                log.exception("takeover hook failed")
        return delay

    def _closed_after_connack(self) -> ConnectFailed:
        """The broker accepted the connection and closed it at once: another connection with
        our client id may have come in between (a takeover the guard must see too)."""
        self._takeover.connected()
        exc = _ClosedAfterConnack(self.last_error or "connection closed right after CONNACK")
        exc.takeover_delay = self._takeover_delay()
        return exc

    async def _after_failure(self, exc: BaseException, *, next_try: str = "") -> None:
        """Count and log a failed attempt, and wait for the next one (``next_try``: what it
        tries differently; a command waiting for the outcome hears of that one instead)."""
        taken = exc.takeover_delay if isinstance(exc, _ClosedAfterConnack) else None
        if not isinstance(exc, _ClosedAfterConnack):
            self._takeover.connect_failed()  # the broker was away: no takeover streak
        self.stats.connect_failures += 1
        self.last_error = str(exc) or type(exc).__name__
        waiter = self._failure_waiter
        if waiter is not None and not waiter.done() and not next_try:
            waiter.set_result(exc)
        if taken is not None:
            await asyncio.sleep(taken)  # the guard said why
            return
        delay = self._backoff.next_delay_s()
        log.warning(
            "cannot connect to %s:%d (%s); retrying%s in %.2f s",
            self.config.host,
            self.config.port,
            self.last_error,
            f" with {next_try}" if next_try else "",
            delay,
        )
        await asyncio.sleep(delay)

    async def _after_connect(self, info: ConnectInfo) -> None:
        if info.session_present and self.stats.connects == 1 and not self._resubscribe:
            # A session kept from an earlier run holds the service's subscriptions (ADR 0002).
            self._unconfirmed.clear()
        subs = self._unconfirmed if info.session_present else self._subscriptions
        if subs:
            await self._subscribe_and_wait(list(subs.values()))
        if self._on_connect is not None:
            await self._on_connect(info)

    def _make_client(self) -> paho.Client:
        v5 = self._protocol == "5"
        client = DirectClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else not self._persistent,
            manual_ack=self._manual_ack,
            reconnect_on_failure=False,
        )
        client.keep_properties = self._keep_properties
        client.max_inflight_messages_set(self.config.receive_maximum)
        client.max_queued_messages_set(0)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        client.on_connect = self._on_connect_cb
        client.on_disconnect = self._on_disconnect_cb
        client.on_message = self._on_message_cb
        client.on_publish = self._on_publish_cb
        client.on_subscribe = self._on_subscribe_cb
        if self._will is not None:
            client.will_set(self._will.topic, self._will.payload, self._will.qos, self._will.retain)
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self.config.resolved_password())
        if self.config.uses_tls:  # no tls_ca_file: the system's CAs
            ca = self.config.tls_ca_file
            client.tls_set(ca_certs=None if ca is None else str(ca), cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(self.config.tls_insecure)
        return client

    async def _connect_once(self) -> ConnectInfo:
        assert self._loop is not None
        self._connection += 1
        self._lost.clear()
        self._server_reason = None
        self._peer_closed = False
        self._end_reason = None
        client = self._make_client()
        self._client = client
        self._connack = self._loop.create_future()
        props: Properties | None = None
        clean_start: Any = paho.MQTT_CLEAN_START_FIRST_ONLY
        if self._protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.config.session_expiry_s if self._persistent else 0
            props.ReceiveMaximum = self.config.receive_maximum
            if self.max_packet_bytes is not None:
                # The broker sends nothing larger (Mosquitto drops such a message for this
                # client and logs "Dropping too large outgoing PUBLISH"): a hostile size never
                # reaches this process's memory (docs/adr/0077-reconnect-schedule.md).
                props.MaximumPacketSize = self.max_packet_bytes
            clean_start = not self._persistent
        connect = client.connect
        try:
            rc = await asyncio.wait_for(
                self._loop.run_in_executor(
                    None,
                    lambda: connect(
                        self.config.host,
                        self.config.port,
                        self.config.keepalive_s,
                        clean_start=clean_start,
                        properties=props,
                    ),
                ),
                self.config.connect_timeout_s,
            )
        except TimeoutError as exc:  # from wait_for: its message is empty
            raise ConnectFailed(
                f"no answer within {self.config.connect_timeout_s:g} s (TCP or TLS connect)"
            ) from exc
        except OSError as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectFailed(paho.error_string(rc))
        if await self._unless_lost(self._connack, self.config.connect_timeout_s):
            info = self._connack.result()
            if self._lost.is_set():  # CONNACK, then the socket closed at once
                raise self._closed_after_connack()
            self._connected.set()
            return info
        if not self._lost.is_set():
            raise NoConnack("no CONNACK before the connect timeout")
        err = client.net_error if isinstance(client, DirectClient) else None
        if err is not None:
            # A reset (a link cut, a proxy refusing): the network's doing, no answer to the
            # CONNECT, so no reason to try another protocol version.
            raise ConnectFailed(f"network error before its CONNACK: {_os_text(err)}")
        if self._protocol == "5":
            # A 3.1.1-only broker may close the socket instead of answering an MQTT 5 CONNECT, but
            # so does a broker going down or a proxy without a broker: not a refusal, so MQTT 3.1.1
            # gets one try (_run) and is kept only if it works.
            raise _ClosedBeforeConnack("the broker closed the connection before its CONNACK")
        closed = "the broker closed the connection before its CONNACK"
        raise ConnectFailed(f"{closed} ({self.last_error})" if self.last_error else closed)

    async def _unless_lost(self, fut: asyncio.Future[Any], timeout_s: float | None = None) -> bool:
        """Wait for ``fut`` unless the connection drops first; True if ``fut`` finished."""
        lost: asyncio.Task[Any] = asyncio.ensure_future(self._lost.wait())
        try:
            done, _ = await asyncio.wait(
                [fut, lost], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost.cancel()
        return fut in done

    async def _subscribe_and_wait(self, subs: list[Subscription]) -> None:
        fut = self._send_subscribe(subs)
        if fut is None:
            raise Disconnected("not connected")
        if not await self._unless_lost(fut) or fut.cancelled():
            raise Disconnected("connection lost before SUBACK")
        for sub, code in zip(subs, fut.result(), strict=False):
            if code >= 0x80:
                log.error(
                    "broker refused subscription %r (reason code 0x%02x)", sub.topic_filter, code
                )

    def _send_subscribe(self, subs: list[Subscription]) -> asyncio.Future[list[int]] | None:
        client = self._client
        assert self._loop is not None
        if client is None:
            return None
        if self._protocol == "5":
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
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        self._suback[mid] = fut
        fut.add_done_callback(lambda f: self._confirmed(f, subs))
        return fut

    def _confirmed(self, suback: asyncio.Future[list[int]], subs: list[Subscription]) -> None:
        if suback.cancelled():
            return
        for sub in subs:
            if self._unconfirmed.get(sub.topic_filter) is sub:
                del self._unconfirmed[sub.topic_filter]

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            client = self._client
            if client is not None:
                if self._reading_paused:
                    self._keepalive_while_paused(client)
                client.loop_misc()

    def _keepalive_while_paused(self, client: paho.Client) -> None:
        """Keep the keep-alive of a connection whose reading is paused (ADR 0076).

        paho pings when nothing was written for a keep-alive, and only while no PINGRESP is
        awaited; it closes the connection a keep-alive after a PINGREQ whose PINGRESP it has not
        read. Paused, we read nothing: the PINGRESP waits behind the messages we hold back, so
        paho would ping once, stop pinging (the broker then drops us after 1.5 keep-alives of
        silence, if we have nothing else to send) and close the connection itself. While bytes
        wait unread (in the socket or read ahead), the broker has been heard from: paho is told
        so, and no PINGRESP is awaited any more, so it pings on schedule and keeps the
        connection. A silent socket gets no such credit: paho's own check applies to it.
        """
        sock = client.socket()
        if sock is None:
            return
        waiting = isinstance(client, DirectClient) and client.buffered() > 0
        if not (waiting or self._readable(sock)):
            return
        with client._msgtime_mutex:
            client._last_bytes_received = paho.time_func()
        client._ping_t = 0
        self.stats.paused_keepalives += 1

    def _close_client(self) -> None:
        client = self._client
        self._client = None
        if client is None:
            return
        if isinstance(client, DirectClient):
            self._bytes_before += client.bytes_received
        client.on_disconnect = None
        client.on_socket_close = None
        sock = client.socket()
        if sock is None:
            return
        with contextlib.suppress(Exception):
            if self._loop is not None:
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)
            sock.close()

    def _fail_pending(self, exc: MqttError) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: a caller that gave up must not log noise
        subacks, self._suback = self._suback, {}
        for sfut in subacks.values():
            if not sfut.done():
                sfut.cancel()

    # ------------------------------------------------------------------ paho callbacks
    def _in_loop(self, fn: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self._loop is not None
        self._reading_paused = False  # a new connection must read its CONNACK
        self._in_loop(self._loop.add_reader, sock, self._read, client)

    # ------------------------------------------------------------------ backpressure
    @property
    def reading_paused(self) -> bool:
        return self._reading_paused

    def pause_reading(self) -> None:
        """Stop reading from the broker until :meth:`resume_reading` (or the next connection)."""
        client = self._client
        sock = client.socket() if client is not None else None
        if self._reading_paused or sock is None or self._loop is None:
            return
        self._reading_paused = True
        self.stats.read_pauses += 1
        self._loop.remove_reader(sock)

    def resume_reading(self) -> None:
        client = self._client
        if not self._reading_paused:
            return
        self._reading_paused = False
        sock = client.socket() if client is not None else None
        if client is not None and sock is not None and self._loop is not None:
            self._loop.add_reader(sock, self._read, client)
            self._read_buffered_soon(client)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._in_loop(self._loop.remove_reader, sock)
        self._in_loop(self._loop.remove_writer, sock)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho has packets to send. They are written at the next turn of the loop, without
        # asking the selector first (two epoll_ctl calls and a wait per publish otherwise):
        # the socket almost always takes them, and the publishes of one turn go out together.
        # Only if it cannot take them all does the loop wait for it to become writable.
        self._in_loop(self._write_soon, client, sock)

    def _write_soon(self, client: paho.Client, sock: Any) -> None:
        if client in self._writes_due:
            return
        self._writes_due.add(client)
        assert self._loop is not None
        self._loop.call_soon(self._write_due, client, sock)

    def _write_due(self, client: paho.Client, sock: Any) -> None:
        self._writes_due.discard(client)
        if client is not self._client:
            self._drop_stale(client)
            return
        current = client.socket()
        if current is None or current is not sock:
            return  # closed (or replaced) meanwhile
        client.loop_write()
        if client.want_write() and client.socket() is current and self._loop is not None:
            with contextlib.suppress(ValueError, OSError):  # closed meanwhile
                self._loop.add_writer(current, self._write, client)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._in_loop(self._loop.remove_writer, sock)

    def _read(self, client: paho.Client) -> None:
        """Read what the socket holds, not one packet per wakeup.

        paho's ``loop_read`` reads ``len(out_messages) + len(in_messages)`` packets, at least
        one: a client that publishes nothing (the sensors' connection when the node has a
        separate uplink) read one frame per event-loop iteration, so each frame paid a whole
        iteration and the micro-batcher saw batches of one or two (bench/outage.py: 3,400
        frames/s against 8,000 with one connection). Packets wait in the socket or, read
        ahead, in the client (:meth:`DirectClient.buffered`): reading goes on while either
        holds some, and bytes still buffered when this wakeup's reads are used up (or when
        reading resumes) are read at the next turn of the loop, since the socket will not wake
        it for them (ADR 0006, ADR 0072).
        """
        if client is not self._client:
            self._drop_stale(client)
            return
        self.stats.read_wakeups += 1
        buffered = client.buffered if isinstance(client, DirectClient) else None
        for _ in range(READS_PER_WAKEUP):
            client.loop_read()
            if self._reading_paused or client is not self._client:
                return  # the handler asked for backpressure, or the connection is gone
            if buffered is not None and buffered():
                continue
            sock = client.socket()
            if sock is None or not self._readable(sock):
                return
        self._read_buffered_soon(client)

    def _read_buffered_soon(self, client: paho.Client) -> None:
        """Read at the next turn what ``client`` has buffered (its socket may be drained)."""
        if isinstance(client, DirectClient) and client.buffered() and self._loop is not None:
            self._loop.call_soon(self._read, client)

    def _readable(self, sock: Any) -> bool:
        """Bytes wait to be read: in a TLS (or WebSocket) layer's buffer, or in the kernel's."""
        pending = getattr(sock, "pending", None)
        if pending is not None and pending():
            return True
        try:
            if self._poll_sock is not sock:  # one poll object per connection, not per packet
                self._poller = select.poll()
                self._poller.register(sock, select.POLLIN)
                self._poll_sock = sock
            return bool(self._poller.poll(0))
        except (OSError, ValueError):  # closed meanwhile: the next loop_read reports it
            return False

    def _write(self, client: paho.Client) -> None:
        if client is self._client:
            client.loop_write()
        else:
            self._drop_stale(client)

    def _drop_stale(self, client: paho.Client) -> None:
        """Close the socket of a connect given up on (it finished in the executor after
        connect_timeout_s): left registered, it would wake the loop on every iteration."""
        sock = client.socket()
        if sock is None or self._loop is None:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            sock.close()

    def _on_connect_cb(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        fut = self._connack
        if fut is None or fut.done() or client is not self._client:
            return
        if reason_code.is_failure:
            value = int(reason_code.value)
            if self._protocol == "5" and value in _UNSUPPORTED_PROTOCOL:
                fut.set_exception(ProtocolRefused(str(reason_code), reason_code=value))
            else:
                fut.set_exception(
                    ConnectFailed(
                        f"broker refused the connection: {reason_code}", reason_code=value
                    )
                )
            return
        receive_max = 65535
        if properties is not None and hasattr(properties, "ReceiveMaximum"):
            receive_max = int(properties.ReceiveMaximum)
        self.broker_receive_maximum = receive_max
        limit = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self.broker_max_packet_bytes = int(limit) if limit is not None else None
        if receive_max < self.config.receive_maximum:
            # paho neither honours the broker's Receive Maximum nor lets it be set once connected.
            # This client is fresh, so nothing is in flight yet and lowering its window is safe.
            client._max_inflight_messages = receive_max
        fut.set_result(
            ConnectInfo(
                connection=self._connection,
                protocol=self._protocol,
                session_present=bool(flags.session_present),
                broker_receive_maximum=receive_max,
            )
        )

    def _on_disconnect_cb(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        if reason_code.is_failure:
            self.last_error = str(reason_code)
        if flags.is_disconnect_packet_from_server:
            self._server_reason = int(reason_code.value)
        self._peer_closed = bool(getattr(client, "peer_closed", False))
        self._end_reason = self._why_ended(client, flags, reason_code)
        # Now, not when _run gets to it: _run may itself be awaiting one of these futures (an
        # on_connect hook that publishes), and `connected` must not outlive the connection.
        self.known_down_at = time.monotonic()
        self._connected.clear()
        self._lost.set()
        self._fail_pending(Disconnected("session closed" if self._stopping else "connection lost"))

    def _why_ended(
        self, client: paho.Client, flags: paho.DisconnectFlags, reason_code: ReasonCode
    ) -> str:
        """Why a connection ended, in words, for the log line that says it ended."""
        code = int(reason_code.value)
        if flags.is_disconnect_packet_from_server:
            return f"the broker sent DISCONNECT: {reason_code} (reason code 0x{code:02x})"
        if code == _KEEP_ALIVE_TIMEOUT:
            return (
                "keep-alive timeout: nothing from the broker, not even a PINGRESP, within"
                f" keepalive_s ({self.config.keepalive_s} s)"
            )
        err = client.net_error if isinstance(client, DirectClient) else None
        if err is not None:
            return f"network error: {_os_text(err)}"
        if self._peer_closed:
            return "the broker closed the connection (no DISCONNECT)"
        if code == _PROTOCOL_ERROR:
            return "protocol error: the broker sent a malformed packet"
        if self._stopping:
            return "session closed"
        if code == _NORMAL:
            return "this client disconnected"
        return f"connection lost ({reason_code})"

    def _on_message_cb(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        handler = self._on_message
        if handler is None or client is not self._client:
            return
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # brokers should refuse these; never trust it
            topic = bytes(msg._topic).decode("utf-8", "replace")
        inbound = Inbound(
            topic=topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            mid=msg.mid,
            connection=self._connection,
            received_at=time.monotonic(),
            properties=getattr(msg, "properties", None) if self._keep_properties else None,
            dup=bool(msg.dup),
        )
        try:
            handler(inbound)
        except Exception:
            self.stats.handler_errors += 1
            log.exception("message handler failed on %r", topic)

    def _on_publish_cb(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        fut = self._pending.pop(mid, None)
        if fut is None or fut.done():
            return
        if reason_code.is_failure:
            fut.set_exception(
                PublishRejected(
                    f"broker rejected publish: {reason_code}", reason_code=int(reason_code.value)
                )
            )
        else:
            fut.set_result(None)

    def _on_subscribe_cb(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        fut = self._suback.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result([int(rc.value) for rc in reason_codes])
