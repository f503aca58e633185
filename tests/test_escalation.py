"""The node's side of hybrid inference against a real Mosquitto and real workers: policy, cache,
replies in time, deadlines, hostile replies, no uplink, and recovery from the journal."""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import onnxruntime as ort
import pytest

from cloud_worker import Worker
from edge_node.escalation import (
    Case,
    CloudVerdict,
    EscalationConfig,
    Escalator,
    Final,
    PolicyConfig,
    VerdictCache,
    assess,
)
from edgewise.assets import bundled_asset
from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo, MosquittoProcess
from edgewise.mqtt import Inbound, MqttSession
from schemas import (
    CaseVerdict,
    EdgeVerdict,
    EscalationBatch,
    ReplyBatch,
    Result,
    Topics,
    decode_escalations,
    encode_replies,
    new_id,
)
from tests.test_worker_harness import mqtt_for, worker_config
from tests.waiting import eventually

HOLDOUT = load_holdout()
VERDICT = EdgeVerdict(label=1, confidence=0.4, margin=0.1, entropy=1.2)


def _cloud_labels(images: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(
        str(bundled_asset("digits_cloud.onnx")), providers=["CPUExecutionProvider"]
    )
    (probs,) = s.run(None, {"image": images})
    return np.asarray(probs).argmax(axis=1)


def _case(i: int, seq: int | None = None) -> Case:
    result = Result(
        id=new_id(),
        seq=seq if seq is not None else i + 1,
        device="cam-1",
        sensor="digits",
        frame_seq=seq if seq is not None else i,
        model="digits",
        release=1,
        label=1,
        confidence=0.4,
        source="edge",
        latency_ms=0.0,
    )
    return Case(result, f"key-{i}-{seq}", HOLDOUT.images[i], VERDICT, time.monotonic())


@dataclass
class Finals:
    got: list[Final] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    fail_next: int = 0

    async def __call__(self, finals: list[Final]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("disk on fire")
        self.got.extend(finals)
        self.changed.set()

    async def wait_for(self, n: int, timeout_s: float = 20.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.got) < n:
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def _escalator(
    broker: BrokerInfo,
    finals: Finals,
    *,
    state_dir: Path | None = None,
    node_id: str | None = None,
    deadline_ms: float = 2000.0,
    uplink: BrokerInfo | None = None,
    **cfg: object,
) -> AsyncIterator[Escalator]:
    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        config = EscalationConfig(
            enabled=True,
            policies={"digits": PolicyConfig(max_softmax_below=0.95, deadline_ms=deadline_ms)},
            uplink=mqtt_for(uplink) if uplink is not None else None,
            **cfg,  # type: ignore[arg-type]
        )
        esc = Escalator(
            config,
            node_id=node_id or f"gw-{uuid.uuid4().hex[:6]}",
            node_mqtt=mqtt_for(broker),
            topics=Topics(),
            state_dir=state_dir,
            deliver=finals,
        )
        async with esc:
            await esc.uplink.wait_connected(5)
            await esc.uplink._subs.answers[esc.reply_topic]  # the SUBACK of the reply topic
            yield esc


class Spy:
    """Records escalations published on the broker (to forge replies to them)."""

    def __init__(self) -> None:
        self.seen: list[Inbound] = []
        self.changed = asyncio.Event()

    def __call__(self, msg: Inbound) -> None:
        self.seen.append(msg)
        self.changed.set()

    async def wait_for(self, n: int, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.seen) < n:
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def _client(broker: BrokerInfo, spy: Spy | None = None) -> AsyncIterator[MqttSession]:
    async with MqttSession(
        mqtt_for(broker),
        client_id=f"spy-{uuid.uuid4().hex[:6]}",
        on_message=spy,
        manual_ack=False,
        persistent=False,
        keep_properties=True,
    ) as s:
        subscribed = s.subscribe("cloud/escalations/+") if spy is not None else None
        await s.wait_connected(5)
        if subscribed is not None:
            await subscribed  # the spy's SUBACK
        yield s


# ---------------------------------------------------------------------- pure parts
def test_policy_each_test_and_their_combination() -> None:
    probs = np.array(
        [
            [0.98, 0.01, 0.01],  # confident
            [0.60, 0.39, 0.01],  # low max
            [0.50, 0.45, 0.05],  # low max, low margin
            [0.34, 0.33, 0.33],  # high entropy
        ]
    )
    only_max = assess(probs, PolicyConfig(max_softmax_below=0.55))
    assert only_max.escalate.tolist() == [False, False, True, True]
    only_margin = assess(probs, PolicyConfig(margin_below=0.1))
    assert only_margin.escalate.tolist() == [False, False, True, True]
    only_entropy = assess(probs, PolicyConfig(entropy_above=1.0))
    assert only_entropy.escalate.tolist() == [False, False, False, True]
    any_of = assess(probs, PolicyConfig(max_softmax_below=0.7, entropy_above=5.0))
    assert any_of.escalate.tolist() == [False, True, True, True]
    np.testing.assert_allclose(only_max.margin, [0.97, 0.21, 0.05, 0.01])
    with pytest.raises(ValueError, match="at least one"):
        PolicyConfig()


def test_thresholds_by_name_over_a_policy_and_bad_ones_named() -> None:
    from edge_node.escalation.policy import with_thresholds

    base = PolicyConfig(max_softmax_below=0.95, deadline_ms=2000)
    p = with_thresholds(base, {"escalate_below": "0.8", "entropy_above": 1.2})
    assert (p.max_softmax_below, p.entropy_above, p.margin_below, p.deadline_ms) == (
        0.8,
        1.2,
        None,
        2000,
    )
    assert with_thresholds(base, {"deadline_ms": 500}).deadline_ms == 500
    for bad, says in (
        ({"escalate_above": 0.1}, "unknown threshold 'escalate_above'"),
        ({"margin_below": "x"}, "margin_below='x' is not a number"),
        ({"escalate_below": 1.5}, "max_softmax_below"),
    ):
        with pytest.raises(ValueError, match=re.escape(says)):
            with_thresholds(base, bad)


def test_verdict_cache_is_bounded_and_expires() -> None:
    cache = VerdictCache(max_entries=2, ttl_s=10.0)
    cache.put("a", CloudVerdict(1, 0.9), now=0.0)
    cache.put("b", CloudVerdict(2, 0.9), now=0.0)
    assert cache.get("a", now=1.0) == CloudVerdict(1, 0.9)  # a is now most recent
    cache.put("c", CloudVerdict(3, 0.9), now=1.0)  # evicts b
    assert cache.get("b", now=1.0) is None
    assert cache.get("a", now=9.0) is not None
    assert cache.get("a", now=10.5) is None  # expired
    assert len(cache) == 1


# ---------------------------------------------------------------------- with a broker
def test_cloud_reply_in_time_then_repeat_input_is_cloud_cached(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    n = 30
    expected = _cloud_labels(HOLDOUT.images[:n])

    async def scenario() -> None:
        finals = Finals()
        async with Worker(worker_config(mosquitto, tmp_path)), _escalator(mosquitto, finals) as esc:
            decided = await esc.escalate([_case(i) for i in range(n)])
            assert decided == []
            # A case leaves `pending` before its final is handed over: never counted twice.
            assert esc.pending + len(finals.got) <= n
            await finals.wait_for(n)
            await esc.wait_settled()
            assert {f.result.source for f in finals.got} == {"cloud"}
            by_seq = {f.result.frame_seq: f.result for f in finals.got}
            assert [by_seq[i].label for i in range(n)] == expected.tolist()
            assert await esc.journal.count() == 0
            assert esc.pending == 0
            again = await esc.escalate([_case(i, seq=100 + i) for i in range(n)])
            assert [f.result.source for f in again] == ["cloud_cached"] * n
            assert [f.result.label for f in again] == expected.tolist()
            assert esc.stats.cached == n and esc.stats.cloud == n

    asyncio.run(scenario())


def test_no_answer_falls_back_at_the_deadline_once_and_late_reply_is_ignored(
    mosquitto: BrokerInfo,
) -> None:
    async def scenario() -> None:
        finals = Finals()
        spy = Spy()
        async with (
            _client(mosquitto, spy) as client,
            _escalator(mosquitto, finals, deadline_ms=300) as esc,
        ):
            cases = [_case(i) for i in range(5)]
            await esc.escalate(cases)
            await spy.wait_for(1)
            await finals.wait_for(5, timeout_s=5)
            assert [f.result.source for f in finals.got] == ["edge_fallback"] * 5
            assert sorted(f.result.id for f in finals.got) == sorted(c.result.id for c in cases)
            assert esc.pending == 0
            # The five cases of one call went out as one message.
            esc_msg = decode_escalations(spy.seen[0].payload)
            assert [c.id for c in esc_msg.cases] == [c.result.id for c in cases]
            assert len(spy.seen) == 1 and esc.stats.batch_sizes == {5: 1}
            # The worker's answer arrives late: ignored, counted, no second result.
            assert esc_msg.reply_to is not None and esc_msg.corr is not None
            late = _reply(esc_msg, label=7)
            await client.publish(esc_msg.reply_to, encode_replies(late))
            await client.publish(esc_msg.reply_to, encode_replies(late))
            await eventually(
                lambda: not (esc.stats.late_replies < 10),
                "not (esc.stats.late_replies < 10)",
                timeout_s=5,
            )
            assert len(finals.got) == 5
            assert esc.stats.replies_rejected == 0
            # The reply address twice: MQTT 5 response topic and correlation data, and the same
            # inside the payload (for 3.1.1 brokers); message expiry = the earliest deadline
            # (300 ms -> 1 s), and each case's deadline inside.
            props = spy.seen[0].properties
            assert props is not None
            assert props.ResponseTopic == esc_msg.reply_to == esc.reply_topic
            assert bytes(props.CorrelationData) == esc_msg.corr.encode()
            assert 0 < props.MessageExpiryInterval <= 1
            assert esc_msg.deadline is not None
            assert 0.0 < esc_msg.deadline - esc_msg.ts <= 0.3
            assert esc_msg.deadline == min(c.deadline or 0.0 for c in esc_msg.cases)

    asyncio.run(scenario())


def _reply(
    e: EscalationBatch, *, label: int = 4, only: int | None = None, **changes: object
) -> ReplyBatch:
    """A worker's reply to the cases of ``e`` (the first ``only`` of them); ``changes`` replace
    fields of the reply message."""
    verdicts = [
        CaseVerdict(id=c.id, corr=c.corr or "", label=label, confidence=0.97, model="m")
        for c in e.cases[:only]
    ]
    fields: dict[str, object] = {
        "node": e.node,
        "corr": e.corr,
        "worker": "w",
        "ts": time.time(),
        "verdicts": verdicts,
    }
    return ReplyBatch(**{**fields, **changes})  # type: ignore[arg-type]


def test_hostile_replies_are_rejected_and_counted(mosquitto: BrokerInfo) -> None:
    async def scenario() -> None:
        finals = Finals()
        spy = Spy()
        async with (
            _client(mosquitto, spy) as client,
            _escalator(mosquitto, finals, deadline_ms=10_000) as esc,
        ):
            await esc.escalate([_case(0)])
            await spy.wait_for(1)
            e = decode_escalations(spy.seen[0].payload)
            assert e.reply_to is not None and e.corr is not None
            good = _reply(e)
            (case,) = good.verdicts
            topic = e.reply_to

            def verdict(**changes: object) -> list[CaseVerdict]:
                return [msgspec.structs.replace(case, **changes)]

            hostile = [
                b"\xc1\xc1",  # malformed
                b"\x80" * 70_000,  # oversized (max_reply_bytes 65536)
                b"\x81\xa1v\x01",  # not a reply
                encode_replies(_reply(e, verdicts=verdict(corr="deadbeef"))),
                encode_replies(_reply(e, corr="deadbeef")),  # the message's corr
                encode_replies(_reply(e, node="someone-else")),
                encode_replies(_reply(e, verdicts=verdict(id="no-such-escalation"))),
            ]
            for payload in hostile:
                await client.publish(topic, payload)
            await eventually(
                lambda: not (esc.stats.replies_rejected < len(hostile)),
                "not (esc.stats.replies_rejected < len(hostile))",
                timeout_s=5,
            )
            assert dict(esc.stats.reply_rejects) == {
                "malformed": 1,
                "payload_too_large": 1,
                "bad_schema": 1,
                "wrong_correlation": 2,
                "wrong_node": 1,
                "unknown_escalation": 1,
            }
            assert finals.got == [] and esc.pending == 1  # still waiting, still serving
            await client.publish(topic, encode_replies(good))
            await finals.wait_for(1)
            assert (finals.got[0].result.source, finals.got[0].result.label) == ("cloud", 4)
            await client.publish(topic, encode_replies(good))  # duplicate
            await eventually(
                lambda: not (esc.stats.late_replies < 1),
                "not (esc.stats.late_replies < 1)",
                timeout_s=5,
            )
            assert len(finals.got) == 1

    asyncio.run(scenario())


def test_a_reply_for_half_a_batch_and_one_hostile_verdict(mosquitto: BrokerInfo) -> None:
    """A message of six cases: the reply answers three (one of them with a forged corr, which is
    rejected and counted); the two good ones are `cloud`, the other four fall back at their
    deadline, each exactly once."""

    async def scenario() -> None:
        finals = Finals()
        spy = Spy()
        async with (
            _client(mosquitto, spy) as client,
            _escalator(mosquitto, finals, deadline_ms=1500) as esc,
        ):
            cases = [_case(i) for i in range(6)]
            await esc.escalate(cases)
            await spy.wait_for(1)
            e = decode_escalations(spy.seen[0].payload)
            assert len(e.cases) == 6 and e.reply_to is not None
            half = _reply(e, only=3, label=9)
            forged = msgspec.structs.replace(half.verdicts[2], corr="0" * 16)
            reply = msgspec.structs.replace(half, verdicts=[*half.verdicts[:2], forged])
            await client.publish(e.reply_to, encode_replies(reply))
            await finals.wait_for(2)
            assert {(f.result.id, f.result.source, f.result.label) for f in finals.got} == {
                (c.result.id, "cloud", 9) for c in cases[:2]
            }
            assert esc.stats.reply_rejects == {"wrong_correlation": 1}
            await finals.wait_for(6, timeout_s=10)
            await esc.wait_settled()
            by_id = {f.result.id: f.result.source for f in finals.got}
            assert len(finals.got) == 6 == len(by_id)
            assert [by_id[c.result.id] for c in cases] == ["cloud"] * 2 + ["edge_fallback"] * 4
            assert (esc.stats.cloud, esc.stats.fallback, esc.pending) == (2, 4, 0)

    asyncio.run(scenario())


def test_cases_handed_over_in_one_turn_share_a_message(mosquitto: BrokerInfo) -> None:
    """Two micro-batches' unsure cases handed over at the same moment go out as one message."""

    async def scenario() -> None:
        finals = Finals()
        spy = Spy()
        async with (
            _client(mosquitto, spy),
            _escalator(mosquitto, finals, deadline_ms=10_000) as esc,
        ):
            a, b = [_case(i) for i in range(3)], [_case(i) for i in range(3, 5)]
            await asyncio.gather(esc.escalate(a), esc.escalate(b))
            await spy.wait_for(1)
            await asyncio.sleep(0.2)  # a second message would have arrived by now
            assert len(spy.seen) == 1
            e = decode_escalations(spy.seen[0].payload)
            assert [c.id for c in e.cases] == [c.result.id for c in a + b]
            assert len({c.corr for c in e.cases}) == 5  # each case its own correlation id
            assert esc.stats.escalated == 5 and esc.stats.messages == 1

    asyncio.run(scenario())


def test_no_uplink_decides_edge_offline_at_once_and_uploads_after_reconnect(
    mosquitto: BrokerInfo, persistent_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    """The uplink (the cloud broker) goes away: unsure cases are decided at once as
    edge_offline and kept; once it is back they reach the cloud broker, where a subscriber with a
    persistent session (an archive, or a worker's session) receives them."""
    cloud = persistent_mosquitto.info

    async def scenario() -> None:
        finals = Finals()
        archive = Spy()
        async with (
            MqttSession(
                mqtt_for(cloud),
                client_id=f"archive-{uuid.uuid4().hex[:6]}",
                on_message=archive,
                manual_ack=False,
                persistent=True,
            ) as sub,
            _escalator(mosquitto, finals, uplink=cloud) as esc,
        ):
            subscribed = sub.subscribe("cloud/escalations/+")
            await sub.wait_connected(5)
            await subscribed  # its SUBACK
            await asyncio.to_thread(persistent_mosquitto.stop)  # the uplink goes away
            await eventually(
                lambda: not (esc.uplink.connected), "not (esc.uplink.connected)", timeout_s=10
            )
            cases = [_case(i) for i in range(10)]
            decided = await esc.escalate(cases)
            assert [f.result.source for f in decided] == ["edge_offline"] * 10
            assert [f.result.id for f in decided] == [c.result.id for c in cases]
            assert [f.result.label for f in decided] == [1] * 10  # the edge verdict stands
            assert esc.pending == 0 and esc.stats.hard_examples_stored == 10
            assert esc.hard_examples.stats().rows == 1  # ten cases in one upload message
            await asyncio.to_thread(persistent_mosquitto.restart)
            await archive.wait_for(1, timeout_s=30)  # the ten cases in one message
            await eventually(
                lambda: not (esc.hard_examples.stats().rows),
                "not (esc.hard_examples.stats().rows)",
                timeout_s=10,
            )
        got = {e.id: e for m in archive.seen for e in decode_escalations(m.payload).cases_view()}
        assert set(got) == {c.result.id for c in cases}
        assert all(e.offline and not e.wants_reply and e.deadline is None for e in got.values())
        np.testing.assert_array_equal(got[cases[3].result.id].tensor(), HOLDOUT.images[3])
        assert finals.got == []

    asyncio.run(scenario())


def test_pending_escalations_survive_a_restart_as_edge_fallback(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    node_id = f"gw-{uuid.uuid4().hex[:6]}"

    async def scenario() -> None:
        first = Finals()
        async with _escalator(
            mosquitto, first, state_dir=tmp_path, node_id=node_id, deadline_ms=60_000
        ) as esc:
            cases = [_case(i) for i in range(4)]
            await esc.escalate(cases)
            assert await esc.journal.count() == 4
        assert first.got == []  # stopped with them pending (as a crash would)
        second = Finals()
        second.fail_next = 1  # the first delivery fails: retried, not lost
        async with _escalator(mosquitto, second, state_dir=tmp_path, node_id=node_id) as esc2:
            await second.wait_for(4)
            await esc2.wait_settled()
            assert await esc2.journal.count() == 0
            assert esc2.stats.recovered == 4
        assert sorted(f.result.id for f in second.got) == sorted(c.result.id for c in cases)
        assert {f.result.source for f in second.got} == {"edge_fallback"}

    asyncio.run(scenario())


def test_default_policy_figures_in_the_readme_hold() -> None:
    """Hybrid accuracy and escalation rate of the default policy on the held-out digits, as the
    README's table states them (edge and cloud models run with ONNX Runtime)."""
    images, labels = HOLDOUT.images, HOLDOUT.labels
    edge = ort.InferenceSession(str(bundled_asset("digits_edge.onnx")))
    (edge_probs,) = edge.run(None, {"image": images})
    cloud = _cloud_labels(images)
    a = assess(np.asarray(edge_probs, dtype=np.float64), EscalationConfig().policy)
    hybrid = np.where(a.escalate, cloud, np.asarray(edge_probs).argmax(axis=1))
    correct, sent = int((hybrid == labels).sum()), int(a.escalate.sum())
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert f"{correct / 540:.1%}".replace("%", " %") + f" ({correct}/540)" in readme
    assert f"{sent / 540:.1%}".replace("%", " %") + f" ({sent}/540)" in readme
    assert sent / 540 < 0.30 and correct >= 528


def test_batches_round_trip_over_mqtt_3_1_1(mosquitto: BrokerInfo, tmp_path: Path) -> None:
    """Node and worker speaking MQTT 3.1.1 (no response topic, correlation data or expiry): the
    reply address, correlation ids and deadlines inside the payload are enough."""
    n = 12
    expected = _cloud_labels(HOLDOUT.images[:n])

    async def scenario() -> None:
        finals = Finals()
        config = EscalationConfig(
            enabled=True,
            policies={"digits": PolicyConfig(max_softmax_below=0.95, deadline_ms=10_000)},
            uplink=mqtt_for(mosquitto, protocol="3.1.1"),
        )
        cfg = worker_config(mosquitto, tmp_path, mqtt=mqtt_for(mosquitto, protocol="3.1.1"))
        async with Worker(cfg) as worker:
            esc = Escalator(
                config,
                node_id=f"gw-{uuid.uuid4().hex[:6]}",
                node_mqtt=mqtt_for(mosquitto),
                topics=Topics(),
                state_dir=tmp_path / "node",
                deliver=finals,
            )
            async with esc:
                assert esc.uplink.protocol == "3.1.1" and worker.session.protocol == "3.1.1"
                await esc.uplink.wait_connected(5)
                await esc.uplink._subs.answers[esc.reply_topic]  # the SUBACK of the reply topic
                cases = [_case(i) for i in range(n)]
                await esc.escalate(cases[:5])
                await esc.escalate(cases[5:])
                await finals.wait_for(n)
                await esc.wait_settled()
                assert esc.stats.messages == 2 and esc.stats.batch_sizes == {5: 1, 7: 1}
                by_seq = {f.result.frame_seq: f.result for f in finals.got}
                assert {r.source for r in by_seq.values()} == {"cloud"}
                assert [by_seq[i].label for i in range(n)] == expected.tolist()
                assert esc.stats.replies_rejected == 0
            assert await worker.drain()
            assert (worker.stats.received, worker.stats.replies, worker.stats.answered) == (2, 2, n)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("n", "settings", "sizes"),
    [(300, {}, [256, 44]), (5, {"max_message_bytes": 1024}, [2, 2, 1])],
    ids=["case cap", "byte cap"],
)
def test_a_hand_over_is_split_at_the_case_and_byte_caps(
    mosquitto: BrokerInfo, n: int, settings: dict[str, object], sizes: list[int]
) -> None:
    """At most 256 cases per message; with max_message_bytes 1024, two 8x8 float32 cases
    (256 bytes of tensor + ~256 of the rest each) per message."""

    async def scenario() -> None:
        finals = Finals()
        spy = Spy()
        async with (
            _client(mosquitto, spy),
            _escalator(mosquitto, finals, deadline_ms=10_000, **settings) as esc,
        ):
            cases = [_case(i % len(HOLDOUT.images), seq=i) for i in range(n)]
            await esc.escalate(cases)
            await spy.wait_for(len(sizes))
            got = [decode_escalations(m.payload) for m in spy.seen]
            assert [len(e.cases) for e in got] == sizes
            assert [c.id for e in got for c in e.cases] == [c.result.id for c in cases]
            assert len({e.corr for e in got}) == len(sizes)
            assert esc.stats.escalated == n and esc.pending == n

    asyncio.run(scenario())
