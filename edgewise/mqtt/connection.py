"""One connection attempt: a fresh paho client, its CONNECT, and what the broker answered.

:class:`Connector` makes the client of each connection, connects it (in an executor: paho's
connect blocks), waits for the CONNACK and says why an attempt failed, in the terms the
reconnect machine (:mod:`edgewise.mqtt.reconnect`) decides on: a refused protocol version, no
CONNACK, a close before or right after it. It also hears of the connection's end and says why,
in words, for the log line, and hands what the broker sends on to the session.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgewise.mqtt import paho_guard
from edgewise.mqtt.client import DirectClient
from edgewise.mqtt.errors import ConnectFailed, Disconnected, NoConnack, ProtocolRefused
from edgewise.mqtt.message import inbound_from
from edgewise.mqtt.pending_acks import unless_lost

if TYPE_CHECKING:
    from edgewise.mqtt.session import MqttSession

log = logging.getLogger("edgewise.mqtt.session")
"""The session's logger: these lines are the session's, wherever the code lives."""

Protocol = Literal["5", "3.1.1"]
_UNSUPPORTED_PROTOCOL = (0x84, 0x01)  # MQTT 5 "Unsupported Protocol Version"; 3.1.1 CONNACK rc 1
_KEEP_ALIVE_TIMEOUT = 0x8D
"""The reason code paho reports when it ends a connection for a missing PINGRESP."""
_PROTOCOL_ERROR = 0x82
_NORMAL = 0x00


def _os_text(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


class ClosedBeforeConnack(NoConnack):
    """The broker (or a proxy before it) closed the connection after the CONNECT, with no
    CONNACK and no socket error."""


class ClosedAfterConnack(ConnectFailed):
    """The broker closed the connection right after its CONNACK."""

    takeover_delay: float | None = None


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class ConnectInfo:
    """What the broker told us when a connection came up."""

    connection: int
    protocol: Protocol
    session_present: bool
    broker_receive_maximum: int


class Connector:
    """Makes, connects and watches the client of each of a session's connections."""

    def __init__(self, session: MqttSession) -> None:
        self.s = session
        self.connack: asyncio.Future[ConnectInfo] | None = None
        self.server_reason: int | None = None
        """The reason code of the broker's DISCONNECT that ended the connection, if any."""
        self.peer_closed = False
        """The broker closed the connection (end of stream, no DISCONNECT, no socket error)."""
        self.end_reason: str | None = None
        """Why the connection ended, in words."""

    def make_client(self) -> paho.Client:
        s = self.s
        v5 = s._protocol == "5"
        # The fast path only where paho's private members checked out (ADR 0079).
        make = DirectClient if paho_guard.VERDICT.fast else paho.Client
        client = make(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else not s._persistent,
            manual_ack=s._manual_ack,
            reconnect_on_failure=False,
        )
        if isinstance(client, DirectClient):
            client.keep_properties = s._keep_properties
        client.max_inflight_messages_set(s.config.receive_maximum)
        client.max_queued_messages_set(0)
        client.on_connect = self.on_connack
        client.on_disconnect = self.on_disconnect
        client.on_message = self.on_message
        client.on_publish = self.on_publish
        client.on_subscribe = self.on_subscribe
        will = s._will
        if will is not None:
            client.will_set(will.topic, will.payload, will.qos, will.retain)
        if s.config.username is not None:
            client.username_pw_set(s.config.username, s.config.resolved_password())
        if s.config.uses_tls:  # no tls_ca_file: the system's CAs
            ca = s.config.tls_ca_file
            client.tls_set(ca_certs=None if ca is None else str(ca), cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(s.config.tls_insecure)
        return client

    async def connect_once(self) -> ConnectInfo:
        s = self.s
        loop = s._loop
        assert loop is not None
        s._connection += 1
        s._lost.clear()
        self.server_reason = None
        self.peer_closed = False
        self.end_reason = None
        client = s._make_client()
        s._driver.attach(client)
        self.connack = loop.create_future()
        props: Properties | None = None
        clean_start: Any = paho.MQTT_CLEAN_START_FIRST_ONLY
        config = s.config
        if s._protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = config.session_expiry_s if s._persistent else 0
            props.ReceiveMaximum = config.receive_maximum
            if s.max_packet_bytes is not None:
                # The broker sends nothing larger (Mosquitto drops such a message for this
                # client and logs "Dropping too large outgoing PUBLISH"): a hostile size never
                # reaches this process's memory (docs/adr/0077-reconnect-schedule.md).
                props.MaximumPacketSize = s.max_packet_bytes
            clean_start = not s._persistent
        connect = client.connect
        try:
            rc = await asyncio.wait_for(
                loop.run_in_executor(
                    None,
                    lambda: connect(
                        config.host,
                        config.port,
                        config.keepalive_s,
                        clean_start=clean_start,
                        properties=props,
                    ),
                ),
                config.connect_timeout_s,
            )
        except TimeoutError as exc:  # from wait_for: its message is empty
            raise ConnectFailed(
                f"no answer within {config.connect_timeout_s:g} s (TCP or TLS connect)"
            ) from exc
        except OSError as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectFailed(paho.error_string(rc))
        if await unless_lost(self.connack, s._lost, config.connect_timeout_s):
            info = self.connack.result()
            if s._lost.is_set():  # CONNACK, then the socket closed at once
                raise s._reconnect.closed_after_connack()
            s._connected.set()
            return info
        if not s._lost.is_set():
            raise NoConnack("no CONNACK before the connect timeout")
        err = client.net_error if isinstance(client, DirectClient) else None
        if err is not None:
            # A reset (a link cut, a proxy refusing): the network's doing, no answer to the
            # CONNECT, so no reason to try another protocol version.
            raise ConnectFailed(f"network error before its CONNACK: {_os_text(err)}")
        if s._protocol == "5":
            # A 3.1.1-only broker may close the socket instead of answering an MQTT 5 CONNECT, but
            # so does a broker going down or a proxy without a broker: not a refusal, so MQTT 3.1.1
            # gets one try (edgewise.mqtt.reconnect) and is kept only if it works.
            raise ClosedBeforeConnack("the broker closed the connection before its CONNACK")
        closed = "the broker closed the connection before its CONNACK"
        raise ConnectFailed(f"{closed} ({s.last_error})" if s.last_error else closed)

    # ------------------------------------------------------------------ paho callbacks
    def on_connack(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        s = self.s
        fut = self.connack
        if fut is None or fut.done() or client is not s._client:
            return
        if reason_code.is_failure:
            value = int(reason_code.value)
            if s._protocol == "5" and value in _UNSUPPORTED_PROTOCOL:
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
        s.broker_receive_maximum = receive_max
        limit = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        s.broker_max_packet_bytes = int(limit) if limit is not None else None
        if receive_max < s.config.receive_maximum:
            # paho neither honours the broker's Receive Maximum nor lets it be set once connected.
            # This client is fresh, so nothing is in flight yet and lowering its window is safe.
            # (A paho without the attribute sets it in vain: the guard warned at import.)
            client._max_inflight_messages = receive_max
        fut.set_result(
            ConnectInfo(
                connection=s._connection,
                protocol=s._protocol,
                session_present=bool(flags.session_present),
                broker_receive_maximum=receive_max,
            )
        )

    def on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        s = self.s
        if client is not s._client:
            return
        if reason_code.is_failure:
            s.last_error = str(reason_code)
        if flags.is_disconnect_packet_from_server:
            self.server_reason = int(reason_code.value)
        self.peer_closed = bool(getattr(client, "peer_closed", False))
        self.end_reason = self._why_ended(client, flags, reason_code)
        # Now, not when the reconnect loop gets to it: it may itself be awaiting one of these
        # futures (an on_connect hook that publishes), and `connected` must not outlive the
        # connection.
        s.known_down_at = time.monotonic()
        s._connected.clear()
        s._lost.set()
        s._acks.fail_all(Disconnected("session closed" if s._stopping else "connection lost"))

    def on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        s = self.s
        handler = s._on_message
        if handler is None or client is not s._client:
            return
        inbound = inbound_from(msg, s._connection, keep_properties=s._keep_properties)
        try:
            handler(inbound)
        except Exception:
            s.stats.handler_errors += 1
            log.exception("message handler failed on %r", inbound.topic)

    def on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is self.s._client:
            self.s._acks.on_puback(mid, reason_code)

    def on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self.s._acks.on_suback(mid, reason_codes)

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
                f" keepalive_s ({self.s.config.keepalive_s} s)"
            )
        err = client.net_error if isinstance(client, DirectClient) else None
        if err is not None:
            return f"network error: {_os_text(err)}"
        if self.peer_closed:
            return "the broker closed the connection (no DISCONNECT)"
        if code == _PROTOCOL_ERROR:
            return "protocol error: the broker sent a malformed packet"
        if self.s._stopping:
            return "session closed"
        if code == _NORMAL:
            return "this client disconnected"
        return f"connection lost ({reason_code})"
