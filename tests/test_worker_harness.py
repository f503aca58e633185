"""Helpers shared by the worker and escalation tests (no tests here): escalations to send,
worker configs, worker processes, and a recorder of replies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cloud_worker import WorkerConfig
from edgewise.assets import bundled_asset
from edgewise.local_broker import BrokerInfo
from edgewise.mqtt import Inbound, MqttConfig, MqttSession
from schemas import (
    EdgeVerdict,
    EscalationCase,
    decode_replies,
    encode_escalations,
    make_case,
    make_escalation_batch,
)
from tests.waiting import eventually_logged

VERDICT = EdgeVerdict(
    label=1, confidence=0.4, margin=0.1, entropy=1.2, top_labels=[1, 7], top_probs=[0.4, 0.3]
)


def mqtt_for(broker: BrokerInfo, **kw: object) -> MqttConfig:
    return MqttConfig(host=broker.host, port=broker.port, connect_timeout_s=5, **kw)  # type: ignore[arg-type]


def escalation_bytes(
    esc_id: str,
    image: np.ndarray,
    *,
    node: str = "gw-test",
    deadline_s: float | None = 30.0,
    reply: bool = True,
    corr: str = "c0ffee",
    reply_to: str | None = None,
) -> bytes:
    """An escalation message of one case (its case corr is ``corr`` + ``-case``)."""
    return batch_bytes(
        [one_case(esc_id, image, deadline_s=deadline_s, corr=f"{corr}-case" if reply else None)],
        node=node,
        reply=reply,
        corr=corr,
        reply_to=reply_to,
    )


def one_case(
    esc_id: str,
    image: np.ndarray,
    *,
    deadline_s: float | None = 30.0,
    corr: str | None = "case",
) -> EscalationCase:
    return make_case(
        id=esc_id,
        release=1,
        device="cam-1",
        sensor="digits",
        frame_seq=1,
        tensor=image,
        edge=VERDICT,
        corr=corr,
        deadline=None if deadline_s is None else time.time() + deadline_s,
    )


def batch_bytes(
    cases: list[EscalationCase],
    *,
    node: str = "gw-test",
    reply: bool = True,
    corr: str = "c0ffee",
    reply_to: str | None = None,
) -> bytes:
    return encode_escalations(
        make_escalation_batch(
            node=node,
            model="digits",
            ts=time.time(),
            cases=cases,
            reply_to=(reply_to or f"edge/{node}/reply") if reply else None,
            corr=corr if reply else None,
            offline=not reply,
        )
    )


def worker_config(broker: BrokerInfo, tmp_path: Path, **kw: object) -> WorkerConfig:
    kw.setdefault("worker_id", f"w-{uuid.uuid4().hex[:6]}")
    # Each test its own share group: a worker's persistent session keeps taking its share.
    kw.setdefault("group", f"g-{uuid.uuid4().hex[:6]}")
    kw.setdefault("store", {"path": str(tmp_path / f"{kw['worker_id']}.db")})
    kw.setdefault("mqtt", mqtt_for(broker))
    bundled = bundled_asset("digits_cloud.onnx")  # what `edgewise worker` serves by default
    return WorkerConfig.load(default_model_path=bundled, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Got:
    """One verdict of a reply message, with the message's fields."""

    id: str
    corr: str
    label: int
    confidence: float
    model: str
    node: str
    message_corr: str
    worker: str


@dataclass
class Replies:
    """Every verdict of every reply seen on the subscribed topics, decoded, with an awaitable
    condition; ``raw`` holds the reply messages."""

    got: list[Got] = field(default_factory=list)
    raw: list[Inbound] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, msg: Inbound) -> None:
        self.raw.append(msg)
        r = decode_replies(msg.payload)
        for v in r.verdicts:
            self.got.append(
                Got(v.id, v.corr, v.label, v.confidence, v.model, r.node, r.corr, r.worker)
            )
        self.changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


def write_worker_toml(
    path: Path, broker: BrokerInfo, worker_id: str, store: Path, **extra: str
) -> Path:
    lines = [
        f'worker_id = "{worker_id}"',
        f'log_level = "{extra.pop("log_level", "INFO")}"',
        *(f"{k} = {v}" for k, v in extra.items()),
        "[mqtt]",
        f'host = "{broker.host}"',
        f"port = {broker.port}",
        "[store]",
        f'path = "{store}"',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def start_worker_process(
    tmp_path: Path, broker: BrokerInfo, worker_id: str, **extra: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """``edgewise worker --config`` as a real process; returns it and its log file. Pass
    ``group='"name"'`` to share the load with others."""
    store = tmp_path / f"{worker_id}.db"
    cfg = write_worker_toml(tmp_path / f"{worker_id}.toml", broker, worker_id, store, **extra)
    log_path = tmp_path / f"{worker_id}-{uuid.uuid4().hex[:4]}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
    with open(log_path, "wb") as log:
        p = subprocess.Popen(
            [sys.executable, "-m", "edgewise.cli.app", "worker", "--config", str(cfg)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return p, log_path


def wait_ready(p: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 30.0) -> None:
    eventually_logged(
        "ready on", lambda: log_path.read_text(errors="replace"), p, "worker", timeout_s=timeout_s
    )


@contextlib.asynccontextmanager
async def node_client(
    broker: BrokerInfo, replies: Replies | None, node: str
) -> AsyncIterator[MqttSession]:
    """A node's side for worker tests: connected, and subscribed to ``node``'s replies when
    ``replies`` takes them."""
    async with MqttSession(
        mqtt_for(broker),
        client_id=f"t-{uuid.uuid4().hex[:6]}",
        on_message=replies,
        manual_ack=False,
        persistent=False,
        keep_properties=True,
    ) as session:
        if replies is not None:
            session.subscribe(f"edge/{node}/reply")
        await session.wait_connected(5)
        yield session
