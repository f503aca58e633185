"""The edge node in-process against a real Mosquitto: frames in, results out, bad input held."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest

from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo, MosquittoProcess
from edgewise.serving.model import Prediction
from schemas import Frame, decode_deadletter, decode_results, decode_status, encode_frames
from tests.nodeharness import Harness, frame_bytes, running_node
from tests.waiting import eventually

HOLDOUT = load_holdout()


def _online_count(h: Harness) -> int:
    return sum(decode_status(m.payload).state == "online" for m in h.messages("status"))


async def _marker_answered(h: Harness, seq: int = 99) -> None:
    """Send one more frame and await its result: the node has handled every frame before it."""
    await h.sensor.wait_connected(20)
    await h.send(frame_bytes(seq, HOLDOUT.images[seq]))
    await h.seen.wait_for(lambda: any(r.frame_seq == seq for r in _results(h)), 20)


def _results(h: Harness) -> list:
    return [r for m in h.messages("results") for r in decode_results(m.payload).results]


def test_msgpack_and_json_frames_get_batched_results(mosquitto: BrokerInfo) -> None:
    async def scenario() -> None:
        batching = {"max_batch_size": 16, "max_wait_ms": 20, "max_results_per_message": 16}
        async with running_node(mosquitto, batching=batching) as h:
            n_msgpack, n_json = 60, 10
            sends = [h.send(frame_bytes(i, HOLDOUT.images[i])) for i in range(n_msgpack)]
            sends += [
                h.send(frame_bytes(i, HOLDOUT.images[i], as_json=True))
                for i in range(n_msgpack, n_msgpack + n_json)
            ]
            await asyncio.gather(*sends)
            total = n_msgpack + n_json
            await h.seen.wait_for(lambda: len(_results(h)) >= total)
            results = _results(h)
            assert sorted(r.frame_seq for r in results) == list(range(total))
            assert len({r.id for r in results}) == total
            seqs = [r.seq for r in results]
            assert seqs == sorted(seqs) and len(set(seqs)) == total
            # Batching: fewer messages than results, each carrying 1..16 results (results of
            # batches made while a commit runs share a message, up to max_results_per_message).
            sizes = [len(decode_results(m.payload).results) for m in h.messages("results")]
            assert len(sizes) < total and max(sizes) <= 16 and min(sizes) >= 1
            r0 = results[0]
            assert (r0.device, r0.sensor, r0.model, r0.release, r0.source) == (
                "cam-1",
                "digits",
                "digits",
                1,
                "edge",
            )
            assert all(0.0 <= r.confidence <= 1.0 and r.latency_ms >= 0.0 for r in results)
            correct = sum(r.label == int(HOLDOUT.labels[r.frame_seq]) for r in results)
            assert correct / total > 0.8
            assert h.node.stats.rejected == 0

    asyncio.run(scenario())


def test_status_is_retained_online_then_offline_after_drain(mosquitto: BrokerInfo) -> None:
    async def scenario() -> None:
        async with running_node(mosquitto) as h:
            online = decode_status(h.messages("status")[-1].payload)
            assert online.state == "online" and online.model == "digits"
            assert online.runtime == "onnxruntime" and online.provider == "CPUExecutionProvider"
            assert h.messages("status")[-1].retain is False  # live delivery clears the flag
            assert await h.node.drain(5)
            await h.seen.wait_for(
                lambda: decode_status(h.messages("status")[-1].payload).state == "offline"
            )
            offline = decode_status(h.messages("status")[-1].payload)
            assert offline.reasons == ["shutdown"] and offline.boot_id == online.boot_id

    asyncio.run(scenario())


HOSTILE: list[tuple[str, bytes, str]] = [
    ("sensors/cam-1/digits", b"\x00" * (1_048_576 + 1), "payload_too_large"),
    ("sensors/cam-1/digits", b"\x91" * 100_000, "malformed"),
    ("sensors/cam-1/digits", b"\xdd\xff\xff\xff\xff", "malformed"),
    ("sensors/cam-1/digits", b"{not json", "malformed"),
    (
        "sensors/cam-1/digits",
        b'{"v":1,"seq":1,"dtype":"float32","shape":[8,8],"data":[1.0,2.0]}',
        "bad_shape",
    ),
    (
        "sensors/cam-1/digits",
        msgspec.msgpack.encode(
            {
                "v": 1,
                "seq": 2,
                "dtype": "float32",
                "shape": [8, 8],
                "data": np.full(64, np.nan, np.float32).tobytes(),
            }
        ),
        "non_finite",
    ),
    (
        "sensors/cam-1/digits",
        msgspec.msgpack.encode(
            {
                "v": 1,
                "seq": 3,
                "dtype": "float32",
                "shape": [4, 4],
                "data": np.zeros(16, np.float32).tobytes(),
            }
        ),
        "bad_shape",
    ),
    (
        "sensors/cam-1/digits",
        msgspec.msgpack.encode(
            {"v": 1, "seq": 4, "dtype": "int8", "shape": [8, 8], "data": bytes(64)}
        ),
        "bad_dtype",
    ),
    ("sensors/cam-1/digits/extra", b"{}", "bad_topic"),
]


def test_hostile_input_is_dead_lettered_and_the_node_keeps_serving(mosquitto: BrokerInfo) -> None:
    async def scenario() -> None:
        async with running_node(
            mosquitto, topics={"subscriptions": ["sensors/#"]}, batching={"max_wait_ms": 0}
        ) as h:
            for topic, payload, _ in HOSTILE:
                await h.send(payload, topic=topic)
            await h.send(frame_bytes(99, HOLDOUT.images[0]))
            await h.seen.wait_for(
                lambda: len(h.messages("deadletter")) >= len(HOSTILE) and len(_results(h)) >= 1
            )
            letters = [decode_deadletter(m.payload) for m in h.messages("deadletter")]
            assert [d.reason for d in letters] == [reason for _, _, reason in HOSTILE]
            assert [d.topic for d in letters] == [t for t, _, _ in HOSTILE]
            assert letters[0].payload_bytes == 1_048_577 and len(letters[0].payload_head) == 64
            assert _results(h)[0].frame_seq == 99
            expected: dict[str, int] = {}
            for _, _, reason in HOSTILE:
                expected[reason] = expected.get(reason, 0) + 1
            assert dict(h.node.stats.rejects) == expected
            # Every rejected QoS 1 frame was acknowledged, and the good one once its result was:
            # after the drain nothing is left for the broker to redeliver.
            assert await h.node.drain(5)
            assert h.node._acker.outstanding == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("qos", [0, 1])
def test_qos0_and_qos1_frames_are_both_served(mosquitto: BrokerInfo, qos: int) -> None:
    async def scenario() -> None:
        async with running_node(mosquitto) as h:
            for i in range(5):
                await h.send(frame_bytes(i, HOLDOUT.images[i]), qos=qos)
            await h.seen.wait_for(lambda: len(_results(h)) >= 5)
            assert sorted(r.frame_seq for r in _results(h)) == [0, 1, 2, 3, 4]

    asyncio.run(scenario())


def test_a_backlog_at_the_bound_pauses_reading_and_loses_nothing(mosquitto: BrokerInfo) -> None:
    async def scenario() -> None:
        # Two frames may wait; the batcher holds them 300 ms, so the node must stop reading.
        batching = {"max_pending_frames": 2, "max_wait_ms": 300, "max_batch_size": 64}
        async with running_node(mosquitto, batching=batching) as h:
            for i in range(40):
                await h.send(frame_bytes(i, HOLDOUT.images[i]), qos=i % 2)
            await h.seen.wait_for(lambda: len(_results(h)) >= 40)
            assert sorted(r.frame_seq for r in _results(h)) == list(range(40))
            assert h.node.session.stats.read_pauses >= 1
            assert not h.node.session.reading_paused
            assert h.messages("deadletter") == []


def test_frames_waiting_for_a_slow_commit_count_towards_the_bound(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    """The bound counts every frame the node holds until its acknowledgement, not only those
    waiting for inference: with the outbox's write lock held by another connection, answered
    frames wait for their commit, and the node must stop reading rather than take the whole
    flood into memory."""
    bound = 20
    flood = 100

    async def scenario() -> None:
        batching = {"max_pending_frames": bound}
        storage = {"state_dir": str(tmp_path)}
        async with running_node(mosquitto, batching=batching, storage=storage) as h:
            await h.send(frame_bytes(0, HOLDOUT.images[0]))
            await h.seen.wait_for(lambda: len(_results(h)) >= 1)
            node = h.node
            db = tmp_path / f"{h.node_id}.outbox.db"
            blocker = sqlite3.connect(db, isolation_level=None)
            try:
                blocker.execute("BEGIN IMMEDIATE")  # the node's commits wait (busy timeout 5 s)
                taken = node.stats.frames_in
                for i in range(1, flood + 1):
                    await h.send(frame_bytes(i, HOLDOUT.images[i]))
                async with asyncio.timeout(4):
                    while not node.session.reading_paused:  # noqa: ASYNC110 - no event for it
                        await asyncio.sleep(0.01)
                assert node.stats.frames_in - taken < flood  # the rest wait at the broker
                assert bound <= node.frames.held() < 2 * bound
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            await h.seen.wait_for(lambda: len(_results(h)) >= flood + 1, timeout_s=30)
            assert sorted(r.frame_seq for r in _results(h)) == list(range(flood + 1))
            assert not node.session.reading_paused
            assert "storage_error" not in node.reasons

    asyncio.run(scenario())


def test_a_frame_redelivered_after_its_result_was_stored_gets_no_second_result(
    persistent_mosquitto: MosquittoProcess,
) -> None:
    """The crash window between 'result durable' and 'PUBACK sent', made deterministic."""
    broker = persistent_mosquitto
    info = broker.info

    async def scenario() -> None:
        async with running_node(info) as h:
            finish_all = h.node._acker.finish_all
            h.node._acker.finish_all = lambda tickets: None  # type: ignore[method-assign]
            for i in range(5):
                await h.send(frame_bytes(i, HOLDOUT.images[i]))
            await h.seen.wait_for(lambda: len(_results(h)) >= 5)
            first = {r.frame_seq: r.id for r in _results(h)}
            h.node._acker.finish_all = finish_all  # type: ignore[method-assign]
            # The broker keeps the node's session and redelivers the five unacknowledged frames.
            await asyncio.to_thread(broker.restart)
            # A second "online" reaches the probe only once its subscription is back (the broker
            # sends the node's will, "offline", while it shuts down).
            await h.seen.wait_for(lambda: _online_count(h) >= 2, 20)
            await _marker_answered(h)
            assert h.node.stats.frames_already_answered == 5
            again = [r for r in _results(h) if r.frame_seq != 99]
            assert {(r.frame_seq, r.id) for r in again} == set(first.items())

    asyncio.run(scenario())


def test_a_full_disk_degrades_the_node_keeps_answering_and_recovers(
    mosquitto: BrokerInfo, small_filesystem: Callable[[str], Path]
) -> None:
    state = small_filesystem("1m")

    def status_reasons(h: Harness) -> list[list[str]]:
        return [decode_status(m.payload).reasons for m in h.messages("status")]

    async def scenario() -> None:
        async with running_node(mosquitto, storage={"state_dir": str(state)}) as h:
            await h.send(frame_bytes(0, HOLDOUT.images[0]))
            await h.seen.wait_for(lambda: len(_results(h)) >= 1)
            filler = state / "filler"
            # Take every free byte of the file system (the last write or the close fails).
            with contextlib.suppress(OSError), filler.open("wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
            for i in range(1, 6):
                await h.send(frame_bytes(i, HOLDOUT.images[i]))
            await h.seen.wait_for(lambda: len(_results(h)) >= 6)
            await h.seen.wait_for(lambda: ["storage_full"] in status_reasons(h))
            assert h.node.state == "degraded"
            assert sorted(r.frame_seq for r in _results(h)) == list(range(6))
            filler.unlink()
            await h.send(frame_bytes(6, HOLDOUT.images[6]))
            await h.seen.wait_for(lambda: len(_results(h)) >= 7)
            await h.seen.wait_for(lambda: status_reasons(h)[-1] == [])
            assert h.node.state == "online"
            assert h.node.stats.results_stored >= 2  # frame 0 and frame 6 went through the outbox

    asyncio.run(scenario())


def test_a_copy_redelivered_while_the_first_is_being_answered_gets_no_second_result(
    persistent_mosquitto: MosquittoProcess,
) -> None:
    broker = persistent_mosquitto
    info = broker.info

    async def scenario() -> None:
        async with running_node(info) as h:
            # Hold inference until the link has dropped, come back, and the broker has
            # redelivered the frames (DUP) while their first copies are still being answered.
            gate, entered = asyncio.Event(), asyncio.Event()
            infer = h.node.served.infer

            async def gated(inputs: np.ndarray) -> Prediction:
                entered.set()
                await gate.wait()
                return await infer(inputs)

            h.node.served.infer = gated  # type: ignore[method-assign]
            for i in range(3):
                await h.send(frame_bytes(i, HOLDOUT.images[i]))
            await asyncio.wait_for(entered.wait(), 10)
            await asyncio.to_thread(broker.restart)
            await eventually(lambda: h.node.stats.frames_in >= 6, "6 frames in", timeout_s=20)
            # Results go out once the gate opens: the probe must be subscribed again by then.
            await h.seen.wait_for(lambda: _online_count(h) >= 2, 20)
            gate.set()
            await _marker_answered(h)
            ids: dict[int, set[str]] = {}
            for r in _results(h):
                ids.setdefault(r.frame_seq, set()).add(r.id)
            assert ids.keys() == {0, 1, 2, 99}
            assert all(len(v) == 1 for v in ids.values()), ids
            assert h.node.stats.frames_in == 7  # three frames, their three copies, the marker
            assert h.node.stats.results_out == 4
            assert h.node._acker.outstanding <= 1  # at most the marker's, awaiting its commit

    asyncio.run(scenario())


def _batch(first: int, n: int, *, as_json: bool = False) -> bytes:
    frames = [
        Frame(seq=i, ts=1766400000.0 + i, tensor=HOLDOUT.images[i]) for i in range(first, first + n)
    ]
    return encode_frames(frames, as_json=as_json)


def test_a_frame_batch_gets_one_result_per_frame_and_is_acked_once_all_are_stored(
    mosquitto: BrokerInfo,
) -> None:
    async def scenario() -> None:
        async with running_node(mosquitto, batching={"max_batch_size": 4}) as h:
            acked = h.node._acker.acked
            await h.send(_batch(0, 10))
            await h.send(_batch(10, 5, as_json=True))
            await h.seen.wait_for(lambda: len(_results(h)) >= 15)
            results = _results(h)
            assert sorted(r.frame_seq for r in results) == list(range(15))
            assert len({r.id for r in results}) == 15
            assert all(r.frame_ts == 1766400000.0 + r.frame_seq for r in results)
            correct = sum(r.label == int(HOLDOUT.labels[r.frame_seq]) for r in results)
            assert correct / 15 > 0.7
            assert h.node.stats.frames_in == 15 and h.node.stats.rejected == 0
            assert await h.node.drain(5)
            assert h.node._acker.acked - acked == 2  # one PUBACK per message
            assert h.node._acker.outstanding == 0

    asyncio.run(scenario())


def test_a_bad_frame_in_a_batch_is_dead_lettered_and_the_rest_answered(
    mosquitto: BrokerInfo,
) -> None:
    async def scenario() -> None:
        async with running_node(mosquitto) as h:
            good = [Frame(seq=i, ts=None, tensor=HOLDOUT.images[i]) for i in range(3)]
            wrong = Frame(seq=7, ts=None, tensor=np.zeros((4, 4), np.float32))  # not the model's
            await h.send(encode_frames([good[0], wrong, good[1], good[2]]))
            await h.seen.wait_for(
                lambda: len(_results(h)) >= 3 and len(h.messages("deadletter")) >= 1
            )
            assert sorted(r.frame_seq for r in _results(h)) == [0, 1, 2]
            [letter] = [decode_deadletter(m.payload) for m in h.messages("deadletter")]
            assert letter.reason == "bad_shape" and "frame 1 (seq 7)" in letter.detail
            assert await h.node.drain(5)
            assert h.node._acker.outstanding == 0

    asyncio.run(scenario())


def test_a_batch_is_not_acked_until_its_last_frame_is_stored(mosquitto: BrokerInfo) -> None:
    """Hold the commit of the batch's second half: the message must stay unacknowledged while
    its first half is stored."""

    async def scenario() -> None:
        batching = {"max_batch_size": 2, "max_results_per_message": 2}
        async with running_node(mosquitto, batching=batching) as h:
            gate, held = asyncio.Event(), asyncio.Event()
            store = h.node.results.store

            async def gated(payload: bytes, answered: list, served: list) -> None:  # type: ignore[type-arg]
                if any(p.frame.seq >= 2 for p in served):
                    held.set()
                    await gate.wait()
                await store(payload, answered, served)

            h.node.results.store = gated  # type: ignore[method-assign]
            acked = h.node._acker.acked
            await h.send(_batch(0, 4))
            await asyncio.wait_for(held.wait(), 10)
            async with asyncio.timeout(10):
                while h.node.stats.results_stored < 2:  # noqa: ASYNC110 - no event in the node
                    await asyncio.sleep(0.01)
            assert h.node._acker.acked == acked and h.node._acker.outstanding == 1
            gate.set()
            await h.seen.wait_for(lambda: len(_results(h)) >= 4)
            assert await h.node.drain(5)
            assert h.node._acker.acked == acked + 1

    asyncio.run(scenario())
