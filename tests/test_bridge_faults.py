"""The bridge as a real subprocess (``edgewise bridge``) under faults, against two real
Mosquitto brokers: a long cloud outage with ``kill -9`` of the bridge and a site-broker restart
during it, a corrupt queue file, SIGTERM.

Fault injection follows the publisher's progress (events), not the clock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgewise.local_broker import MosquittoProcess
from schemas import decode_status
from tests.bridgeharness import BridgeProcess, Client, Rule, one_crosses, write_bridge_config

UP = [Rule("up", "edge/+/results", "sites/{site}/edge/+/results")]


def queue_integrity(db: Path) -> int:
    """Check a queue file as the bridge left it: SQLite integrity and the outbox's own ledger
    (appended - delivered - evicted == stored, per kind). Returns the rows stored."""
    conn = sqlite3.connect(db)
    try:
        assert [r[0] for r in conn.execute("PRAGMA integrity_check")] == ["ok"]
        rows = dict(conn.execute("SELECT kind, count(*) FROM records GROUP BY kind").fetchall())
        for kind, appended, deleted, evicted in conn.execute(
            "SELECT kind, appended, deleted, evicted FROM counters"
        ):
            assert appended - deleted - evicted == rows.get(kind, 0), kind
            assert evicted == 0, f"{evicted} {kind} records evicted"
        return sum(rows.values())
    finally:
        conn.close()


class SteadyPublisher:
    """Publishes ``n`` QoS 1 messages at ``rate_hz`` over ``topics`` topics to the site broker.

    paho keeps unacknowledged publishes and sends them again after it reconnects (a persistent
    session), so a broker restart loses nothing on this side. It does not keep their order against
    new publishes, though: once the socket is back, and before the CONNACK that triggers the
    resend, paho 2.x sends a fresh publish straight away (its in-flight count was reset to 0). A
    sensor that needs order therefore has one message in flight: each publish waits for the PUBACK
    of the one before, so the order the site broker receives is the order of ``i``.
    """

    def __init__(self, site: MosquittoProcess, n: int, rate_hz: float, topics: int) -> None:
        self.n, self.rate_hz, self.topics = n, rate_hz, topics
        self.sent = 0
        self._cond = threading.Condition()
        c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="steady-publisher", clean_session=False
        )
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=1)
        c.connect(site.info.host, site.info.port)
        c.on_publish = self._on_publish
        self.acked: set[int] = set()
        c.loop_start()
        self.client = c
        self.infos: list[paho.MQTTMessageInfo] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_publish(self, c: object, u: object, mid: int, rc: object, props: object) -> None:
        with self._cond:
            self.acked.add(mid)
            self._cond.notify_all()

    def topic(self, i: int) -> str:
        return f"edge/gw-{i % self.topics}/results"

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        for i in range(self.n):
            delay = t0 + i / self.rate_hz - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the pace of a sensor fleet, not a wait for an event
            info = self.client.publish(self.topic(i), b"%d" % i + b"." * 190, qos=1)
            with self._cond:
                self.infos.append(info)
                self.sent = i + 1
                self._cond.notify_all()
                if not self._cond.wait_for(partial(self.acked.__contains__, info.mid), 60):
                    return  # wait_sent / wait_all_acked report the stall

    def wait_sent(self, k: int, timeout_s: float = 60) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.sent >= k, timeout=timeout_s), self.sent

    def wait_all_acked(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        with self._cond:
            done = self._cond.wait_for(
                lambda: all(i.mid in self.acked for i in self.infos), timeout=timeout_s
            )
            missing = [i.mid for i in self.infos if i.mid not in self.acked]
        assert done, f"{len(missing)} publishes never acknowledged by the site broker"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.slow
def test_long_cloud_outage_with_two_kill9_and_a_site_restart_loses_nothing_in_order(
    tmp_path: Path,
    persistent_mosquitto: MosquittoProcess,
    persistent_cloud_mosquitto: MosquittoProcess,
) -> None:
    site, cloud = persistent_mosquitto, persistent_cloud_mosquitto
    cfg = write_bridge_config(tmp_path / "bridge.toml", site.info, cloud.info, UP)
    up_db = tmp_path / "queues" / "up.db"
    bridge = BridgeProcess(cfg, tmp_path / "bridge.log")
    rate, n, topics = 100.0, 2400, 4  # 24 s of traffic, ~16 s of it with the cloud away

    sub = Client(cloud.info, client_id="cloud-consumer", clean=False)
    sub.connect()
    sub.subscribe("sites/s1/edge/+/results")
    warm = Client(site.info)
    warm.connect()
    publisher = SteadyPublisher(site, n, rate, topics)
    try:
        bridge.start()
        # The bridge is up once a message crosses (retried: its subscription may be new).
        if not one_crosses(warm, sub, "edge/warm/results", b"warm"):
            raise AssertionError("bridge never forwarded\n" + bridge.log_text()[-3000:])
        publisher.start()
        publisher.wait_sent(200)
        cloud.stop()  # the outage begins
        publisher.wait_sent(500)
        bridge.kill9()
        assert queue_integrity(up_db) > 0
        bridge.start()
        publisher.wait_sent(900)
        site.restart()
        publisher.wait_sent(1300)
        bridge.kill9()
        assert queue_integrity(up_db) > 0
        bridge.start()
        publisher.wait_sent(1800)
        cloud.start()  # the outage ends: ~13 s and ~1,300 messages later
        publisher.wait_all_acked(40)
        sub.wait(
            lambda: sum(1 for p in sub.payloads if p[:1].isdigit()) >= n,
            40,
            "every message at the cloud",
        )
        assert bridge.terminate() == 0
        assert queue_integrity(up_db) == 0
    finally:
        bridge.stop()
        publisher.close()
        sub.close()
        warm.close()

    firsts: dict[str, list[int]] = defaultdict(list)
    seen: set[bytes] = set()
    for m in sub.snapshot():
        if not m.payload[:1].isdigit() or m.payload in seen:
            continue  # a duplicate (at least once): order is judged on first arrivals
        seen.add(m.payload)
        firsts[m.topic].append(int(m.payload.split(b".")[0]))
    assert sum(len(v) for v in firsts.values()) == n
    # Duplicates are bounded by what can be in flight when a process or broker goes: per
    # (re)start, the forwarder window (256) plus what was received but not yet acknowledged
    # (max_pending 4096 + one batch of 1024).
    data = [m for m in sub.snapshot() if m.payload[:1].isdigit()]
    assert len(data) - n <= bridge.starts * (256 + 4096 + 1024)
    for topic, seqs in firsts.items():
        assert seqs == sorted(seqs), f"out of order on {topic}"
    assert bridge.starts == 3


def test_corrupt_queue_is_kept_aside_reported_and_forwarding_resumes(
    tmp_path: Path, fresh_mosquitto: MosquittoProcess, cloud_mosquitto: MosquittoProcess
) -> None:
    site, cloud = fresh_mosquitto, cloud_mosquitto
    cfg = write_bridge_config(tmp_path / "bridge.toml", site.info, cloud.info, UP)
    qdir = tmp_path / "queues"
    qdir.mkdir()
    garbage = b"SQLite format 3\x00" + bytes(range(256)) * 64  # a header, then rubbish
    (qdir / "up.db").write_bytes(garbage)
    watcher = Client(cloud.info)
    watcher.connect()
    watcher.subscribe("bridges/br-test/status")
    watcher.subscribe("sites/#")
    bridge = BridgeProcess(cfg, tmp_path / "bridge.log")
    try:
        bridge.start()

        def corrupt_reported() -> bool:
            for m in watcher.messages:
                if m.topic.endswith("/status"):
                    status = decode_status(m.payload)
                    if status.state == "degraded" and "queue_corrupt" in status.reasons:
                        return True
            return False

        watcher.wait(corrupt_reported, 10.0, "degraded: queue_corrupt within 10 s of start")
        kept = list(qdir.glob("up.db.corrupt-*"))
        assert [p.read_bytes() for p in kept if not p.name.endswith(("-wal", "-shm"))] == [garbage]
        pub = Client(site.info)
        pub.connect()
        try:
            # The bridge's site subscription may still be on its way.
            if not one_crosses(pub, watcher, "edge/gw-1/results", b"after"):
                raise AssertionError("nothing forwarded after recovery\n" + bridge.log_text())
        finally:
            pub.close()
        assert bridge.terminate() == 0
    finally:
        bridge.stop()
        watcher.close()
    assert "kept aside" in bridge.log_text()


def test_sigterm_drains_then_exits_0_and_the_rest_waits_on_disk(
    tmp_path: Path, fresh_mosquitto: MosquittoProcess, cloud_mosquitto: MosquittoProcess
) -> None:
    site, cloud = fresh_mosquitto, cloud_mosquitto
    cfg = write_bridge_config(tmp_path / "bridge.toml", site.info, cloud.info, UP)
    bridge = BridgeProcess(cfg, tmp_path / "bridge.log")
    sub = Client(cloud.info)
    sub.connect()
    sub.subscribe("sites/#")
    sub.subscribe("bridges/br-test/status")
    pub = Client(site.info)
    pub.connect()
    n = 3000
    try:
        bridge.start()
        one_crosses(pub, sub, "edge/warm/results", b"warm")
        mids = [pub.publish("edge/gw-1/results", b"m%d" % i, wait=False) for i in range(n)]
        pub.wait_acked(len(set(mids)), 30)
        assert bridge.terminate() == 0
        assert queue_integrity(tmp_path / "queues" / "up.db") == 0  # drained, not abandoned
        sub.wait(
            lambda: any(
                m.topic.endswith("/status") and decode_status(m.payload).state == "offline"
                for m in sub.messages
            ),
            10,
            "offline status",
        )
        bridge.start()  # whatever the drain left (on disk or at the site broker) goes now
        sub.wait(
            lambda: sum(1 for p in sub.payloads if p[:1] == b"m") >= n,
            30,
            f"all {n} messages",
        )
        assert bridge.terminate() == 0
    finally:
        bridge.stop()
        pub.close()
        sub.close()
    assert "stopped:" in bridge.log_text()


@pytest.mark.slow
def test_kill9_during_an_outage_resends_at_most_the_in_flight_window(
    tmp_path: Path,
    persistent_mosquitto: MosquittoProcess,
    persistent_cloud_mosquitto: MosquittoProcess,
) -> None:
    """Deletes of what the cloud acknowledged are flushed when the link drops, so a crash
    during the outage resends only what was in flight then. Before: every record acknowledged
    in the last 0.5 s (the delete linger) came again, 46-48 at 100 msg/s."""
    site, cloud = persistent_mosquitto, persistent_cloud_mosquitto
    window = 10
    cfg = write_bridge_config(
        tmp_path / "bridge.toml", site.info, cloud.info, UP, forward=f"window = {window}"
    )
    bridge = BridgeProcess(cfg, tmp_path / "bridge.log")
    rate, n = 100.0, 900

    sub = Client(cloud.info, client_id="cloud-consumer", clean=False)
    sub.connect()
    sub.subscribe("sites/s1/edge/+/results")
    warm = Client(site.info)
    warm.connect()
    publisher = SteadyPublisher(site, n, rate, 4)
    try:
        bridge.start()
        if not one_crosses(warm, sub, "edge/warm/results", b"warm"):
            raise AssertionError("bridge never forwarded\n" + bridge.log_text()[-3000:])
        publisher.start()
        publisher.wait_sent(300)  # 3 s of steady forwarding
        sub.wait(lambda: sum(1 for p in sub.payloads if p[:1].isdigit()) >= 250, 20, "flow")
        cloud.stop()  # the outage begins
        publisher.wait_sent(500)  # 2 s into it
        bridge.kill9()
        assert queue_integrity(tmp_path / "queues" / "up.db") > 0
        bridge.start()
        cloud.start()
        publisher.wait_all_acked(40)
        sub.wait(
            lambda: sum(1 for p in sub.payloads if p[:1].isdigit()) >= n,
            40,
            "every message at the cloud",
        )
        assert bridge.terminate() == 0
    finally:
        bridge.stop()
        publisher.close()
        sub.close()
        warm.close()
    # New publishes of a message already received, not the cloud broker's own redeliveries
    # to the consumer (DUP set) across its restart.
    arrivals = [m for m in sub.snapshot() if m.payload[:1].isdigit() and not m.dup]
    assert len({m.payload for m in arrivals}) == n
    duplicates = len(arrivals) - n
    assert duplicates <= window, f"{duplicates} duplicates > the in-flight window {window}"
