"""The site-to-cloud broker bridge: durable, bounded, ordered, and it says what it dropped.

``edgewise bridge --config bridge.toml`` runs :func:`run_bridge`. Rules map a topic filter on
one broker to a topic template on the other; each direction has its own SQLite queue (the
``outbox`` package): a message is acknowledged to its source only once it is durable there, and
leaves it only after the far broker's PUBACK. Docs: docs/bridge.md. Exceptions live in
:mod:`broker_bridge.errors` (tree in its docstring).
"""

from broker_bridge.bridge import Bridge
from broker_bridge.config import AcksConfig, BridgeConfig, ForwardConfig, QueueConfig, RuleConfig
from broker_bridge.errors import BridgeError, ConfigError, QueueUnusable
from broker_bridge.rules import CompiledRule, compile_rule
from broker_bridge.service import run_bridge
from broker_bridge.wire import BridgeTelemetry, DirectionTelemetry, decode_telemetry

__all__ = [
    "AcksConfig",
    "Bridge",
    "BridgeConfig",
    "BridgeError",
    "BridgeTelemetry",
    "CompiledRule",
    "ConfigError",
    "DirectionTelemetry",
    "ForwardConfig",
    "QueueConfig",
    "QueueUnusable",
    "RuleConfig",
    "compile_rule",
    "decode_telemetry",
    "run_bridge",
]
