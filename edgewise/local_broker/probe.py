"""MqttProbe: a small synchronous paho client for tests and smoke checks.

Everything that waits blocks on a :class:`threading.Condition` fed by paho's network thread
(CONNACK, SUBACK, PUBACK, PUBLISH, disconnect), with a deadline; nothing sleeps and polls.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgewise.local_broker.info import BrokerInfo

_ids = itertools.count(1)


def unique_client_id(prefix: str = "probe") -> str:
    """``{prefix}-{pid}-{counter}-{random}``: distinct across instances, processes and runs."""
    return f"{prefix}-{os.getpid()}-{next(_ids)}-{os.urandom(3).hex()}"


@dataclass(frozen=True, slots=True)
class Message:
    """One PUBLISH the probe received."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None
    """MQTT 5 properties (``None`` for MQTT 3.1.1 sessions)."""
    received_at: float
    """``time.monotonic()`` when paho handed it over."""


@dataclass(frozen=True, slots=True)
class DisconnectEvent:
    reason: ReasonCode
    from_server: bool
    """True when the broker sent a DISCONNECT packet (MQTT 5), False for a dropped socket."""


class ProbeError(RuntimeError):
    """A CONNECT/SUBSCRIBE/PUBLISH was refused or did not complete in time."""


class MqttProbe:
    """Synchronous MQTT client on a background paho loop (paho 2.x, callback API v2).

    ``connect()`` waits for the CONNACK; the socket gets ``TCP_NODELAY``. ``subscribe`` waits
    for the SUBACK, ``publish`` for the PUBACK (QoS 1) / PUBCOMP (QoS 2). Received messages
    are kept in order; ``wait_for``/``wait_count`` block until enough have arrived. After a
    lost connection paho reconnects by itself (``connect_count`` goes up); ``close()``
    disconnects and stops the loop.
    """

    def __init__(
        self,
        broker: BrokerInfo,
        client_id: str | None = None,
        *,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
        clean_session: bool = True,
        keepalive_s: int = 30,
    ) -> None:
        self.broker = broker
        self.client_id = client_id or unique_client_id()
        self.protocol = protocol
        self._cond = threading.Condition()
        self._messages: list[Message] = []
        self._connected = False
        self._connacks: list[tuple[ReasonCode, bool]] = []
        self._disconnects: list[DisconnectEvent] = []
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._socket: socket.socket | None = None
        self._closed = False
        self._loop_started = False
        self._keepalive_s = keepalive_s
        if protocol == MQTTProtocolVersion.MQTTv5:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol
            )
            self._clean_start = clean_session
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                protocol=protocol,
                clean_session=clean_session,
            )
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.client = client

    # -- paho callbacks (network thread) ----------------------------------------------
    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socket = sock

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._connacks.append((reason, flags.session_present))
            self._connected = not reason.is_failure
            self._cond.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._connected = False
            self._disconnects.append(
                DisconnectEvent(reason=reason, from_server=flags.is_disconnect_packet_from_server)
            )
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        message = Message(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            properties=props if self.protocol == MQTTProtocolVersion.MQTTv5 else None,
            received_at=time.monotonic(),
        )
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._subacks[mid] = list(reason_codes)
            self._cond.notify_all()

    # -- waiting helper ---------------------------------------------------------------
    def _wait(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Block (holding the condition's lock on return) until ``ready()``; ProbeError else."""
        if not self._cond.wait_for(ready, timeout=timeout_s):
            raise ProbeError(f"{self.client_id}: timed out after {timeout_s:g}s waiting for {what}")

    # -- connection -------------------------------------------------------------------
    def connect(self, timeout_s: float = 5.0) -> bool:
        """Connect and wait for the CONNACK; return the session-present flag.

        Raises :class:`ProbeError` when the broker refuses (the reason code is in the message)
        or nothing arrives in time.
        """
        with self._cond:
            seen = len(self._connacks)
        kwargs: dict[str, Any] = {"keepalive": self._keepalive_s}
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            kwargs["clean_start"] = self._clean_start
        self.client.connect(self.broker.host, self.broker.port, **kwargs)
        if not self._loop_started:
            self.client.loop_start()
            self._loop_started = True
        with self._cond:
            self._wait(lambda: len(self._connacks) > seen, timeout_s, "CONNACK")
            reason, session_present = self._connacks[seen]
        if reason.is_failure:
            raise ProbeError(f"{self.client_id}: CONNECT refused: {reason} ({reason.value})")
        return session_present

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._connected

    @property
    def connect_count(self) -> int:
        """CONNACKs received so far (accepted or not)."""
        with self._cond:
            return len(self._connacks)

    @property
    def connacks(self) -> list[tuple[ReasonCode, bool]]:
        """Every CONNACK as ``(reason, session_present)``."""
        with self._cond:
            return list(self._connacks)

    @property
    def disconnects(self) -> list[DisconnectEvent]:
        with self._cond:
            return list(self._disconnects)

    @property
    def socket(self) -> socket.socket | None:
        """The socket of the current (or last) connection."""
        return self._socket

    def wait_disconnected(self, timeout_s: float = 5.0) -> DisconnectEvent:
        """Wait until the connection is down (returns at once if it already is)."""
        with self._cond:
            self._wait(
                lambda: not self._connected and bool(self._disconnects), timeout_s, "a disconnect"
            )
            return self._disconnects[-1]

    def wait_connected(self, timeout_s: float = 5.0, *, count: int = 1) -> None:
        """Wait until connected after at least ``count`` accepted CONNACKs (e.g. ``2``: the
        automatic reconnect after a broker restart)."""

        def ready() -> bool:
            accepted = sum(1 for reason, _ in self._connacks if not reason.is_failure)
            return self._connected and accepted >= count

        with self._cond:
            self._wait(ready, timeout_s, f"connection #{count}")

    def close(self) -> None:
        """Disconnect (if connected) and stop the network thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.connected:
                self.client.disconnect()
        finally:
            if self._loop_started:
                self.client.loop_stop()

    def __enter__(self) -> MqttProbe:
        if not self.connected:
            self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- subscribe / publish ----------------------------------------------------------
    def subscribe(self, topic_filter: str, qos: int = 1, timeout_s: float = 5.0) -> int:
        """Subscribe and wait for the SUBACK; return the granted QoS (ProbeError if refused)."""
        result, mid = self.client.subscribe(topic_filter, qos)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise ProbeError(f"{self.client_id}: SUBSCRIBE {topic_filter!r} not sent: {result}")
        with self._cond:
            self._wait(lambda: mid in self._subacks, timeout_s, f"SUBACK for {topic_filter!r}")
            codes = self._subacks.pop(mid)
        granted = codes[0]
        if granted.is_failure:
            raise ProbeError(f"{self.client_id}: SUBSCRIBE {topic_filter!r} refused: {granted}")
        return int(granted.value)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        timeout_s: float = 5.0,
    ) -> None:
        """Publish and wait until paho reports it complete (PUBACK for QoS 1)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ProbeError(f"{self.client_id}: PUBLISH to {topic!r} failed: {info.rc}")
        info.wait_for_publish(timeout=timeout_s)
        if not info.is_published():
            raise ProbeError(
                f"{self.client_id}: no acknowledgement for PUBLISH to {topic!r} in {timeout_s:g}s"
            )

    def publish_many(
        self,
        topic: str,
        payloads: Sequence[bytes | str],
        qos: int = 1,
        timeout_s: float = 30.0,
    ) -> None:
        """Publish all ``payloads`` (paho pipelines them) and wait until every one is acked."""
        deadline = time.monotonic() + timeout_s
        infos = []
        for payload in payloads:
            info = self.client.publish(topic, payload, qos=qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise ProbeError(f"{self.client_id}: PUBLISH to {topic!r} failed: {info.rc}")
            infos.append(info)
        for i, info in enumerate(infos):
            info.wait_for_publish(timeout=max(deadline - time.monotonic(), 0.0))
            if not info.is_published():
                raise ProbeError(
                    f"{self.client_id}: {len(infos) - i} of {len(infos)} PUBLISHes to {topic!r}"
                    f" unacknowledged after {timeout_s:g}s"
                )

    # -- received messages ------------------------------------------------------------
    @property
    def messages(self) -> list[Message]:
        """Everything received so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    def clear(self) -> None:
        """Forget the messages received so far."""
        with self._cond:
            self._messages.clear()

    def wait_for(
        self,
        predicate: Callable[[Message], bool],
        timeout_s: float = 5.0,
        *,
        count: int = 1,
    ) -> list[Message]:
        """Wait until at least ``count`` received messages satisfy ``predicate``; return those
        matching messages (in arrival order). ProbeError on timeout, listing what did arrive."""

        def matching() -> list[Message]:
            return [m for m in self._messages if predicate(m)]

        with self._cond:
            if not self._cond.wait_for(lambda: len(matching()) >= count, timeout=timeout_s):
                got = matching()
                topics = sorted({m.topic for m in self._messages})
                raise ProbeError(
                    f"{self.client_id}: {len(got)}/{count} matching messages after"
                    f" {timeout_s:g}s ({len(self._messages)} received, topics {topics[:10]})"
                )
            return matching()

    def wait_count(self, n: int, timeout_s: float = 5.0) -> list[Message]:
        """Wait until ``n`` messages (any topic) have arrived; return all received so far."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= n, timeout=timeout_s):
                raise ProbeError(
                    f"{self.client_id}: {len(self._messages)}/{n} messages after {timeout_s:g}s"
                )
            return list(self._messages)
