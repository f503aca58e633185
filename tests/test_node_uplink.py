"""Uplink loss: results wait on disk, the status says so, and the backlog drains behind live data.

The node reads frames from its sensors' broker and publishes through a separate uplink
connection that goes through a TCP proxy the test controls (cut, stall, flap) — in a deployment,
sensors on a site broker and results straight to the cloud.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo, Message, MqttProbe, TcpProxy
from schemas import decode_results, decode_status
from tests.nodeharness import Harness, frame_bytes, running_node, uplink_through
from tests.nodeprocs import NodeProcesses, ResultLedger, frames_answered, online
from tests.waiting import eventually, eventually_sync

HOLDOUT = load_holdout()
ProbeFactory = Callable[..., MqttProbe]


def _statuses(h: Harness) -> list[tuple[str, list[str]]]:
    out = []
    for m in h.messages("status"):
        s = decode_status(m.payload)
        out.append((s.state, list(s.reasons)))
    return out


class _Ledger:
    """Results seen by the probe, decoded once each."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.by_frame: dict[int, set[str]] = {}
        self.seqs: set[int] = set()
        self._fed = 0

    def update(self) -> int:
        msgs = self.h.messages("results")
        for m in msgs[self._fed :]:
            for r in decode_results(m.payload).results:
                self.by_frame.setdefault(r.frame_seq, set()).add(r.id)
                self.seqs.add(r.seq)
        self._fed = len(msgs)
        return len(self.by_frame)


async def _send_range(h: Harness, start: int, stop: int) -> None:
    for i in range(start, stop):
        await h.send(frame_bytes(i, HOLDOUT.images[i % len(HOLDOUT.images)]))


def test_a_stalled_then_flapping_uplink_says_uplink_down_and_loses_no_result(
    mosquitto: BrokerInfo,
) -> None:
    async def scenario() -> None:
        with TcpProxy(mosquitto.host, mosquitto.port) as proxy:
            async with running_node(
                mosquitto, uplink=uplink_through(proxy), health={"uplink_grace_s": 0.5}
            ) as h:
                ledger = _Ledger(h)
                await _send_range(h, 0, 50)
                await h.seen.wait_for(lambda: ledger.update() >= 50, 20)

                # A stall: the connection stays open, nothing moves, PUBACKs never come.
                proxy.pause()
                await _send_range(h, 50, 250)
                await h.seen.wait_for(lambda: ("degraded", ["uplink_down"]) in _statuses(h), 20)
                assert h.node.stats.results_stored == 250  # inference went on
                proxy.resume()
                await h.seen.wait_for(lambda: ledger.update() >= 250, 30)
                await h.seen.wait_for(lambda: _statuses(h)[-1] == ("online", []), 20)

                # Flaps: the link is reset and refused, then back, three times, under traffic.
                sent = 250
                for _ in range(3):
                    proxy.cut()
                    await _send_range(h, sent, sent + 100)
                    sent += 100
                    await eventually(
                        lambda n=sent: h.node.stats.results_stored >= n,
                        "results stored",
                        timeout_s=20,
                    )
                    # The cut lasts until the node has knocked and been refused (not a fixed
                    # time: on a loaded machine its backoff may not have come round yet).
                    await eventually(
                        lambda r=proxy.connections_refused: proxy.connections_refused > r,
                        "a refused reconnect",
                        timeout_s=20,
                    )
                    proxy.restore()
                    await _send_range(h, sent, sent + 100)
                    sent += 100
                await h.seen.wait_for(lambda: ledger.update() >= sent, 60)
                assert sorted(ledger.by_frame) == list(range(sent))
                assert all(len(ids) == 1 for ids in ledger.by_frame.values())
                assert sorted(ledger.seqs) == list(range(1, sent + 1))
                assert proxy.connections_refused > 0, "the cuts never refused a reconnect"
                await h.seen.wait_for(lambda: _statuses(h)[-1] == ("online", []), 20)

    asyncio.run(scenario())


def _last_status_online_payload(payload: bytes) -> bool:
    s = decode_status(payload)
    return s.state == "online" and not s.reasons


def _last_status_online(probe: MqttProbe) -> bool:
    statuses = [m for m in probe.messages if m.topic.endswith("/status")]
    return (
        bool(statuses) and online(statuses[-1]) and not decode_status(statuses[-1].payload).reasons
    )


class _RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return


@pytest.mark.slow
def test_a_100k_result_outage_waits_on_disk_and_drains_behind_live_results(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory, tmp_path: Path
) -> None:
    backlog = 100_000
    warm = 2_000
    with TcpProxy(mosquitto.host, mosquitto.port) as proxy:
        node_id = f"outage-{uuid.uuid4().hex[:8]}"
        nodes = NodeProcesses(
            mosquitto,
            tmp_path,
            node_id,
            env={
                "EDGEWISE_UPLINK": (
                    f'{{"host": "{proxy.host}", "port": {proxy.port}, "keepalive_s": 5,'
                    ' "reconnect_first_s": 0.1, "reconnect_cap_s": 0.5}'
                ),
                "EDGEWISE_HEALTH__UPLINK_GRACE_S": "0.5",
                "EDGEWISE_STORAGE__ANSWERED_KEEP": str(2 * backlog),
                "EDGEWISE_STORAGE__SYNCHRONOUS": "NORMAL",
            },
        )
        try:
            consumer = mqtt_probe()
            consumer.subscribe(f"edge/{node_id}/#")
            proc = nodes.start()
            consumer.wait_for(online, 20)
            ledger = ResultLedger()
            fed = 0
            stored_records = 0

            def results_at_least(n: int, timeout_s: float) -> None:
                # Polled, not probe.wait_for: its predicate runs under the lock the probe's
                # network thread needs, which would delay (and mis-time) arrivals in a flood.
                def fed_enough() -> bool:
                    nonlocal fed
                    msgs = consumer.messages
                    for m in msgs[fed:]:
                        ledger.feed(m)
                    fed = len(msgs)
                    return len(ledger.ids) >= n

                eventually_sync(
                    fed_enough,
                    f"{n} results",
                    timeout_s=timeout_s,
                    detail=lambda: f"{len(ledger.ids)}/{n} results ({stored_records} records)",
                )

            sensor = mqtt_probe()
            sensor.publish_many(
                "sensors/cam-1/digits",
                [frame_bytes(i, HOLDOUT.images[i % len(HOLDOUT.images)]) for i in range(warm)],
            )
            results_at_least(warm, 30)

            db = tmp_path / f"{node_id}.outbox.db"
            sampler = _RssSampler(proc.pid)
            baseline = sampler.proc.memory_info().rss
            sampler.start()
            proxy.cut()

            def uplink_down(m: Message) -> bool:
                if not m.topic.endswith("/status"):
                    return False
                return "uplink_down" in decode_status(m.payload).reasons

            consumer.wait_for(uplink_down, 20)
            frames = [
                frame_bytes(i, HOLDOUT.images[i % len(HOLDOUT.images)])
                for i in range(warm, warm + backlog)
            ]
            for chunk in range(0, backlog, 20_000):  # paho queues at most 65,535 publishes
                sensor.publish_many(
                    "sensors/cam-1/digits", frames[chunk : chunk + 20_000], timeout_s=60
                )

            def all_answered() -> bool:
                if frames_answered(db) >= warm + backlog:
                    return True
                assert proc.poll() is None
                return False

            eventually_sync(
                all_answered,
                f"{warm + backlog} frames answered",
                timeout_s=120,
                every_s=0.2,
                detail=lambda: f"only {frames_answered(db)} frames answered",
            )
            sampler.stop.set()
            sampler.join()
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                stored_records = conn.execute("SELECT count(*) FROM records").fetchone()[0]
            print(f"outage: {stored_records} records hold {backlog} results")
            growth_mb = (sampler.peak - baseline) / 2**20
            assert growth_mb < 50, f"RSS grew {growth_mb:.1f} MB during the outage"
            assert len(ledger.ids) == warm, "results got through a cut uplink"

            # Live frames during the drain: sent at 50/s, their results timed at the consumer.
            live_sent: dict[int, float] = {}
            live_start = warm + backlog
            stop_live = threading.Event()

            def live() -> None:
                i = live_start
                while not stop_live.wait(0.02):
                    live_sent[i] = time.monotonic()
                    sensor.publish("sensors/cam-2/digits", frame_bytes(i, HOLDOUT.images[0]))
                    i += 1

            restored_at = time.monotonic()
            proxy.restore()
            live_thread = threading.Thread(target=live, daemon=True)
            live_thread.start()
            results_at_least(warm + backlog, 120)
            stop_live.set()
            live_thread.join()
            total = warm + backlog + len(live_sent)
            results_at_least(total, 30)
            assert sorted(ledger.ids) == list(range(total))
            assert sorted(ledger.node_seqs) == list(range(1, total + 1))
            arrived: dict[int, float] = {}
            backlog_done = 0.0  # when the backlog's last result arrived
            for m in consumer.messages:
                if m.topic.endswith("/results"):
                    for r in decode_results(m.payload).results:
                        if r.frame_seq in live_sent:
                            arrived.setdefault(r.frame_seq, m.received_at)
                        elif r.frame_seq >= warm:
                            backlog_done = max(backlog_done, m.received_at)
            # Live means sent while the uplink is up: frames sent between the restore and the
            # node's reconnect were answered during the outage and drain with its backlog.
            back_up = min(
                m.received_at
                for m in consumer.messages
                if m.topic.endswith("/status")
                and m.received_at >= restored_at
                and _last_status_online_payload(m.payload)
            )
            latencies = [arrived[i] - t for i, t in live_sent.items() if t >= back_up]
            assert len(latencies) >= 10, "the drain was over before live traffic started"
            # Behind live results: they overtake the backlog rather than wait for all of it (an
            # order; their latency during the drain is a figure: python -m bench.outage).
            overtook = [
                i for i, t in live_sent.items() if t >= back_up and arrived[i] < backlog_done
            ]
            assert overtook, "every live result waited behind the whole backlog"
            eventually_sync(
                lambda: _last_status_online(consumer),
                "the status to return to online",
                timeout_s=20,
                every_s=0.1,
            )
        finally:
            nodes.stop_all()


def test_a_full_outbox_evicts_and_the_count_equals_what_is_missing_downstream(
    mosquitto: BrokerInfo,
) -> None:
    async def scenario() -> None:
        with TcpProxy(mosquitto.host, mosquitto.port) as proxy:
            async with running_node(
                mosquitto,
                uplink=uplink_through(proxy),
                storage={"outbox_max_bytes": 256 * 1024, "synchronous": "NORMAL"},
                health={"uplink_grace_s": 0.3},
            ) as h:
                node = h.node
                ledger = _Ledger(h)
                proxy.cut()
                # Frames once the node knows (records in flight at a cut are covered by
                # tests/test_forwarder_eviction.py, ADR 0063).
                await eventually(lambda: "uplink_down" in node.reasons, "uplink_down", timeout_s=20)
                total = 5_000
                await _send_range(h, 0, total)
                await eventually(
                    lambda: node.stats.results_stored >= total, "results stored", timeout_s=60
                )
                evicted = node.outbox.stats().evicted_items.get("result", 0)
                assert evicted > 0, "the outbox never filled up"
                proxy.restore()
                await eventually(
                    lambda: node.outbox.stats().rows == 0, "the outbox to drain", timeout_s=60
                )
                await h.seen.wait_for(lambda: ledger.update() >= total - evicted, 30)
                missing = total - ledger.update()
                assert missing == evicted == node.outbox.stats().evicted_items["result"]
                # What is lost is the oldest: everything after the first survivor arrived.
                first = min(ledger.seqs)
                assert sorted(ledger.seqs) == list(range(first, total + 1))

    asyncio.run(scenario())
