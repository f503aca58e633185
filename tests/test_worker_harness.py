"""Helpers shared by the worker and escalation tests (no tests here): escalations to send,
worker configs, worker processes, and a recorder of replies."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cloud_worker import WorkerConfig
from local_broker import BrokerInfo
from mqtt_session import Inbound, MqttConfig
from schemas import EdgeVerdict, Reply, decode_reply, encode_escalation, make_escalation

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
    now = time.time()
    return encode_escalation(
        make_escalation(
            id=esc_id,
            node=node,
            model="digits",
            release=1,
            device="cam-1",
            sensor="digits",
            frame_seq=1,
            ts=now,
            tensor=image,
            edge=VERDICT,
            reply_to=(reply_to or f"edge/{node}/reply") if reply else None,
            corr=corr if reply else None,
            deadline=None if deadline_s is None else now + deadline_s,
            offline=not reply,
        )
    )


def worker_config(broker: BrokerInfo, tmp_path: Path, **kw: object) -> WorkerConfig:
    kw.setdefault("worker_id", f"w-{uuid.uuid4().hex[:6]}")
    # Each test its own share group: a worker's persistent session keeps taking its share.
    kw.setdefault("group", f"g-{uuid.uuid4().hex[:6]}")
    kw.setdefault("store", {"path": str(tmp_path / f"{kw['worker_id']}.db")})
    kw.setdefault("mqtt", mqtt_for(broker))
    return WorkerConfig.load(**kw)  # type: ignore[arg-type]


@dataclass
class Replies:
    """Every reply seen on the subscribed topics, decoded, with an awaitable condition."""

    got: list[Reply] = field(default_factory=list)
    raw: list[Inbound] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, msg: Inbound) -> None:
        self.raw.append(msg)
        self.got.append(decode_reply(msg.payload))
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
            [sys.executable, "-m", "edgewise.cli", "worker", "--config", str(cfg)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return p, log_path


def wait_ready(p: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "ready on" in log_path.read_text(errors="replace"):
            return
        if p.poll() is not None:
            raise AssertionError(f"worker exited {p.returncode}: {log_path.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"worker not ready in {timeout_s} s: {log_path.read_text()}")
