"""Exceptions raised by :mod:`edgewise.mqtt`.

paho-mqtt's return codes and exceptions are translated here, at one boundary; callers never see
paho types in an exception.

Tree::

    MqttError
    ├── ConnectFailed          the broker could not be reached or refused the CONNECT
    │   ├── ProtocolRefused    the broker refused the MQTT version (5 → 3.1.1 fallback)
    │   └── NoConnack          the socket connected but no CONNACK came before the timeout
    ├── Disconnected           the connection dropped before an awaited acknowledgement arrived
    ├── PublishFailed          the client refused to queue a publish (e.g. payload too large)
    ├── PublishRejected        the broker's PUBACK carried a failure reason code (MQTT 5)
    └── SubscribeRefused       the broker's SUBACK refused a subscription
"""

from __future__ import annotations


class MqttError(Exception):
    """Base class of every error raised by edgewise.mqtt."""


class ConnectFailed(MqttError):
    """The broker could not be reached, or it refused the connection."""

    def __init__(self, message: str, *, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class ProtocolRefused(ConnectFailed):
    """The broker refused the requested MQTT protocol version."""


class NoConnack(ConnectFailed):
    """The TCP connection was made but the broker never answered the CONNECT.

    Some MQTT 3.1.1-only brokers (amqtt) misread an MQTT 5 CONNECT and wait for bytes that never
    come, so in ``protocol = "auto"`` this also triggers one MQTT 3.1.1 attempt.
    """


class Disconnected(MqttError):
    """The connection dropped while an acknowledgement was awaited; it may not have arrived."""


class PublishFailed(MqttError):
    """The client refused to queue a publish; ``transient`` if trying again later may work."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class PublishRejected(MqttError):
    """The broker answered a publish with an MQTT 5 failure reason code (e.g. not authorized)."""

    def __init__(self, message: str, *, reason_code: int) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class SubscribeRefused(MqttError):
    """The broker refused a subscription (a SUBACK reason code of 0x80 or more)."""

    def __init__(self, message: str, *, topic_filter: str, reason_code: int) -> None:
        super().__init__(message)
        self.topic_filter = topic_filter
        self.reason_code = reason_code
