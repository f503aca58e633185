"""paho's client, minus per-message work this package never uses.

paho looks up per-topic callbacks (``message_callback_add``) for every PUBLISH it receives:
it decodes the topic, walks its topic matcher and takes two locks, before it calls
``on_message``. ``MqttSession`` registers no per-topic callbacks and drives the client from its
event loop's thread only, so that look-up found nothing and the locks guarded nothing: about 6 %
of an edge node's event loop in a flood of small frames (py-spy, docs/benchmarks.md).
:class:`DirectClient` calls ``on_message`` straight away instead.

For every PUBACK, paho builds two reason codes and two property sets (~15 µs on the benchmark
machine), also for the short PUBACKs of successful QoS 1 publishes: two bytes (MQTT 3.1.1
always; MQTT 5 when the reason is "Success" and there are no properties) or three (MQTT 5
with a success reason and no properties, such as Mosquitto's "No matching subscribers").
:class:`DirectClient` hands the publish callback a shared reason code and a shared empty
property set for those, and leaves every other PUBACK (a refusal, properties) to paho
(docs/adr/0070-mqtt5-properties-fast-path.md).

For every PUBLISH received over MQTT 5, paho builds and fills a ``Properties`` (~12 µs when
there are none, ~43 µs for an escalation's three). :class:`DirectClient` reads QoS 0 and 1
PUBLISH packets itself when their properties are the common ones
(:func:`~edgewise.mqtt.properties.read_publish_properties`), and makes none at all for a session
that does not keep them (``keep_properties``); every other PUBLISH is paho's, as before.

After every PUBACK, paho looks for publishes queued behind its in-flight window by scanning
every message in flight (``_update_inflight``): with hundreds in flight, as a worker's replies
in a flood, that scan was a fifth of the worker's event loop (py-spy). :class:`DirectClient`
keeps the ids of the publishes that were queued (the window was full, or a reconnect put
messages back), oldest first, and sends from them as slots free: no scan.

paho reads a packet with a ``recv`` system call per byte of its fixed header and one for the
rest: three or four per packet, ~7 per escalation a worker answers (its PUBLISH, and the PUBACK
of its reply). :class:`DirectClient` reads what the socket holds (up to
:data:`READ_AHEAD_BYTES`) in one call and serves paho's reads from that; the session reads on
while bytes are buffered (:meth:`DirectClient.buffered`). paho also sends each queued packet
with a ``send`` of its own; :class:`DirectClient` joins the packets queued at once (PUBACKs
after a commit, replies) into one ``send``, except those paho must act on once written (a QoS 0
PUBLISH, DISCONNECT) (docs/adr/0072-buffered-socket-io.md).

This overrides private methods of paho 2.x (``Client._handle_publish``,
``Client._handle_on_message``, called by it for QoS 0 and 1, ``Client._handle_pubackcomp``,
``Client._update_inflight``, ``Client._messages_reconnect_reset_out``, ``Client._sock_recv``,
called by ``Client._packet_read``, ``Client._sock_send``, called by ``Client._packet_write``,
``Client._packet_write`` and ``Client._sock_close``). ``_sock_recv`` and ``_sock_send`` also
note the first socket error (:attr:`DirectClient.net_error`: why a connection ended) and count
the bytes received.
``tests/test_mqtt_session_client.py`` checks that paho still has them and still calls them,
so an upgrade that changes either fails there, not silently; at run time,
:mod:`edgewise.mqtt.paho_guard` checks them at import, and a paho whose members are not what
this class expects (or whose version it was not verified with) gets plain ``paho.Client``
instead (docs/adr/0079-paho-guard.md).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final, Literal, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .properties import ReceivedProperties, read_publish_properties

PUBACK_SUCCESS: Final = ReasonCode(PacketTypes.PUBACK)
"""The reason code of every two-byte PUBACK (shared: callbacks must not change it)."""

_SHORT_PUBACK_REASONS: Final = {
    0x00: PUBACK_SUCCESS,
    0x10: ReasonCode(PacketTypes.PUBACK, identifier=0x10),  # No matching subscribers
}
"""The success reasons a three-byte PUBACK may carry (shared: callbacks must not change them)."""

NO_PUBACK_PROPERTIES: Final = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
"""The properties of every short PUBACK: none (shared: callbacks must not change it)."""

READ_AHEAD_BYTES: Final = 256 * 1024
"""Most bytes one ``recv`` takes from the socket (paho asks for one to a few at a time)."""

WRITE_JOIN_BYTES: Final = 256 * 1024
"""Queued packets are joined into one ``send`` up to about this many bytes."""

_PUBLISH: Final = 0x30
_DISCONNECT: Final = 0xE0


class Publish(NamedTuple):
    """A received PUBLISH as :func:`read_publish_v5` reads it."""

    topic: bytes
    mid: int
    qos: int
    dup: bool
    retain: bool
    properties: ReceivedProperties | None
    payload: bytes


def read_publish_v5(
    header: int, packet: bytes | bytearray, *, keep_properties: bool = True
) -> Publish | None:
    """An MQTT 5 QoS 0 or 1 PUBLISH (``header``: its first byte; ``packet``: what follows the
    remaining length) whose properties :func:`read_publish_properties` reads; None for any
    other (QoS 2, other properties, malformed), which paho then reads or refuses."""
    qos = (header & 0x06) >> 1
    n = len(packet)
    if qos > 1 or n < 2:
        return None
    pos = 2 + ((packet[0] << 8) | packet[1])
    if pos > n:
        return None
    topic = bytes(packet[2:pos])
    mid = 0
    if qos:
        if pos + 2 > n:
            return None
        mid = (packet[pos] << 8) | packet[pos + 1]
        pos += 2
    read = read_publish_properties(packet, pos, keep=keep_properties)
    if read is None:
        return None
    properties, pos = read
    return Publish(
        topic, mid, qos, bool(header & 0x08), bool(header & 0x01), properties, bytes(packet[pos:])
    )


class DirectClient(paho.Client):
    """A paho client whose received messages go to ``on_message`` only, without locks."""

    keep_properties: bool = True
    """False: messages received over MQTT 5 may come without their properties (None)."""

    _queued: deque[int] | None = None
    """The ids of publishes that may be waiting for a slot in the in-flight window, oldest
    first (paho sends them in that order); None or empty: none is waiting."""

    _read_buf: bytes = b""
    """Bytes read from the socket and not yet handed to paho (from ``_read_pos`` on)."""
    _read_pos: int = 0

    peer_closed: bool = False
    """The broker closed the connection: a read found the end of the stream (not a socket
    error). Mosquitto closes a connection so when another takes its client id
    (:mod:`edgewise.mqtt.takeover`)."""

    net_error: OSError | None = None
    """The first socket error a read or a write met (a reset, a broken pipe …): the connection
    was lost to the network, not closed by the broker."""

    bytes_received: int = 0
    """Bytes read from the socket (TLS: after decryption), whatever they held."""

    def buffered(self) -> int:
        """Bytes read from the socket that paho has not taken yet: while there are any, reading
        must go on even though the socket itself may not be readable."""
        return len(self._read_buf) - self._read_pos

    def _sock_recv(self, bufsize: int) -> bytes:
        buf, pos = self._read_buf, self._read_pos
        if pos < len(buf):
            end = pos + bufsize
            if end >= len(buf):
                self._read_buf, self._read_pos = b"", 0
                return buf[pos:] if pos else buf
            self._read_pos = end
            return buf[pos:end]
        try:
            data = super()._sock_recv(max(bufsize, READ_AHEAD_BYTES))
        except BlockingIOError:
            raise
        except OSError as err:
            if self.net_error is None and self._sock is not None:
                self.net_error = err
            raise
        if not data:
            self.peer_closed = True
        self.bytes_received += len(data)
        if len(data) <= bufsize:
            return data
        self._read_buf, self._read_pos = data, bufsize
        return data[:bufsize]

    def _sock_send(self, buf: bytes | bytearray) -> int:
        try:
            return super()._sock_send(buf)
        except BlockingIOError:
            raise
        except OSError as err:
            if self.net_error is None and self._sock is not None:
                self.net_error = err
            raise

    def _sock_close(self) -> None:
        self._read_buf, self._read_pos = b"", 0  # what was read belongs to the closed socket
        super()._sock_close()

    def _packet_write(self) -> MQTTErrorCode:
        """Send the packets queued, several in one ``send`` where paho needs to do nothing once
        they are written; the rest (and a lone packet) as paho does."""
        out = self._out_packet
        while len(out) > 1:
            parts: list[bytes | bytearray | memoryview] = []
            size = 0
            for packet in out:
                command = packet["command"] & 0xF0
                if command == _DISCONNECT or (command == _PUBLISH and packet["qos"] == 0):
                    break
                data = packet["packet"]
                pos = packet["pos"]
                parts.append(memoryview(data)[pos:] if pos else data)
                size += packet["to_process"]
                if size >= WRITE_JOIN_BYTES:
                    break
            if len(parts) < 2:
                break
            try:
                sent = written = self._sock_send(b"".join(parts))
            except (AttributeError, ValueError):
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as err:
                self._easy_log(paho.MQTT_LOG_ERR, "failed to send on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            with self._msgtime_mutex:
                self._last_msg_out = paho.time_func()
            while written > 0:  # drop the packets written whole; the last may be partly
                packet = out[0]
                if written >= packet["to_process"]:
                    written -= packet["to_process"]
                    packet["pos"] += packet["to_process"]
                    packet["to_process"] = 0
                    out.popleft()
                else:
                    packet["pos"] += written
                    packet["to_process"] -= written
                    written = 0
            if sent < size:
                return MQTTErrorCode.MQTT_ERR_SUCCESS  # the socket is full: wait for it
        return super()._packet_write()

    def publish(self, *args: Any, **kwargs: Any) -> paho.MQTTMessageInfo:
        info = super().publish(*args, **kwargs)
        message = self._out_messages.get(info.mid)
        if message is not None and message.state == paho.mqtt_ms_queued:
            if self._queued is None:
                self._queued = deque()
            self._queued.append(info.mid)
        return info

    def _messages_reconnect_reset_out(self) -> None:
        super()._messages_reconnect_reset_out()  # messages beyond the window are queued again
        queued = paho.mqtt_ms_queued
        self._queued = deque(mid for mid, m in self._out_messages.items() if m.state == queued)

    def _update_inflight(self) -> MQTTErrorCode:
        """Send queued publishes while the window has room, oldest first, as paho's does, but
        from the queued ids instead of a scan of every message in flight."""
        waiting = self._queued
        if not waiting:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        out, queued = self._out_messages, paho.mqtt_ms_queued
        while waiting and self._inflight_messages < self._max_inflight_messages:
            m = out.get(waiting.popleft())
            if m is None or m.state != queued:
                continue  # sent or gone since
            self._inflight_messages += 1
            m.state = paho.mqtt_ms_wait_for_puback if m.qos == 1 else paho.mqtt_ms_wait_for_pubrec
            rc = self._send_publish(
                m.mid, m.topic.encode("utf-8"), m.payload, m.qos, m.retain, m.dup,
                properties=m.properties,
            )  # fmt: skip
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_publish(self) -> MQTTErrorCode:
        if self._protocol != paho.MQTTv5:
            return super()._handle_publish()
        got = read_publish_v5(
            self._in_packet["command"], self._in_packet["packet"],
            keep_properties=self.keep_properties,
        )  # fmt: skip
        if got is None:
            return super()._handle_publish()
        message = paho.MQTTMessage(mid=got.mid, topic=got.topic)
        message.dup = got.dup
        message.qos = got.qos
        message.retain = got.retain
        message.properties = got.properties
        message.payload = got.payload
        message.timestamp = paho.time_func()
        self._handle_on_message(message)
        if got.qos == 1 and not self._manual_ack:
            return self._send_puback(got.mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def message_callback_add(self, sub: str, callback: paho.CallbackOnMessage) -> None:
        raise NotImplementedError("DirectClient delivers every message to on_message")

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        on_message = self.on_message
        if on_message is not None:
            # No exception handling here: the session's callback catches and counts its own.
            on_message(self, self._userdata, message)

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        size = len(packet)
        if cmd != "PUBACK" or size > 3:
            return super()._handle_pubackcomp(cmd)
        if size == 2:
            reason = PUBACK_SUCCESS
        elif size == 3 and self._protocol == paho.MQTTv5:
            known = _SHORT_PUBACK_REASONS.get(packet[2])
            if known is None:  # a refusal: paho decodes it
                return super()._handle_pubackcomp(cmd)
            reason = known
        else:  # malformed: paho says so
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:  # told once only, as paho does
                return self._do_on_publish(mid, reason, NO_PUBACK_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS
