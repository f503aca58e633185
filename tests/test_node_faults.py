"""Nothing lost: the node as a real process, killed with SIGKILL, and a broker that goes away.

The node stores each results message in its SQLite outbox before it acknowledges the frames,
and deletes it only after the broker's PUBACK; a redelivered frame whose result is stored is
acknowledged without a second result. These tests inject the faults for real.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgewise.frames import load_holdout
from local_broker import BrokerInfo, Message, MosquittoProcess, MqttProbe
from schemas import decode_results, decode_status
from tests.nodeharness import frame_bytes

HOLDOUT = load_holdout()
ProbeFactory = Callable[..., MqttProbe]


class NodeProcesses:
    """Start ``edgewise node`` processes that share one node id and one state directory."""

    def __init__(
        self, broker: BrokerInfo, state_dir: Path, node_id: str, *, max_batch_size: int = 64
    ) -> None:
        self.max_batch_size = max_batch_size
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
        log = open(self.state_dir / f"node-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgewise.cli", "node"], env=env, stdout=log, stderr=log
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def nodes(mosquitto: BrokerInfo, tmp_path: Path) -> Iterator[NodeProcesses]:
    n = NodeProcesses(mosquitto, tmp_path, f"crash-{uuid.uuid4().hex[:8]}")
    yield n
    n.stop_all()


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


def _online(m: Message) -> bool:
    return m.topic.endswith("/status") and decode_status(m.payload).state == "online"


@pytest.mark.slow
def test_kill_9_of_the_node_loses_no_frame_and_gives_each_one_result_id(
    nodes: NodeProcesses, mqtt_probe: ProbeFactory
) -> None:
    total = 10_000
    consumer = mqtt_probe()
    consumer.subscribe(f"edge/{nodes.node_id}/#")
    nodes.start()
    consumer.wait_for(_online, 20)
    ledger = ResultLedger()
    seen = 0

    def results_at_least(n: int) -> Callable[[Message], bool]:
        def check(m: Message) -> bool:
            nonlocal seen
            ledger.feed(m)
            seen = len(ledger.ids)
            return seen >= n

        return check

    sensor = mqtt_probe()
    payloads = [frame_bytes(i, HOLDOUT.images[i % len(HOLDOUT.images)]) for i in range(total)]
    publisher = threading.Thread(
        target=sensor.publish_many, args=("sensors/cam-1/digits", payloads), daemon=True
    )
    publisher.start()
    rng = random.Random(20261123)
    kills = sorted(rng.sample(range(500, total - 1000), 3))
    for at in kills:
        consumer.wait_for(results_at_least(at), 60)
        nodes.procs[-1].send_signal(signal.SIGKILL)
        nodes.procs[-1].wait(10)
        nodes.start()
    consumer.wait_for(results_at_least(total), 90)
    publisher.join(30)
    assert not publisher.is_alive()
    for m in consumer.messages:
        ledger.feed(m)
    missing = [seq for seq in range(total) if not ledger.ids.get(seq)]
    assert missing == []
    twice = {seq: ids for seq, ids in ledger.ids.items() if len(ids) > 1}
    assert twice == {}, f"{len(twice)} frames got more than one result id"
    assert len(nodes.procs) == 4
    assert all(p.returncode == -signal.SIGKILL for p in nodes.procs[:3])


@pytest.mark.slow
def test_results_made_while_the_broker_is_away_wait_on_disk_and_arrive_later(
    tmp_path: Path, mqtt_probe: ProbeFactory, persistent_mosquitto: MosquittoProcess
) -> None:
    # A broker that keeps its sessions across a restart (persistence, graceful stop): the
    # consumer misses nothing the broker accepted, so whatever is missing would be the node's.
    broker = persistent_mosquitto
    info = broker.info
    state = tmp_path / "node"
    state.mkdir()
    total = 3_000
    n = NodeProcesses(info, state, f"away-{uuid.uuid4().hex[:8]}", max_batch_size=1)
    try:
        consumer = mqtt_probe(info, f"consumer-{n.node_id}", clean_session=False)
        consumer.subscribe(f"edge/{n.node_id}/#")
        n.start()
        consumer.wait_for(_online, 20)
        sensor = mqtt_probe(info)
        sensor.publish_many(
            "sensors/cam-1/digits",
            [frame_bytes(i, HOLDOUT.images[i % len(HOLDOUT.images)]) for i in range(total)],
        )
        ledger = ResultLedger()

        def answered(k: int) -> Callable[[Message], bool]:
            def check(m: Message) -> bool:
                ledger.feed(m)
                return len(ledger.ids) >= k

            return check

        consumer.wait_for(answered(300), 30)
        broker.stop()  # the node holds most frames: it answers them with nobody to send to
        before = set(ledger.node_seqs)
        broker.restart()
        consumer.wait_for(answered(total), 60)
        for m in consumer.messages:
            ledger.feed(m)
        assert sorted(ledger.ids) == list(range(total))
        assert all(len(ids) == 1 for ids in ledger.ids.values())
        # One node process: its seq runs 1..N without a gap once duplicates are dropped.
        assert sorted(ledger.node_seqs) == list(range(1, total + 1))
        assert ledger.node_seqs - before, "nothing was answered while the broker was away"
        assert n.procs[0].poll() is None  # the node rode it out
        log = (state / "node-0.log").read_text()
        assert "disconnected from broker" in log
    finally:
        n.stop_all()
