"""The edge node as a real process (``edgewise node``), and what its consumer saw."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from edgewise.local_broker import BrokerInfo, Message
from schemas import decode_results, decode_status


class NodeProcesses:
    """Start ``edgewise node`` processes that share one node id and one state directory."""

    def __init__(
        self,
        broker: BrokerInfo,
        state_dir: Path,
        node_id: str,
        *,
        max_batch_size: int = 64,
        env: dict[str, str] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.extra_env = dict(env or {})
        self.broker = broker
        self.state_dir = state_dir
        self.node_id = node_id
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
        env.update(
            EDGEWISE_NODE_ID=self.node_id,
            EDGEWISE_MQTT__HOST=self.broker.host,
            EDGEWISE_MQTT__PORT=str(self.broker.port),
            EDGEWISE_MQTT__RECONNECT_FIRST_S="0.1",
            EDGEWISE_MQTT__RECONNECT_CAP_S="0.5",
            EDGEWISE_STORAGE__STATE_DIR=str(self.state_dir),
            EDGEWISE_LOG_LEVEL="INFO",
            EDGEWISE_BATCHING__MAX_BATCH_SIZE=str(self.max_batch_size),
        )
        env.update(self.extra_env)
        log = open(self.state_dir / f"node-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgewise.cli.app", "node"], env=env, stdout=log, stderr=log
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


class ResultLedger:
    """Which result ids the consumer saw for each frame seq, fed from a probe's messages.

    A probe's ``wait_for`` runs its predicate over every message received so far each time one
    arrives; decoding each message once keeps that linear.
    """

    def __init__(self) -> None:
        self.ids: dict[int, set[str]] = defaultdict(set)
        self.node_seqs: set[int] = set()
        self._fed: set[int] = set()

    def feed(self, m: Message) -> None:
        if id(m) in self._fed or not m.topic.endswith("/results"):
            return
        self._fed.add(id(m))
        for r in decode_results(m.payload).results:
            self.ids[r.frame_seq].add(r.id)
            self.node_seqs.add(r.seq)


def online(m: Message) -> bool:
    return m.topic.endswith("/status") and decode_status(m.payload).state == "online"
