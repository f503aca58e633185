"""The node's intake: bounded under floods without starving control traffic, and one result id
per frame whatever brings the frame again (issue 16, points 2 and 9; ADR 0076).

Real Mosquitto, real ONNX Runtime (the digits model, made slow where a test needs a saturated
node by a runtime that sleeps per batch), real SQLite outboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy.typing as npt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_node.answered import AnsweredFilter
from edge_node.config import NodeConfig
from edge_node.errors import ConfigError
from edgewise.assets import bundled_asset
from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo, Message, MosquittoProcess, MqttProbe
from edgewise.mqtt import MqttConfig, MqttSession
from edgewise.outbox import Outbox, OutboxConfig, Record
from edgewise.serving.model import ServedModel
from edgewise.serving.runtime import Runtime
from schemas import Frame, decode_results, decode_status, encode_frames
from tests.conftest import BrokerFactory
from tests.nodeharness import Harness, frame_bytes, mqtt_for, running_node
from tests.nodeprocs import NodeProcesses, ResultLedger, frames_answered, start_watched
from tests.waiting import eventually

HOLDOUT = load_holdout()
SENSOR_TOPIC = "sensors/cam-1/digits"
ProbeFactory = Callable[..., MqttProbe]


# ---------------------------------------------------------------------------- helpers
class _SleepsPerBatch:
    """The real ONNX Runtime session, slowed: each model call sleeps first (a slow model that
    leaves the CPU to the rest of the node, as an accelerator would)."""

    def __init__(self, inner: Runtime, per_batch_s: float) -> None:
        self._inner = inner
        self._per_batch_s = per_batch_s
        self.name = inner.name
        self.provider = inner.provider
        self.input_spec = inner.input_spec
        self.output_spec = inner.output_spec

    def run(self, batch: npt.NDArray[Any]) -> npt.NDArray[Any]:
        time.sleep(self._per_batch_s)
        return self._inner.run(batch)

    def close(self) -> None:
        self._inner.close()


def _slow_digits(per_batch_s: float) -> ServedModel:
    real = ServedModel.load(
        str(bundled_asset("digits_edge.onnx")),
        name="digits",
        release=1,
        output="probabilities",
        providers=("CPUExecutionProvider",),
        intra_op_threads=1,
    )
    slow = _SleepsPerBatch(real.runtime, per_batch_s)
    return ServedModel(slow, name="digits", release=1, output="probabilities")


def _results(h: Harness) -> list[Any]:
    return [r for m in h.messages("results") for r in decode_results(m.payload).results]


def _ids_by_seq(h: Harness) -> dict[int, set[str]]:
    ids: dict[int, set[str]] = defaultdict(set)
    for r in _results(h):
        ids[r.frame_seq].add(r.id)
    return ids


class _Counted:
    """How many results the probe has seen, decoding each message once (a predicate that
    decoded them all on every message would starve the node sharing the event loop)."""

    def __init__(self, h: Harness) -> None:
        self._h = h
        self._seen = 0
        self.results = 0

    def __call__(self) -> int:
        messages = self._h.messages("results")
        for m in messages[self._seen :]:
            self.results += len(decode_results(m.payload).results)
        self._seen = len(messages)
        return self.results


def _payload(i: int) -> bytes:
    return frame_bytes(i, HOLDOUT.images[i % len(HOLDOUT.images)])


def _batch(first: int, n: int) -> bytes:
    frames = [
        Frame(seq=i, ts=1766400000.0 + i, tensor=HOLDOUT.images[i % len(HOLDOUT.images)])
        for i in range(first, first + n)
    ]
    return encode_frames(frames)


def _keepalive_timeouts(broker: MosquittoProcess) -> list[str]:
    return [ln for ln in broker.log_text(whole=True).splitlines() if "exceeded timeout" in ln]


# ---------------------------------------------------------------------------- control before data
FLOOD_S = 60.0
FLOOD_RATE = 1_500  # frames/s, above what the slow model takes
BURST = 4_000  # frames at once first: the node is saturated from the start
PER_BATCH_S = 0.05  # with batches of 64: at most 1,280 frames/s


def _flood(info: BrokerInfo, sent: list[int], stop: threading.Event) -> None:
    """QoS 1 frames on a paced schedule (a burst, then FLOOD_RATE) for FLOOD_S seconds, from
    a plain paho client on its own thread; returns once the broker has acknowledged them all."""
    sensor = MqttProbe(info, f"flood-{uuid.uuid4().hex[:6]}")
    sensor.client.max_inflight_messages_set(1000)
    with sensor:
        infos = []
        start = time.monotonic()
        i = 0
        while not stop.is_set():
            elapsed = time.monotonic() - start
            if elapsed >= FLOOD_S:
                break
            due = BURST + int(elapsed * FLOOD_RATE)
            while i < due:
                infos.append(sensor.client.publish(SENSOR_TOPIC, _payload(i), qos=1))
                i += 1
            time.sleep(0.01)
        for info_ in infos:
            info_.wait_for_publish(timeout=120)
        sent.append(i)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_60_s_flood_at_keepalive_5_s_saturates_the_node_without_a_disconnect_or_uplink_down(
    fresh_mosquitto: MosquittoProcess,
) -> None:
    """The node holds frames back for the whole minute (its model takes ~1,280 frames/s, the
    sensor sends 1,500/s after a burst of 4,000); its results, their PUBACKs and its keep-alive
    go on: 0 keep-alive disconnects (broker log, connect counters), 0 ``uplink_down`` or
    ``offline`` seen on the status topic, every frame answered exactly once."""
    info = fresh_mosquitto.info
    mqtt = MqttConfig(host=info.host, port=info.port, keepalive_s=5, connect_timeout_s=5)
    sent: list[int] = []
    stop = threading.Event()

    async def scenario() -> None:
        async with running_node(info, mqtt=mqtt, served_model=_slow_digits(PER_BATCH_S)) as h:
            flood = threading.Thread(target=_flood, args=(info, sent, stop), daemon=True)
            flood.start()
            try:
                await asyncio.to_thread(flood.join, FLOOD_S + 150)
            finally:
                stop.set()
            assert sent, "the flood did not finish"
            total = sent[0]
            counted = _Counted(h)
            await h.seen.wait_for(lambda: counted() >= total, timeout_s=150)
            node = h.node
            statuses = [decode_status(m.payload) for m in h.messages("status")]
            assert [s for s in statuses if s.state != "online"] == []
            assert node.session.stats.connects == 1
            assert node.uplink.stats.connects == 1
            assert node.session.stats.read_pauses >= 10  # held back again and again
            ids = _ids_by_seq(h)
            assert sorted(ids) == list(range(total))
            assert [seq for seq, got in ids.items() if len(got) != 1] == []
            assert len(_results(h)) == total
            assert node.stats.frames_in == total
            print(
                f"{total} frames, reading paused {node.session.stats.read_pauses} times,"
                f" statuses {[(s.state, s.reasons) for s in statuses]}"
            )

    asyncio.run(scenario())
    assert _keepalive_timeouts(fresh_mosquitto) == []


@pytest.mark.slow
def test_a_node_that_stops_reading_keeps_its_connection_through_many_keepalives(
    fresh_mosquitto: MosquittoProcess,
) -> None:
    """Inference paused by the operator, a flood waiting: the node stops reading for longer
    than four keep-alives (5 s). Without the session keeping its keep-alive while paused, paho
    closes the connection a keep-alive after its unanswered (unread) PINGREQ."""
    info = fresh_mosquitto.info
    mqtt = MqttConfig(host=info.host, port=info.port, keepalive_s=5, connect_timeout_s=5)
    total = 600

    async def scenario() -> None:
        batching = {"max_pending_frames": 100}
        async with running_node(info, mqtt=mqtt, batching=batching) as h:
            node = h.node
            node.pause_inference({})
            for i in range(total):
                await h.send(_payload(i))
            await eventually(
                lambda: node.session.reading_paused, "reading paused", timeout_s=10, every_s=0.05
            )
            # Four keep-alives and more: the scenario's length, cut short if the link drops.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(22):
                    await node.session.wait_disconnected()
            assert node.session.reading_paused and node.session.connected
            assert node.session.stats.paused_keepalives >= 10  # kept, once a second
            assert node.session.stats.connects == 1
            assert node.stats.frames_in < total  # the rest wait in the socket and the broker
            node.resume_inference({})
            await h.seen.wait_for(lambda: len(_results(h)) >= total, timeout_s=30)
            ids = _ids_by_seq(h)
            assert sorted(ids) == list(range(total))
            assert all(len(got) == 1 for got in ids.values())
            assert node.session.stats.connects == 1

    asyncio.run(scenario())
    assert _keepalive_timeouts(fresh_mosquitto) == []


def test_large_messages_stop_reading_at_the_byte_bound_before_the_frame_bound(
    mosquitto: BrokerInfo,
) -> None:
    """Frame batches of 200 frames (~60 KB): the byte bound (128 KiB) stops reading after a
    few messages, long before 2,000 frames; nothing is lost."""
    messages, per = 10, 200

    async def scenario() -> None:
        async with running_node(
            mosquitto,
            limits={"max_payload_bytes": 65_536},
            batching={"max_pending_bytes": 131_072},
        ) as h:
            node = h.node
            node.pause_inference({})
            for m in range(messages):
                await h.send(_batch(m * per, per))
            await eventually(
                lambda: node.session.reading_paused, "reading paused", timeout_s=10, every_s=0.05
            )
            held = node.frames.held()
            assert held < node.config.batching.max_pending_frames
            assert node._acker.held_bytes >= 131_072
            assert node.stats.frames_in < messages * per
            node.resume_inference({})
            await h.seen.wait_for(lambda: len(_results(h)) >= messages * per, timeout_s=30)
            ids = _ids_by_seq(h)
            assert sorted(ids) == list(range(messages * per))
            assert all(len(got) == 1 for got in ids.values())
            assert not node.session.reading_paused
            assert node._acker.held_bytes == 0

    asyncio.run(scenario())


def test_a_byte_bound_below_two_messages_stops_the_node_at_start() -> None:
    with pytest.raises(ConfigError, match=r"batching\.max_pending_bytes"):
        NodeConfig.load(
            node_id="gw-1",
            limits={"max_payload_bytes": 1_048_576},
            batching={"max_pending_bytes": 1_048_576},
        )


def test_results_go_out_on_a_connection_of_their_own_that_never_stops_reading(
    mosquitto: BrokerInfo,
) -> None:
    """With reading of frames stopped, results (and their PUBACKs) still flow: the uplink is a
    second connection to the same broker, which the intake bound never pauses."""

    async def scenario() -> None:
        async with running_node(mosquitto, batching={"max_pending_frames": 4}) as h:
            node = h.node
            assert node.uplink is not node.session
            assert node.uplink.client_id.endswith(f"edgewise-node-{h.node_id}-out")
            await h.send(_payload(0))
            await h.seen.wait_for(lambda: len(_results(h)) >= 1)
            # The subscriber may see the result before the node has read its PUBACK.
            await eventually(
                lambda: node.results_delivered >= 1,
                "the result's PUBACK",
                timeout_s=10,
                every_s=0.05,
            )
            node.session.pause_reading()  # as the bound would, with frames waiting
            delivered = node.results_delivered
            await node.close_window()  # a telemetry window: stored, then out on the uplink
            await h.seen.wait_for(lambda: len(h.messages("telemetry")) >= 1)
            await eventually(
                lambda: node.forwarder.in_flight == 0, "the PUBACK read", timeout_s=10, every_s=0.05
            )
            assert node.session.reading_paused
            assert node.results_delivered == delivered == 1
            node.session.resume_reading()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- one result id
def test_answered_filter_finds_the_newest_keep_keys_and_forgets_old_generations() -> None:
    keep = 5_000
    f = AnsweredFilter(keep)
    keys = [f"sensors/cam-1/digits\x00{i}\x00None\x00{i:016x}" for i in range(4 * keep)]
    for n, k in enumerate(keys, 1):
        f.add(k)
        if n % 997 == 0:  # at any moment, the newest `keep` are all found
            assert all(k2 in f for k2 in keys[max(0, n - keep) : n])
    strangers = [f"sensors/cam-2/digits\x00{i}" for i in range(20_000)]
    false_maybes = sum(s in f for s in strangers)
    assert false_maybes < len(strangers) * 0.02
    assert sum(k in f for k in keys[:keep]) < keep * 0.05  # two generations ago: forgotten
    off = AnsweredFilter(0)
    off.add("x")
    assert "x" not in off and off.nbytes == 0


def test_outbox_looks_up_many_answered_keys_in_one_query_and_lists_them_oldest_first(
    tmp_path: Path,
) -> None:
    config = OutboxConfig(path=tmp_path / "o.db", max_bytes=4 * 1024 * 1024, answered_keep=3)
    with Outbox.open(config) as outbox:
        for i in range(5):
            outbox.append([Record("result", "edge/x/results", b"r")], [(f"k{i}", f"id{i}")])
        outbox.append([], [("k4", "other")])  # a key answered already keeps its first id
        assert outbox.answered_keys() == ["k2", "k3", "k4"]
        assert outbox.answered_many(["k0", "k3", "k4", "nope"]) == {"k3": "id3", "k4": "id4"}
        assert outbox.answered_many([f"z{i}" for i in range(1_200)] + ["k2"]) == {"k2": "id2"}


@pytest.mark.parametrize("per_message", [1, 8], ids=["single-frames", "frame-batches"])
def test_frames_a_sensor_resends_on_a_clean_session_without_dup_keep_their_first_result(
    mosquitto: BrokerInfo, per_message: int
) -> None:
    total = 48

    def payloads() -> list[bytes]:
        if per_message == 1:
            return [_payload(i) for i in range(total)]
        return [_batch(i, per_message) for i in range(0, total, per_message)]

    async def scenario() -> None:
        async with running_node(mosquitto) as h:
            for p in payloads():
                await h.send(p)
            await h.seen.wait_for(lambda: len(_results(h)) >= total)
            first = {r.frame_seq: r.id for r in _results(h)}
            # The sensor comes back on a clean session and sends them all again: new messages,
            # no DUP flag, so only the node's look-up of every frame can tell.
            again = MqttSession(mqtt_for(mosquitto), client_id="sensor-again", persistent=False)
            async with again:
                await again.wait_connected(5)
                for p in payloads():
                    await again.publish(SENSOR_TOPIC, p, qos=1)
                await again.publish(SENSOR_TOPIC, _payload(1000), qos=1)  # a marker: new
            await h.seen.wait_for(lambda: any(r.frame_seq == 1000 for r in _results(h)), 20)
            assert h.node.stats.frames_already_answered == total
            results = _results(h)
            assert len(results) == total + 1
            assert {r.frame_seq: r.id for r in results if r.frame_seq != 1000} == first
            assert h.node._acker.outstanding <= 1  # every copy acknowledged (the marker may wait)

    asyncio.run(scenario())


def test_frames_resent_to_a_restarted_node_are_found_in_its_outbox(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    """The in-memory filter is rebuilt from the outbox at start: a copy that comes after a
    restart, without DUP, is still known."""
    total = 20
    node_id = f"gw-{uuid.uuid4().hex[:8]}"
    storage = {"state_dir": str(tmp_path)}

    async def scenario() -> None:
        async with running_node(mosquitto, node_id=node_id, storage=storage) as h:
            for i in range(total):
                await h.send(_payload(i))
            await h.seen.wait_for(lambda: len(_results(h)) >= total)
            first = {r.frame_seq: r.id for r in _results(h)}
            assert await h.node.drain(5)
        async with running_node(mosquitto, node_id=node_id, storage=storage) as h2:
            for i in range(total):
                await h2.send(_payload(i))
            await h2.send(_payload(500))
            await h2.seen.wait_for(lambda: any(r.frame_seq == 500 for r in _results(h2)), 20)
            assert h2.node.stats.frames_already_answered == total
            assert [r.frame_seq for r in _results(h2)] == [500]
            assert set(first) == set(range(total))

    asyncio.run(scenario())


def test_the_summary_counts_what_the_broker_acknowledged_with_plurals(
    mosquitto: BrokerInfo,
) -> None:
    async def scenario() -> None:
        async with running_node(mosquitto) as h:
            await h.send(_payload(0))
            await h.seen.wait_for(lambda: len(_results(h)) >= 1)
            await eventually(
                lambda: h.node.results_delivered == 1,
                "PUBACK of the result",
                timeout_s=10,
                every_s=0.05,
            )
            await h.node.forwarder.flush()  # deletes wait up to 0.5 s to go in one transaction
            assert h.node.summary() == (
                "1 frame in (0 answered already, 0 rejected); 1 result made,"
                " 1 acknowledged by the broker; 0 results records left in the outbox"
            )
            for i in range(1, 5):
                await h.send(_payload(i))
            await h.send(_payload(0))  # again: answered already
            await h.seen.wait_for(lambda: len(_results(h)) >= 5)
            await eventually(
                lambda: h.node.results_delivered == 5,
                "PUBACKs of the results",
                timeout_s=10,
                every_s=0.05,
            )
            await eventually(
                lambda: h.node.stats.frames_already_answered == 1,
                "the copy",
                timeout_s=10,
                every_s=0.05,
            )
            assert h.node.summary().startswith(
                "6 frames in (1 answered already, 0 rejected); 5 results made,"
                " 5 acknowledged by the broker;"
            )

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- broker crashes
class _ResendingSensor:
    """A sensor on a clean session: after each lost connection it connects again (a fresh
    session) and re-sends every frame the broker had not acknowledged, as new messages (no
    DUP flag), before going on. Paced at about 1,000 frames/s, in bursts of 10.

    ``crash()`` is called 50 ms after the burst that sends frame ``crash_at[i]``, the sensor
    reading nothing meanwhile, and the sensor then drops the connection unread: the broker has
    taken that burst and passed it on to the node, but the sensor never sees its PUBACKs (lost
    with the connection), so it re-sends the whole burst."""

    def __init__(
        self,
        info: BrokerInfo,
        total: int,
        crash_at: tuple[int, ...] = (),
        crash: Callable[[], None] = lambda: None,
    ) -> None:
        self.info = info
        self.total = total
        self.crash_at = set(crash_at)
        self.crash = crash
        self.sent = 0  # next new frame
        self.acked: set[int] = set()
        self.resent = 0
        self.connections = 0
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.done.set()

    def _client(self) -> tuple[paho.Client, dict[int, int], list[bool]]:
        """A fresh client (a clean session): its in-flight frames by mid, and whether lost."""
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"resender-{uuid.uuid4().hex[:8]}",
            clean_session=True,
        )
        client.max_inflight_messages_set(1000)
        inflight: dict[int, int] = {}
        lost: list[bool] = []

        def on_publish(c: Any, u: Any, mid: int, rc: Any, p: Any) -> None:
            seq = inflight.pop(mid, None)
            if seq is not None:
                self.acked.add(seq)

        client.on_publish = on_publish
        client.on_disconnect = lambda *a: lost.append(True)
        return client, inflight, lost

    def _connect(self) -> tuple[paho.Client, dict[int, int], list[bool]]:
        while True:
            client, inflight, lost = self._client()
            try:
                client.connect(self.info.host, self.info.port, keepalive=5)
                deadline = time.monotonic() + 5
                while not client.is_connected() and time.monotonic() < deadline and not lost:
                    client.loop(0.05)
                if client.is_connected():
                    self.connections += 1
                    return client, inflight, lost
            except OSError:
                pass
            if client.socket() is not None:
                client.disconnect()
            time.sleep(0.2)

    def _run(self) -> None:
        pending: list[int] = []  # to re-send on the next connection
        while len(self.acked) < self.total:
            client, inflight, lost = self._connect()
            for seq in pending:
                inflight[client.publish(SENSOR_TOPIC, _payload(seq), qos=1).mid] = seq
                self.resent += 1
            pending = []
            while not lost and len(self.acked) < self.total:
                crash = False
                for _ in range(10):
                    if self.sent < self.total:
                        inflight[client.publish(SENSOR_TOPIC, _payload(self.sent), qos=1).mid] = (
                            self.sent
                        )
                        crash = crash or self.sent in self.crash_at
                        self.sent += 1
                if crash:
                    time.sleep(0.05)
                    self.crash()
                    lost.append(True)  # the PUBACKs in the socket are never read
                    break
                end = time.monotonic() + 0.01
                while time.monotonic() < end and not lost:
                    if client.loop(0.005) != paho.MQTT_ERR_SUCCESS:
                        lost.append(True)
                if self.sent >= self.total and not inflight:
                    break
            pending = sorted(set(inflight.values()) - self.acked)
            sock = client.socket()
            if sock is not None and not lost:
                client.disconnect()
                client.loop(0.05)
            elif sock is not None:
                sock.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_broker_kills_and_a_clean_session_resender_lose_no_frame_and_add_no_second_id(
    tmp_path: Path, start_mosquitto: BrokerFactory, mqtt_probe: ProbeFactory
) -> None:
    """10,000 frames; the broker (persistence on, saving every second) is killed at 3,000 and
    7,000 frames sent and started again 3 s later. The sensor re-sends what the broker had not
    acknowledged on a clean session (no DUP flag); the broker, back from its last save, sends
    the node queued frames it had delivered already, afresh. Every frame gets one result, under
    one id."""
    broker = start_mosquitto("broker", persistent=True, autosave_interval_s=1)
    info = broker.info
    state = tmp_path / "node"
    state.mkdir()
    total = 10_000
    nodes = NodeProcesses(info, state, f"resend-{uuid.uuid4().hex[:8]}")
    try:
        consumer = start_watched(nodes, mqtt_probe)
        restarts: list[threading.Thread] = []
        restart_errors: list[BaseException] = []

        def restart_in_3_s() -> None:
            try:
                time.sleep(3.0)  # the broker stays away for 3 s
                broker.start()
            except BaseException as exc:
                restart_errors.append(exc)

        def crash() -> None:
            broker.kill()
            restarts.append(threading.Thread(target=restart_in_3_s, daemon=True))
            restarts[-1].start()

        sensor = _ResendingSensor(info, total, crash_at=(3_000, 7_000), crash=crash)
        thread = threading.Thread(target=sensor.run, daemon=True)
        thread.start()
        assert sensor.done.wait(120), f"sensor stuck: {len(sensor.acked)} acknowledged"
        assert sensor.error is None, sensor.error
        for r in restarts:
            r.join(30)
        assert len(restarts) == 2 and restart_errors == []
        ledger = ResultLedger()

        def answered(m: Message) -> bool:
            ledger.feed(m)
            return len(ledger.ids) >= total

        try:
            consumer.wait_for(answered, 60)
        finally:
            for m in consumer.messages:
                ledger.feed(m)
            missing = [seq for seq in range(total) if not ledger.ids.get(seq)]
            twice = {seq: ids for seq, ids in ledger.ids.items() if len(ids) > 1}
            print(
                f"{sensor.resent} frames re-sent over {sensor.connections} connections;"
                f" {len(missing)} frames without a result, {len(twice)} with two ids;"
                f" node answered {frames_answered(state / f'{nodes.node_id}.outbox.db')} frames"
            )
        assert missing == []
        assert twice == {}
        assert sensor.resent >= 20  # two bursts of 10, at least, came again without DUP
        assert nodes.procs[0].poll() is None
        nodes.procs[0].send_signal(signal.SIGTERM)
        nodes.procs[0].wait(30)
        log = (state / "node-0.log").read_text()
        stop = re.search(r"stopped: (\d+) frames? in \((\d+) answered already", log)
        assert stop is not None, log[-2000:]
        print("node:", stop.group(0))
    finally:
        nodes.stop_all()
        broker.stop()
