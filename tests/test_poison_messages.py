"""A message that makes a stage fail is settled, and the messages after it flow.

Against a real Mosquitto, with the real services in-process (the worker with its bundled ONNX
model, the node with its model, outbox and escalator, the bridge with its queues) or as a real
``edgewise worker`` process: a poison escalation (a case deadline 2**33 s away, which once made
the reply's message expiry overflow and left the escalation unacknowledged for ever), 2,500
garbage messages, and an exception injected at each stage of each service's message path
(:mod:`tests.faults`: the stage's own function swapped for a twin that raises once). Each time
the failing message is settled (rejected, dead-lettered, or answered without it; acknowledged;
counted by stage) and the next 1,000 messages all go through. Counts only, never times.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

import broker_bridge.direction as direction_mod
import cloud_worker.intake as worker_intake_mod
import cloud_worker.reply_topic as reply_topic_mod
import cloud_worker.settle as settle_mod
import edge_node.intake as node_intake_mod
import edge_node.results as results_mod
from broker_bridge import Bridge, BridgeConfig
from broker_bridge.rules import compile_rule
from cloud_worker import Worker
from cloud_worker.answers import Decider
from cloud_worker.handler import Handler
from cloud_worker.store import HardExampleStore
from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo, MosquittoProcess
from edgewise.mqtt import Inbound, MqttSession
from edgewise.mqtt.properties import EXPIRY_MAX_S, PublishProperties, expiry_interval_s
from edgewise.outbox import Record
from edgewise.serving.batcher import MicroBatcher
from edgewise.serving.model import ServedModel
from schemas import (
    ContractError,
    Frame,
    Topics,
    decode_escalations,
    decode_results,
    encode_escalations,
    encode_frame,
    make_case,
    make_escalation_batch,
)
from schemas.fields import EPOCH_MAX
from tests.bridgeharness import Client, Rule, write_bridge_config
from tests.faults import Fault
from tests.nodeharness import Harness, running_node
from tests.test_escalation_node import SURE, UNSURE
from tests.test_worker_harness import (
    VERDICT,
    Replies,
    escalation_bytes,
    node_client,
    start_worker_process,
    wait_ready,
    worker_config,
)
from tests.waiting import eventually

HOLDOUT = load_holdout()
ESCALATIONS = "cloud/escalations/digits"
GARBAGE = 2_500
FLOW = 1_000


# ---------------------------------------------------------------------- what gets sent
def poison_escalation(node: str) -> bytes:
    """The escalation of the report: well formed, one case whose deadline is 2**33 s away."""
    far = time.time() + 2.0**33
    case = make_case(
        id="poison", release=1, device="cam-1", sensor="digits", frame_seq=1,
        tensor=HOLDOUT.images[0], edge=VERDICT, corr="poison-case", deadline=far,
    )  # fmt: skip
    batch = make_escalation_batch(
        node=node, model="digits", ts=time.time(), cases=[case],
        reply_to=f"edge/{node}/reply", corr="poison",
    )  # fmt: skip
    return encode_escalations(batch)


def garbage(n: int, node: str, seed: int = 16) -> list[bytes]:
    """``n`` messages no worker can take: random bytes, MessagePack of the wrong shape, no
    cases, truncated escalations, escalations naming absurd times or another node's reply
    topic."""
    rng = random.Random(seed)
    valid = escalation_bytes("g", HOLDOUT.images[1], node=node)
    out: list[bytes] = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            out.append(rng.randbytes(rng.randrange(0, 300)))
        elif kind == 1:
            out.append(msgspec.msgpack.encode({"v": 1, "node": node, "cases": [rng.random()]}))
        elif kind == 2:
            out.append(valid[: rng.randrange(1, len(valid))])
        elif kind == 3:
            empty = {"v": 1, "node": node, "model": "digits", "ts": time.time(), "cases": []}
            out.append(msgspec.msgpack.encode(empty))
        elif kind == 4:
            case = make_case(
                id=f"g{i}", release=1, device="cam-1", sensor="digits", frame_seq=i,
                tensor=HOLDOUT.images[1], edge=VERDICT, corr="c",
                deadline=rng.choice([1e300, EPOCH_MAX * 2, 2.0**64]),
            )  # fmt: skip
            batch = make_escalation_batch(
                node=node, model="digits", ts=rng.choice([1e300, time.time()]), cases=[case],
                reply_to=f"edge/{node}/reply", corr="c",
            )  # fmt: skip
            out.append(encode_escalations(batch))
        else:
            out.append(escalation_bytes(f"x{i}", HOLDOUT.images[1], node=node, reply_to=None))
            out[-1] = out[-1].replace(f"edge/{node}/reply".encode(), b"edge/other/reply")
    return out


async def publish_all(session: MqttSession, topic: str, payloads: list[bytes]) -> None:
    """Publish in windows of 100 at QoS 1, each window acknowledged before the next."""
    for i in range(0, len(payloads), 100):
        await asyncio.gather(
            *(session.publish_nowait(topic, p, qos=1) for p in payloads[i : i + 100])
        )


# ---------------------------------------------------------------------- wire ranges
def test_expiry_is_clamped_to_what_the_wire_carries() -> None:
    assert [expiry_interval_s(x) for x in (-5.0, 0.0, 0.4, 1.0, 1.2, 41.0)] == [1, 1, 1, 1, 2, 41]
    assert expiry_interval_s(float("nan")) == 1
    assert expiry_interval_s(2.0**33) == EXPIRY_MAX_S == 2**32 - 1
    assert expiry_interval_s(float("inf")) == EXPIRY_MAX_S
    # What it gives, the property takes; what the property refuses, it never gives.
    PublishProperties(message_expiry_interval_s=expiry_interval_s(1e300))
    with pytest.raises(Exception, match="message expiry interval"):
        PublishProperties(message_expiry_interval_s=2**32)


def test_times_past_2100_are_refused_with_the_field_named() -> None:
    with pytest.raises(ContractError) as err:
        decode_escalations(poison_escalation("gw-1"))
    assert err.value.reason == "bad_schema"
    assert "deadline" in err.value.detail and "4102444800" in err.value.detail
    with pytest.raises(ContractError, match="ts"):
        encode_frame(Frame(seq=1, ts=EPOCH_MAX + 1, tensor=HOLDOUT.images[0]))
    at_bound = make_case(
        id="ok", release=1, device="d", sensor="s", frame_seq=1, tensor=HOLDOUT.images[0],
        edge=VERDICT, corr="c", deadline=EPOCH_MAX,
    )  # fmt: skip
    batch = make_escalation_batch(
        node="n", model="digits", ts=EPOCH_MAX, cases=[at_bound], reply_to="edge/n/reply", corr="c"
    )
    assert decode_escalations(encode_escalations(batch)).cases[0].deadline == EPOCH_MAX


# ---------------------------------------------------------------------- the worker
def _worker_settled(worker: Worker) -> bool:
    d = worker.describe()
    return d["unacknowledged"] == 0 and d["in_progress"] == 0 and d["replying"] == 0


Injected = tuple[Fault, Callable[[], int]]
"""A fault put in place, and the counter that must show it."""


def _worker_fault(stage: str, worker: Worker, mp: pytest.MonkeyPatch) -> Injected:
    """Inject a one-shot fault at ``stage``; returns it and the counter that must show it."""
    f = Fault(stage)
    s = worker.stats
    if stage == "decode":
        f.into(mp, worker_intake_mod, "decode_escalations")
        return f, lambda: s.rejects["internal_error"]
    if stage == "validate":
        f.into(mp, reply_topic_mod, "is_reply_topic")
        return f, lambda: s.rejects["internal_error"]
    if stage == "queue":
        f.into(mp, MicroBatcher, "add_many")
        return f, lambda: s.failures["intake"]
    if stage == "lookup":
        for name in ("lookup", "lookup_here", "lookup_ahead"):
            f.into(mp, HardExampleStore, name)
        return f, lambda: s.failures["answer"]
    if stage == "handle":
        f.into(mp, Handler, "call_blocking")
        return f, lambda: s.handler_errors
    if stage == "verdicts":
        f.into(mp, Decider, "answers_of")
        return f, lambda: s.handler_errors
    if stage == "store":
        f.into(mp, HardExampleStore, "add_many")
        return f, lambda: s.failures["store"]
    if stage == "encode":
        f.into(mp, settle_mod, "encode_replies")
        return f, lambda: s.failures["reply"]
    if stage == "publish":
        f.when = lambda topic, *a, **kw: topic.endswith("/reply")
        f.into(mp, worker.session, "publish_nowait")
        return f, lambda: s.failures["reply"]
    assert stage == "ack"
    f.into(mp, worker.session, "ack")
    return f, lambda: worker._acker.ack_errors


WORKER_STAGES = [
    "decode", "validate", "queue", "lookup", "handle", "verdicts", "store", "encode", "publish",
    "ack",
]  # fmt: skip


@pytest.mark.parametrize("stage", [None, *WORKER_STAGES])
def test_worker_settles_a_message_that_fails_at_each_stage_and_answers_the_next_1000(
    mosquitto: BrokerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str | None
) -> None:
    """The fault (if any) hits one valid escalation; then the poison escalation, 2,500 garbage
    messages and 3 valid ones: 3/3 answered; then 1,000 more: 1,000 answered."""
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(mosquitto, tmp_path)
    image = HOLDOUT.images[2]

    async def scenario() -> None:
        replies = Replies()
        answered = lambda prefix: {g.id for g in replies.got if g.id.startswith(prefix)}  # noqa: E731
        async with node_client(mosquitto, replies, node) as client, Worker(cfg) as worker:
            # Warm up: the shared subscription is in place once one escalation is answered.
            async with asyncio.timeout(20):
                while not answered("warm"):
                    await client.publish(ESCALATIONS, escalation_bytes("warm", image, node=node))
                    await asyncio.sleep(0.2)
            await eventually(lambda: _worker_settled(worker), "_worker_settled(worker)")
            if stage is not None:
                fault, shown = _worker_fault(stage, worker, monkeypatch)
                await client.publish(ESCALATIONS, escalation_bytes("victim", image, node=node))
                await eventually(
                    lambda: fault.fired == 1 and _worker_settled(worker),
                    "fault.fired == 1 and _worker_settled(worker)",
                    timeout_s=20,
                )
                assert shown() == 1, (stage, worker.stats)
            rejected = worker.stats.rejected
            await client.publish(ESCALATIONS, poison_escalation(node))
            await publish_all(client, ESCALATIONS, garbage(GARBAGE, node))
            valid = [escalation_bytes(f"ok{i}", image, node=node) for i in range(3)]
            await publish_all(client, ESCALATIONS, valid)
            await replies.wait_for(lambda: len(answered("ok")) == 3, 30)
            await eventually(
                lambda: worker.stats.rejected - rejected == GARBAGE + 1,
                "worker.stats.rejected - rejected == GARBAGE + 1",
                timeout_s=20,
            )
            assert worker.stats.rejects["bad_schema"] >= 1  # the poison, among others
            await publish_all(
                client, ESCALATIONS,
                [escalation_bytes(f"n{i}", image, node=node) for i in range(FLOW)],
            )  # fmt: skip
            await replies.wait_for(lambda: len(answered("n")) == FLOW, 60)
            await eventually(
                lambda: _worker_settled(worker), "_worker_settled(worker)", timeout_s=20
            )
        # Answered when only its rows or its acknowledgement failed; else left out of the reply.
        assert answered("victim") == ({"victim"} if stage in ("store", "ack") else set())
        assert answered("poison") == set()

    asyncio.run(scenario())


def test_worker_process_answers_3_of_3_after_the_poison_and_2500_garbage_messages(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    """The report's scenario against ``edgewise worker`` as a real process."""
    node = f"gw-{uuid.uuid4().hex[:6]}"
    # A share group of its own: the session outlives the process for a minute, and in the
    # default group it would take its share of other tests' escalations meanwhile.
    group = f'"g-{uuid.uuid4().hex[:6]}"'
    proc, log = start_worker_process(tmp_path, mosquitto, f"w-{uuid.uuid4().hex[:6]}", group=group)
    image = HOLDOUT.images[3]
    try:
        wait_ready(proc, log)

        async def scenario() -> None:
            replies = Replies()
            answered = lambda prefix: {g.id for g in replies.got if g.id.startswith(prefix)}  # noqa: E731
            async with node_client(mosquitto, replies, node) as client:
                async with asyncio.timeout(20):
                    while not answered("warm"):
                        await client.publish(
                            ESCALATIONS, escalation_bytes("warm", image, node=node)
                        )
                        await asyncio.sleep(0.2)
                await client.publish(ESCALATIONS, poison_escalation(node))
                await publish_all(client, ESCALATIONS, garbage(GARBAGE, node))
                valid = [escalation_bytes(f"ok{i}", image, node=node) for i in range(3)]
                await publish_all(client, ESCALATIONS, valid)
                await replies.wait_for(lambda: len(answered("ok")) == 3, 30)
                assert answered("ok") == {"ok0", "ok1", "ok2"}
                assert answered("poison") == set()

        asyncio.run(scenario())
        assert proc.poll() is None, log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()


# ---------------------------------------------------------------------- the node
ESCALATION = {
    "enabled": True,
    "policy": {"max_softmax_below": 0.95, "deadline_ms": 300},
    "cache_entries": 0,
}


class _Seen:
    """Result ids per frame seq from the node's result messages (each message read once)."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.read = 0
        self.ids: dict[int, set[str]] = {}
        self.sources: dict[int, set[str]] = {}

    def update(self) -> dict[int, set[str]]:
        messages = self.h.messages("results")
        for m in messages[self.read :]:
            for r in decode_results(m.payload).results:
                self.ids.setdefault(r.frame_seq, set()).add(r.id)
                self.sources.setdefault(r.frame_seq, set()).add(r.source)
        self.read = len(messages)
        return self.ids


def _node_settled(h: Harness) -> bool:
    node = h.node
    esc = node.escalator
    return (
        node._acker.outstanding == 0
        and not node.frames.in_progress
        and (esc is None or (esc.pending == 0 and not esc.cases.finals))
    )


def _node_fault(stage: str, h: Harness, mp: pytest.MonkeyPatch) -> Injected:
    f = Fault(stage)
    node = h.node
    esc = node.escalator
    assert esc is not None
    rejects = node.stats.rejects
    if stage == "topic":
        f.when = lambda self, topic: topic.startswith("sensors/")
        f.into(mp, Topics, "parse_sensor")
        return f, lambda: rejects["internal_error"]
    if stage == "decode":
        f.into(mp, node_intake_mod, "decode_frames")
        return f, lambda: rejects["internal_error"]
    if stage == "check":
        f.into(mp, ServedModel, "check")
        return f, lambda: rejects["internal_error"]
    if stage == "infer":
        f.into(mp, node.served, "infer")
        return f, lambda: rejects["inference_failed"]
    if stage == "triage":
        f.into(mp, esc, "triage")
        return f, lambda: rejects["internal_error"]
    if stage == "escalate":
        f.into(mp, esc, "escalate")
        return f, lambda: node.stats.results_stored  # answered edge_fallback at once
    if stage == "journal":
        f.into(mp, esc.journal, "add_nowait")
        return f, lambda: node.stats.results_stored
    if stage == "encode":
        f.into(mp, results_mod, "encode_results")
        return f, lambda: rejects["internal_error"]
    if stage == "store":
        f.when = lambda records, *a, **kw: records[0].kind == "result"
        f.into(mp, node.outbox, "append")
        return f, lambda: node.stats.results_acked  # sent without a durable copy
    if stage == "deliver":
        f.into(mp, esc.cases, "_deliver")
        return f, lambda: node.stats.results_stored
    if stage == "publish":
        f.when = lambda topic, *a, **kw: topic.endswith("/results")
        f.into(mp, node.uplink, "publish_nowait")  # results go out on the uplink connection
        return f, lambda: node.forwarder.stats.refused
    assert stage == "ack"
    f.into(mp, node.session, "ack")
    return f, lambda: node._acker.ack_errors


NODE_STAGES = [
    "topic", "decode", "check", "infer", "triage", "escalate", "journal", "encode", "store",
    "deliver", "publish", "ack",
]  # fmt: skip
UNSURE_VICTIM = {"triage", "escalate", "journal", "deliver"}


@pytest.mark.parametrize("stage", NODE_STAGES)
def test_node_settles_a_frame_that_fails_at_each_stage_and_answers_the_next_1000(
    mosquitto: BrokerInfo, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """One frame meets the fault; it is settled (dead-lettered, or answered another way) and
    acknowledged; then 1,000 frames (one in ten unsure, escalated to a cloud that never
    answers) each get exactly one result."""

    async def scenario() -> None:
        async with running_node(mosquitto, escalation=ESCALATION) as h:
            seen = _Seen(h)
            await h.send(encode_frame(Frame(seq=0, ts=time.time(), tensor=HOLDOUT.images[SURE[0]])))
            await h.seen.wait_for(lambda: 0 in seen.update(), 20)
            fault, shown = _node_fault(stage, h, monkeypatch)
            before = shown()
            pick = UNSURE if stage in UNSURE_VICTIM else SURE
            victim = encode_frame(Frame(seq=1, ts=time.time(), tensor=HOLDOUT.images[pick[0]]))
            await h.send(victim)
            await eventually(
                lambda: fault.fired == 1 and _node_settled(h),
                "fault.fired == 1 and _node_settled(h)",
                timeout_s=20,
            )
            await eventually(lambda: shown() > before, "shown() > before", timeout_s=20)
            frames = [
                encode_frame(
                    Frame(
                        seq=seq,
                        ts=time.time(),
                        tensor=HOLDOUT.images[(UNSURE if seq % 10 == 0 else SURE)[seq % 50]],
                    )
                )
                for seq in range(2, 2 + FLOW)
            ]
            await publish_all(h.sensor, "sensors/cam-1/digits", frames)
            want = set(range(2, 2 + FLOW))
            await h.seen.wait_for(lambda: want <= set(seen.update()), 60)
            await eventually(lambda: _node_settled(h), "_node_settled(h)", timeout_s=20)
            ids = seen.update()
            assert all(len(ids[s]) == 1 for s in want)
            assert h.node.stats.frames_in == FLOW + 2

    asyncio.run(scenario())


# ---------------------------------------------------------------------- the bridge
def _bridge_fault(stage: str, bridge: Bridge, mp: pytest.MonkeyPatch) -> Injected:
    f = Fault(stage)
    lane = bridge.up
    if stage == "classify":
        f.into(mp, direction_mod, "first_match")
        return f, lambda: lane.stats.failed
    if stage == "store":
        f.into(mp, lane.outbox, "append")
        return f, lambda: lane.stats.failed
    if stage == "offer":
        assert lane.forwarder is not None
        f.into(mp, lane.forwarder, "offer")
        return f, lambda: lane.stats.queued  # queued, and read back from the queue
    if stage == "publish":
        f.when = lambda topic, *a, **kw: topic.startswith("sites/")
        f.into(mp, bridge.cloud, "publish_nowait")
        assert lane.forwarder is not None
        forwarder = lane.forwarder
        return f, lambda: forwarder.stats.refused
    assert stage == "ack"
    f.into(mp, bridge.site, "ack")
    return f, lambda: lane.stats.ack_failures


@pytest.mark.parametrize("stage", ["classify", "store", "offer", "publish", "ack"])
def test_bridge_settles_a_message_that_fails_at_each_stage_and_forwards_the_next_1000(
    tmp_path: Path,
    fresh_mosquitto: MosquittoProcess,
    cloud_mosquitto: MosquittoProcess,
    monkeypatch: pytest.MonkeyPatch,
    stage: str,
) -> None:
    path = write_bridge_config(
        tmp_path / "bridge.toml",
        fresh_mosquitto.info,
        cloud_mosquitto.info,
        [Rule("up", "edge/+/results", "sites/{site}/edge/+/results")],
    )
    cfg = BridgeConfig.load(path)

    async def scenario() -> None:
        cloud_sub = Client(cloud_mosquitto.info)
        cloud_sub.connect()
        cloud_sub.subscribe("sites/#")
        site_pub = Client(fresh_mosquitto.info)
        site_pub.connect()
        try:
            async with Bridge(cfg) as bridge:
                await bridge.wait_ready(10)
                site_pub.publish("edge/gw-1/results", b"warm")
                await asyncio.to_thread(cloud_sub.wait_payload, b"warm", 10)
                fault, shown = _bridge_fault(stage, bridge, monkeypatch)
                before = shown()
                site_pub.publish("edge/gw-1/results", b"victim")
                await eventually(lambda: fault.fired == 1, "fault.fired == 1", timeout_s=20)
                await bridge.up.wait_drained()
                await eventually(lambda: shown() > before, "shown() > before", timeout_s=20)
                for i in range(FLOW):
                    site_pub.publish("edge/gw-1/results", f"m{i}".encode(), wait=False)
                site_pub.wait_acked(FLOW + 2, 30)

                def forwarded() -> set[bytes]:
                    return {m.payload for m in cloud_sub.snapshot() if m.payload[:1] == b"m"}

                want = {f"m{i}".encode() for i in range(FLOW)}
                await eventually(lambda: want <= forwarded(), "want <= forwarded()", timeout_s=60)
                assert bridge.up.stats.received == FLOW + 2
        finally:
            cloud_sub.close()
            site_pub.close()

    asyncio.run(scenario())


def test_a_destination_topic_too_long_for_mqtt_is_dropped_and_counted(tmp_path: Path) -> None:
    """A template's prefix can make a topic longer than MQTT carries: counted, never sent."""
    rule = compile_rule("up", "edge/#", "sites/{site}/edge/#", 1, True, {"site": "s" * 40})
    lane = direction_mod.Lane(
        "up", [rule], None, max_payload_bytes=1024, max_batch=8, max_pending=8
    )  # type: ignore[arg-type]
    long_topic = "edge/" + "x" * 65_500
    msgs = [
        Inbound(topic=t, payload=b"p", qos=1, retain=False, mid=i, connection=1, received_at=0.0)
        for i, t in enumerate([long_topic, "edge/ok"])
    ]
    records = [record for _, record in lane._classify(msgs)]  # (message, record) pairs
    assert [r.topic for r in records] == [f"sites/{'s' * 40}/edge/ok"]
    assert lane.stats.oversize_dropped == 1
    assert isinstance(records[0], Record)
