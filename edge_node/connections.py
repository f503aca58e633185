"""The node's two connections: frames in on one, everything the node publishes on the uplink.

Everything the node publishes goes out on a connection of its own, the uplink: to a separate
broker if one is configured (sensors on a site broker, results straight to the cloud), else to
the sensors' broker. The frames' connection stops reading while the node holds as many frames
as it may; the PUBACKs of results must never wait behind frames held back there
(docs/adr/0076-intake-bounds.md). On the sensors' broker the status (and the will) stays with
the frames' connection, whose subscription it vouches for; a separate uplink broker gets it
too. ``client_id_conflict`` is said on both either way (:mod:`edge_node.status`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edge_node.config import NodeConfig
from edge_node.status import NodeStatus
from edgewise.mqtt import Conflict, ConnectInfo, Inbound, MqttSession, Will, max_packet_for

OnConnect = Callable[[ConnectInfo], Awaitable[None]]
OnMessage = Callable[[Inbound], None]


@dataclass(frozen=True, slots=True)
class Handlers:
    """What each connection calls back."""

    frames: OnMessage
    frames_connected: OnConnect
    uplink_message: OnMessage
    """Confirmations (end-to-end mode) come on the uplink."""
    uplink_connected: OnConnect
    taken_over: Callable[[int], None]


def connect_node(
    config: NodeConfig, status: NodeStatus, conflict: Conflict, on: Handlers
) -> tuple[MqttSession, MqttSession]:
    """The frames' connection and the uplink, each linked to the status as it says it."""
    node_id = config.node_id
    will = Will(status.topic, status.payload("offline", ["connection_lost"]))
    # The broker sends nothing larger than a frame can be (issue 16 point 8, ADR 0077).
    max_packet = max_packet_for(config.limits.max_payload_bytes)
    frames = MqttSession(
        config.mqtt,
        client_id=f"edgewise-node-{node_id}",
        on_message=on.frames,
        on_connect=on.frames_connected,
        will=will,
        on_takeover=on.taken_over,
        conflict=conflict,
        announce_conflict=True,  # its on_connect publishes the status
        max_packet_bytes=max_packet,
    )
    shared = config.uplink is None
    uplink = MqttSession(
        # An explicit mqtt.client_id names the frames' session; the uplink derives its own.
        config.uplink or config.mqtt.model_copy(update={"client_id": ""}),
        # "-out" on the sensors' broker, "-uplink" to a separate one (escalator: "-escalation").
        client_id=f"edgewise-node-{node_id}-{'out' if shared else 'uplink'}",
        on_connect=on.uplink_connected,
        on_message=on.uplink_message,
        will=None if shared else will,
        on_takeover=on.taken_over,
        conflict=conflict,
        announce_conflict=True,  # its on_connect publishes the status (always in conflict)
        max_packet_bytes=max_packet,
    )
    status.link(frames, vouches=True, also_says=frozenset())
    # Said on every connection that can: the frames' one may be the one taken over.
    status.link(uplink, vouches=not shared, also_says=frozenset({"client_id_conflict"}))
    return frames, uplink
