"""The MQTT session every edgewise service shares: one asyncio loop, paho underneath.

Exceptions live in :mod:`mqtt_session.errors` (tree in its docstring).
"""

from mqtt_session.backoff import Backoff
from mqtt_session.config import MqttConfig, shown_input
from mqtt_session.errors import (
    ConnectFailed,
    Disconnected,
    MqttError,
    NoConnack,
    ProtocolRefused,
    PublishFailed,
    PublishRejected,
    SubscribeRefused,
)
from mqtt_session.message import Inbound
from mqtt_session.properties import PublishProperties
from mqtt_session.session import (
    PACKET_OVERHEAD_BYTES,
    ConnectInfo,
    MqttSession,
    SessionStats,
    Subscription,
    Will,
    max_packet_for,
)
from mqtt_session.takeover import Conflict

__all__ = [
    "PACKET_OVERHEAD_BYTES",
    "Backoff",
    "Conflict",
    "ConnectFailed",
    "ConnectInfo",
    "Disconnected",
    "Inbound",
    "MqttConfig",
    "MqttError",
    "MqttSession",
    "NoConnack",
    "ProtocolRefused",
    "PublishFailed",
    "PublishProperties",
    "PublishRejected",
    "SessionStats",
    "SubscribeRefused",
    "Subscription",
    "Will",
    "max_packet_for",
    "shown_input",
]
