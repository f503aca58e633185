"""MQTT 5 PUBLISH properties, sent and received without paho's per-instance work.

paho's :class:`~paho.mqtt.properties.Properties` builds its two tables of property names and
types anew for every instance, checks each attribute set by scanning every property name, and
packs and unpacks by scanning all of them again: on the benchmark machine about 37 µs to make
and pack the three properties an escalation carries (response topic, correlation data, message
expiry) and 43 µs to read them back, paid on every escalation and every reply at both ends
(docs/adr/0070-mqtt5-properties-fast-path.md).

- :class:`PublishProperties` (sending): a ``Properties`` (paho takes it wherever it takes one)
  with the tables shared by all instances and its few fields given at construction, packed
  there with paho's own encoders; it cannot be changed afterwards.
- :func:`read_publish_properties` (receiving): reads the properties section of a PUBLISH when
  it holds only the common properties (payload format, message expiry, content type, response
  topic, correlation data), each at most once, and is well formed; anything else (other
  properties, repeats, a section of 128 bytes or more, any malformation) it leaves to paho,
  which reads it or refuses it as it always did. What it accepts, paho accepts with the same
  values (``tests/test_mqtt_properties.py`` checks both on generated and hostile input).
"""

from __future__ import annotations

from typing import Any, Final

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers, writeBytes, writeInt32, writeUTF

from .errors import MqttError

_TABLES: Final = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]

_PAYLOAD_FORMAT_INDICATOR: Final = 1
_MESSAGE_EXPIRY_INTERVAL: Final = 2
_CONTENT_TYPE: Final = 3
_RESPONSE_TOPIC: Final = 8
_CORRELATION_DATA: Final = 9

_READ_NAMES: Final = {
    _PAYLOAD_FORMAT_INDICATOR: "PayloadFormatIndicator",
    _MESSAGE_EXPIRY_INTERVAL: "MessageExpiryInterval",
    _CONTENT_TYPE: "ContentType",
    _RESPONSE_TOPIC: "ResponseTopic",
    _CORRELATION_DATA: "CorrelationData",
}

_U32_MAX: Final = 2**32 - 1
_BINARY_MAX: Final = 65_535

EXPIRY_MAX_S: Final = _U32_MAX
"""The longest MQTT 5 message expiry interval the wire can carry (a four-byte integer)."""


def expiry_interval_s(remaining_s: float) -> int:
    """A message expiry interval for something worth delivering for ``remaining_s`` more
    seconds, clamped to what the wire carries: at least 1 s (0 would mean "expired"; the
    reader drops what is late anyway), at most :data:`EXPIRY_MAX_S`, rounded up. A value
    computed from received input (a case's deadline) can be anything: NaN and less than 1 s
    give 1, more than :data:`EXPIRY_MAX_S` gives the maximum, never an error."""
    if not remaining_s > 1.0:  # NaN too
        return 1
    if remaining_s >= EXPIRY_MAX_S:
        return EXPIRY_MAX_S
    whole = int(remaining_s)
    return whole if whole == remaining_s else whole + 1


class PublishProperties(Properties):
    """The MQTT 5 properties of one PUBLISH: message expiry (seconds), response topic and
    correlation data, each optional. Packed in the order paho packs them (by identifier)."""

    # Read by the inherited methods (__str__, json, isEmpty); never changed.
    names = _TABLES.names
    types = _TABLES.types
    properties = _TABLES.properties

    def __init__(
        self,
        *,
        message_expiry_interval_s: int | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> None:
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        packed = b""
        if message_expiry_interval_s is not None:
            if not 0 <= message_expiry_interval_s <= _U32_MAX:
                raise MqttError(
                    f"message expiry interval must be 0..{_U32_MAX} s,"
                    f" got {message_expiry_interval_s}"
                )
            object.__setattr__(self, "MessageExpiryInterval", message_expiry_interval_s)
            packed += bytes((_MESSAGE_EXPIRY_INTERVAL,)) + writeInt32(message_expiry_interval_s)  # type: ignore[no-untyped-call]
        if response_topic is not None:
            if len(response_topic.encode()) > _BINARY_MAX:
                raise MqttError(f"response topic is longer than {_BINARY_MAX} bytes")
            object.__setattr__(self, "ResponseTopic", response_topic)
            packed += bytes((_RESPONSE_TOPIC,)) + writeUTF(response_topic)  # type: ignore[no-untyped-call]
        if correlation_data is not None:
            if len(correlation_data) > _BINARY_MAX:
                raise MqttError(f"correlation data is longer than {_BINARY_MAX} bytes")
            object.__setattr__(self, "CorrelationData", correlation_data)
            packed += bytes((_CORRELATION_DATA,)) + writeBytes(correlation_data)  # type: ignore[no-untyped-call]
        length: bytes = VariableByteIntegers.encode(len(packed))  # type: ignore[no-untyped-call]
        object.__setattr__(self, "_packed", length + packed)

    def pack(self) -> bytes:
        packed: bytes = object.__getattribute__(self, "_packed")
        return packed

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"PublishProperties are fixed when made (cannot set {name})")

    def clear(self) -> None:
        raise AttributeError("PublishProperties are fixed when made (cannot clear)")

    def unpack(self, buffer: Any) -> Any:
        raise AttributeError("PublishProperties are fixed when made (cannot unpack into)")


class ReceivedProperties(Properties):
    """The properties of a received PUBLISH as :func:`read_publish_properties` read them: a
    ``Properties`` read the usual way (``props.ResponseTopic``), with the tables shared."""

    names = _TABLES.names
    types = _TABLES.types
    properties = _TABLES.properties

    def __init__(self) -> None:
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)


def read_publish_properties(
    packet: bytes | bytearray, pos: int, *, keep: bool = True
) -> tuple[ReceivedProperties | None, int] | None:
    """Read the properties section of an MQTT 5 PUBLISH that starts at ``packet[pos]``.

    Returns (the properties, or None unless ``keep``; the position after the section), or
    None when the section is anything but the common case (see the module docstring): the
    caller then hands the packet to paho.
    """
    n = len(packet)
    if pos >= n:
        return None
    length = packet[pos]
    if length & 0x80:  # 128 bytes or more (a longer variable byte integer): paho's
        return None
    pos += 1
    end = pos + length
    if end > n:
        return None
    props = ReceivedProperties() if keep else None
    seen = 0
    while pos < end:
        ident = packet[pos]
        pos += 1
        name = _READ_NAMES.get(ident)
        if name is None or seen & (1 << ident):
            return None
        seen |= 1 << ident
        value: int | str | bytes
        if ident == _MESSAGE_EXPIRY_INTERVAL:
            if pos + 4 > end:
                return None
            value = int.from_bytes(packet[pos : pos + 4], "big")
            pos += 4
        elif ident == _PAYLOAD_FORMAT_INDICATOR:
            if pos >= end:
                return None
            value = packet[pos]
            pos += 1
            if value > 1:
                return None
        else:
            if pos + 2 > end:
                return None
            size = (packet[pos] << 8) | packet[pos + 1]
            pos += 2
            if pos + size > end:
                return None
            raw = bytes(packet[pos : pos + size])
            pos += size
            if ident == _CORRELATION_DATA:
                value = raw
            else:
                try:
                    value = raw.decode("utf-8")
                except UnicodeDecodeError:
                    return None
                # What MQTT forbids in a UTF-8 string (1.5.4): U+0000 and U+FEFF (the
                # surrogates D800-DFFF never decode from UTF-8).
                if "\x00" in value or "\ufeff" in value:
                    return None
        if props is not None:
            object.__setattr__(props, name, value)
    return props, end
