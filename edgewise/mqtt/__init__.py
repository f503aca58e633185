"""The MQTT session every edgewise service shares: one asyncio loop, paho underneath.

Exceptions live in :mod:`edgewise.mqtt.errors` (tree in its docstring).
"""

from edgewise.mqtt.backoff import Backoff
from edgewise.mqtt.config import MqttConfig, shown_input
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
from edgewise.mqtt.properties import PublishProperties
from edgewise.mqtt.session import (
    PACKET_OVERHEAD_BYTES,
    ConnectInfo,
    MqttSession,
    SessionStats,
    Subscription,
    Will,
    max_packet_for,
)
from edgewise.mqtt.takeover import Conflict

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
