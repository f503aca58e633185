"""Run an EdgeNode in-process against a real broker, with a probe that records what it publishes."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_node.config import NodeConfig
from edge_node.node import EdgeNode
from edgewise.assets import bundled_asset
from edgewise.local_broker import BrokerInfo, TcpProxy
from edgewise.mqtt import Inbound, MqttConfig, MqttSession
from edgewise.serving.model import ServedModel
from schemas import Frame, encode_frame

EDGE_MODEL = bundled_asset("digits_edge.onnx")  # what `edgewise node` serves by default


@dataclass
class Recorder:
    """Every message seen, by topic, with an awaitable condition."""

    by_topic: dict[str, list[Inbound]] = field(default_factory=lambda: defaultdict(list))
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def __call__(self, msg: Inbound) -> None:
        self.by_topic[msg.topic].append(msg)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s), self.changed:
            await self.changed.wait_for(predicate)


@dataclass
class Harness:
    node: EdgeNode
    probe: MqttSession
    sensor: MqttSession
    seen: Recorder
    node_id: str

    def topic(self, kind: str) -> str:
        return f"edge/{self.node_id}/{kind}"

    def messages(self, kind: str) -> list[Inbound]:
        return self.seen.by_topic[self.topic(kind)]

    async def send(self, payload: bytes, topic: str = "sensors/cam-1/digits", qos: int = 1) -> None:
        await self.sensor.publish(topic, payload, qos=qos)


def mqtt_for(broker: BrokerInfo) -> MqttConfig:
    return MqttConfig(host=broker.host, port=broker.port, connect_timeout_s=5)


def uplink_through(proxy: TcpProxy) -> dict[str, object]:
    """The node's ``uplink`` settings for a connection through ``proxy`` (the link a test cuts),
    quick to notice a loss and to reconnect."""
    return {
        "host": proxy.host,
        "port": proxy.port,
        "connect_timeout_s": 2,
        "keepalive_s": 5,
        "reconnect_first_s": 0.1,
        "reconnect_cap_s": 0.5,
    }


def frame_bytes(seq: int, image: np.ndarray, *, as_json: bool = False) -> bytes:
    return encode_frame(Frame(seq=seq, ts=None, tensor=image), as_json=as_json)


@contextlib.asynccontextmanager
async def running_node(
    broker: BrokerInfo, *, served_model: ServedModel | None = None, **overrides: Any
) -> AsyncIterator[Harness]:
    """``overrides`` are NodeConfig keys (``mqtt`` replaces the broker's defaults);
    ``served_model`` stands in for the configured model."""
    node_id = overrides.pop("node_id", f"gw-{uuid.uuid4().hex[:8]}")
    mqtt = mqtt_for(broker)
    node_mqtt = overrides.pop("mqtt", mqtt)
    seen = Recorder()
    with contextlib.ExitStack() as stack:
        if "storage" not in overrides:
            state = stack.enter_context(tempfile.TemporaryDirectory(prefix="edgewise-test-"))
            overrides["storage"] = {"state_dir": state}
        cfg = NodeConfig.load(
            node_id=node_id, mqtt=node_mqtt, default_model_path=EDGE_MODEL, **overrides
        )
        async with _node_and_probes(cfg, mqtt, seen, served_model) as h:
            yield h


@contextlib.asynccontextmanager
async def _node_and_probes(
    cfg: NodeConfig, mqtt: MqttConfig, seen: Recorder, model: ServedModel | None = None
) -> AsyncIterator[Harness]:
    node_id = cfg.node_id
    async with (
        MqttSession(
            mqtt, client_id=f"probe-{node_id}", on_message=seen, manual_ack=False, persistent=False
        ) as probe,
        MqttSession(mqtt, client_id=f"sensor-{node_id}", persistent=False) as sensor,
    ):
        probe.subscribe(f"edge/{node_id}/#")
        await probe.wait_connected(5)
        await sensor.wait_connected(5)
        async with EdgeNode(cfg, model=model) as node:
            h = Harness(node, probe, sensor, seen, node_id)
            # The node publishes its status after subscribing: once we see it, frames will land.
            await seen.wait_for(lambda: bool(h.messages("status")))
            yield h
