"""The worker's answering pipeline (ADR 0035) against a real Mosquitto: a handler's own thread,
array verdicts, coroutine handlers in order, and intake held back while a model is saturated."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from cloud_worker import Batch, HardExampleStore, Verdict, Verdicts, Worker, WorkerConfig
from cloud_worker.errors import StoreError
from cloud_worker.handler import Handler
from cloud_worker.store import COLUMNS, Answer
from cloud_worker.worker import QUEUED_BATCHES_MAX
from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo
from tests.test_worker_harness import (
    Replies,
    batch_bytes,
    escalation_bytes,
    node_client,
    one_case,
    worker_config,
)
from tests.waiting import eventually

HOLDOUT = load_holdout()


# ---------------------------------------------------------------------- Verdicts (pure)
def test_verdicts_are_a_sequence_of_verdict_held_as_arrays() -> None:
    v = Verdicts(np.array([3, 1, 4]), np.array([0.5, 0.25, 1.0], dtype=np.float32))
    assert len(v) == 3
    assert v[0] == Verdict(3, 0.5) and v[-1] == Verdict(4, 1.0)
    assert list(v) == [Verdict(3, 0.5), Verdict(1, 0.25), Verdict(4, 1.0)]
    assert list(v[1:]) == [Verdict(1, 0.25), Verdict(4, 1.0)]
    assert v.labels.dtype == np.int64 and v.confidences.dtype == np.float64
    assert all(type(x.label) is int and type(x.confidence) is float for x in v)
    with pytest.raises(ValueError, match="differ"):
        Verdicts([1, 2], [0.5])


def test_a_handler_result_of_the_wrong_length_is_refused_also_as_verdicts() -> None:
    from cloud_worker.errors import HandlerError

    handler = Handler("digits", "v", lambda b: Verdicts([1], [0.5]))
    escalations = [one_case("x", HOLDOUT.images[0])] * 2
    batch = Batch("digits", np.zeros((2, 8, 8), np.float32), escalations)  # type: ignore[arg-type]
    with pytest.raises(HandlerError, match="1 verdicts for 2 inputs"):
        handler.checked(batch, Verdicts([1], [0.5]))


# ---------------------------------------------------------------------- with a broker
def test_verdicts_from_a_handler_are_clamped_like_verdict_objects(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    """A handler may answer with arrays; NaN, negative and >1 confidences become 0, 0 and 1."""
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(mosquitto, tmp_path, batching={"max_batch_size": 4, "max_wait_ms": 1000})

    async def scenario() -> None:
        replies = Replies()
        worker = Worker(cfg)

        @worker.handler("digits", version="arrays-1")
        def arrays(batch: Batch) -> Verdicts:
            return Verdicts(np.arange(len(batch)), [math.nan, -0.5, 2.0, 0.75][: len(batch)])

        async with worker:
            async with node_client(mosquitto, replies, node) as client:
                cases = [one_case(f"v{k}", HOLDOUT.images[k]) for k in range(4)]
                await client.publish("cloud/escalations/digits", batch_bytes(cases, node=node))
                await replies.wait_for(lambda: len(replies.got) >= 4)
            assert await worker.drain()
            assert worker.stats.answered == 4 and await worker.store.count() == 4
        got = {r.id: (r.label, r.confidence) for r in replies.got}
        assert got == {"v0": (0, 0.0), "v1": (1, 0.0), "v2": (2, 1.0), "v3": (3, 0.75)}

    asyncio.run(scenario())


def test_calls_of_a_coroutine_handler_never_overlap_and_keep_the_order(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(mosquitto, tmp_path, batching={"max_batch_size": 8, "max_wait_ms": 0})

    async def scenario() -> None:
        replies = Replies()
        active = [0]
        overlapped = [False]
        calls: list[list[str]] = []
        worker = Worker(cfg)

        @worker.handler("digits", version="async-1")
        async def slow(batch: Batch) -> list[Verdict]:
            active[0] += 1
            overlapped[0] |= active[0] > 1
            calls.append([e.id for e in batch.escalations])
            for _ in range(20):  # let the loop run other tasks (the next batches) meanwhile
                await asyncio.sleep(0)
            active[0] -= 1
            return [Verdict(1, 0.9) for _ in range(len(batch))]

        async with worker:
            async with node_client(mosquitto, replies, node) as client:
                for m in range(6):
                    cases = [one_case(f"a{m}-{k}", HOLDOUT.images[k]) for k in range(8)]
                    payload = batch_bytes(cases, node=node, corr=f"m{m}")
                    await client.publish("cloud/escalations/digits", payload)
                await replies.wait_for(lambda: len(replies.got) >= 48)
            assert await worker.drain()
        assert not overlapped[0]
        assert [i for call in calls for i in call] == [
            f"a{m}-{k}" for m in range(6) for k in range(8)
        ]

    asyncio.run(scenario())


def test_a_plain_handler_returning_an_awaitable_is_awaited_on_the_loop(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(mosquitto, tmp_path)

    async def scenario() -> None:
        replies = Replies()
        worker = Worker(cfg)
        loop = asyncio.get_running_loop()

        async def answer(n: int) -> list[Verdict]:
            assert asyncio.get_running_loop() is loop
            return [Verdict(7, 0.5)] * n

        @worker.handler("digits", version="later-1")
        def later(batch: Batch):  # type: ignore[no-untyped-def]
            assert threading.current_thread() is not threading.main_thread()
            return answer(len(batch))

        async with worker:
            async with node_client(mosquitto, replies, node) as client:
                cases = [one_case(f"l{k}", HOLDOUT.images[k]) for k in range(3)]
                await client.publish("cloud/escalations/digits", batch_bytes(cases, node=node))
                await replies.wait_for(lambda: len(replies.got) >= 3)
            assert await worker.drain()
        assert {(r.label, r.confidence) for r in replies.got} == {(7, 0.5)}

    asyncio.run(scenario())


def test_intake_is_held_back_while_the_model_is_saturated_and_nothing_is_lost(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    """The handler blocks: batches pile up to the limit, later messages wait undecoded and
    reading pauses; a drain started then answers and acknowledges every message received
    before it (held back ones included), in order; those never read are handed back."""
    node = f"gw-{uuid.uuid4().hex[:6]}"
    size = 4
    cfg = worker_config(mosquitto, tmp_path, batching={"max_batch_size": size, "max_wait_ms": 0})
    messages = 3 + QUEUED_BATCHES_MAX + 6  # batches in hand + the limit + some held back

    async def scenario() -> None:
        replies = Replies()
        release = threading.Event()
        calls: list[list[str]] = []
        worker = Worker(cfg)

        @worker.handler("digits", version="blocked-1")
        def blocked(batch: Batch) -> list[Verdict]:
            release.wait(30)
            calls.append([e.id for e in batch.escalations])
            return [Verdict(2, 0.5) for _ in range(len(batch))]

        async with worker:
            async with node_client(mosquitto, replies, node) as client:
                for m in range(messages):
                    cases = [one_case(f"q{m:02d}-{k}", HOLDOUT.images[k]) for k in range(size)]
                    payload = batch_bytes(cases, node=node, corr=f"m{m}")
                    await client.publish("cloud/escalations/digits", payload)
                await eventually(
                    lambda: worker.describe()["held_back_messages"] != 0,
                    'worker.describe()["held_back_messages"] != 0',
                )
                assert worker.session.reading_paused
                waiting = worker.describe()["waiting_for_a_batch"]
                assert waiting == {"digits": QUEUED_BATCHES_MAX * size}
                draining = asyncio.create_task(worker.drain())
                release.set()
                assert await draining
                received = worker.stats.received
                assert received > 3 + QUEUED_BATCHES_MAX  # the held back ones among them
                await replies.wait_for(lambda: len(replies.got) >= received * size)
            s = worker.stats
            assert (s.answered, s.replies) == (received * size, received)
            assert worker.describe()["unacknowledged"] == 0
            assert worker.describe()["held_back_messages"] == 0
            assert await worker.store.count() == received * size
        order = [i for call in calls for i in call]
        assert order == [f"q{m:02d}-{k}" for m in range(received) for k in range(size)]

    asyncio.run(scenario())


def test_a_thread_handler_looks_up_answers_on_its_own_thread_with_its_own_connection(
    tmp_path: Path,
) -> None:
    """`HardExampleStore.lookup_here`: each calling thread reads with a connection of its own,
    finds what was committed, and fails with StoreError (not sqlite3's) once the store closed;
    so does `lookup_ahead` (on the store's reading thread)."""
    cfg = WorkerConfig.load(worker_id="w", store={"path": str(tmp_path / "w.db")}).store
    answer = Answer(7, 0.75, "cloud-1", "w")

    async def scenario() -> None:
        async with HardExampleStore(cfg) as store:
            row = {c: 0 for c in COLUMNS} | {
                "id": "a", "cloud_label": 7, "cloud_confidence": 0.75, "cloud_model": "cloud-1",
                "worker": "w", "input": b"", "shape": "[]",
            }  # fmt: skip
            await store.add(row)
            seen: dict[str, tuple[int, dict[str, Answer]]] = {}

            def look(name: str) -> None:
                got = store.lookup_here(["a", "b"])
                seen[name] = (id(store._local.reader), got)

            threads = [threading.Thread(target=look, args=(n,)) for n in ("t1", "t2")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert seen["t1"][1] == seen["t2"][1] == {"a": answer}
            assert seen["t1"][0] != seen["t2"][0]
            assert len(store._local_readers) == 2
            assert store.lookup_ahead(["a", "b"]).result(10) == {"a": answer}
            assert store.lookup_ahead([]).result(10) == {}
        with pytest.raises(StoreError):
            await asyncio.to_thread(store.lookup_here, ["a"])
        with pytest.raises(StoreError):
            store.lookup_ahead(["a"]).result(10)
        assert store._local_readers == []

    asyncio.run(scenario())


def test_a_thread_handler_gets_one_hand_over_per_batch(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    """The look-up runs on the handler's thread just before the call: no batch goes through
    the store's reading thread."""
    cfg = worker_config(mosquitto, tmp_path)
    node = f"gw-{uuid.uuid4().hex[:6]}"
    threads: set[str] = set()

    async def scenario() -> None:
        worker = Worker(cfg)

        @worker.handler("digits", version="t-1")
        def classify(batch: Batch) -> list[Verdict]:
            threads.add(threading.current_thread().name)
            return [Verdict(1, 0.9) for _ in range(len(batch))]

        read_pool_calls = 0
        replies = Replies()
        async with node_client(mosquitto, replies, node) as client, worker:
            original = worker.store.lookup

            async def counted(ids: list[str]) -> dict[str, Answer]:
                nonlocal read_pool_calls
                read_pool_calls += 1
                return await original(ids)

            worker.store.lookup = counted  # type: ignore[method-assign]
            for i in range(5):
                await client.publish(
                    "cloud/escalations/digits",
                    escalation_bytes(f"h{i}", HOLDOUT.images[i], node=node),
                )
            await replies.wait_for(lambda: len(replies.got) >= 5)
            assert await worker.drain()
        assert read_pool_calls == 0
        assert len(threads) == 1 and next(iter(threads)).startswith("handler-digits")
        assert {r.id for r in replies.got} == {f"h{i}" for i in range(5)}

    asyncio.run(scenario())


def test_an_answer_stored_earlier_is_found_ahead_while_the_model_is_busy(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    """While the handler is busy with one batch, the next batch's ids are looked up on the
    store's reading thread (``lookup_ahead``): a case answered in an earlier run (in the store,
    not in memory) gets that answer again and never reaches the handler."""
    cfg = worker_config(mosquitto, tmp_path)
    node = f"gw-{uuid.uuid4().hex[:6]}"
    release = threading.Event()
    handled: list[str] = []
    ahead: list[list[str]] = []

    async def scenario() -> None:
        async with HardExampleStore(cfg.store) as store:  # an earlier run's answer
            row = {c: 0 for c in COLUMNS} | {
                "id": "known", "cloud_label": 7, "cloud_confidence": 0.75,
                "cloud_model": "earlier-1", "worker": "w-old", "input": b"", "shape": "[]",
            }  # fmt: skip
            await store.add(row)
        worker = Worker(cfg)

        @worker.handler("digits", version="now-1")
        def classify(batch: Batch) -> list[Verdict]:
            handled.extend(e.id for e in batch.escalations)
            release.wait(10)
            return [Verdict(1, 0.5) for _ in range(len(batch))]

        replies = Replies()
        async with node_client(mosquitto, replies, node) as client, worker:
            original = worker.store.lookup_ahead

            def spied(ids: list[str]) -> object:
                ahead.append(list(ids))
                return original(ids)

            worker.store.lookup_ahead = spied  # type: ignore[assignment,method-assign]
            topic = "cloud/escalations/digits"
            await client.publish(topic, escalation_bytes("first", HOLDOUT.images[0], node=node))
            await eventually(
                lambda: handled == ["first"], 'handled == ["first"]'
            )  # the handler is now busy
            cases = [one_case(i, HOLDOUT.images[k]) for k, i in enumerate(("known", "fresh"))]
            await client.publish(topic, batch_bytes(cases, node=node))
            await eventually(
                lambda: any("known" in ids for ids in ahead), 'any("known" in ids for ids in ahead)'
            )
            release.set()
            await replies.wait_for(lambda: len(replies.got) >= 3)
            assert await worker.drain()
        by_id = {r.id: r for r in replies.got}
        assert (by_id["known"].label, by_id["known"].confidence) == (7, 0.75)
        assert by_id["fresh"].label == by_id["first"].label == 1
        assert "known" not in handled and handled.count("fresh") == 1
        assert worker.stats.duplicates == 1

    asyncio.run(scenario())


def test_rows_the_store_cannot_commit_are_counted_and_the_escalation_still_acknowledged(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    """The table disappears under a running worker (another program drops it): the commit
    fails, the failure is counted and logged, the node still gets its reply, and the escalation
    is acknowledged (not handed out again and again)."""
    cfg = worker_config(mosquitto, tmp_path)
    node = f"gw-{uuid.uuid4().hex[:6]}"

    async def scenario() -> None:
        worker = Worker(cfg)

        @worker.handler("digits", version="t-1")
        def classify(batch: Batch) -> list[Verdict]:
            return [Verdict(3, 0.9) for _ in range(len(batch))]

        replies = Replies()
        async with node_client(mosquitto, replies, node) as client, worker:
            with sqlite3.connect(cfg.store.path) as other:
                other.execute("DROP TABLE examples")
            await client.publish(
                "cloud/escalations/digits", escalation_bytes("gone", HOLDOUT.images[0], node=node)
            )
            await replies.wait_for(lambda: len(replies.got) >= 1)
            await eventually(
                lambda: worker.describe()["unacknowledged"] == 0,
                'worker.describe()["unacknowledged"] == 0',
            )
            assert await worker.drain()
            assert worker.stats.store_errors == 1 and worker.stats.replies == 1
            assert worker.describe()["replying"] == 0
        assert [(r.id, r.label) for r in replies.got] == [("gone", 3)]

    asyncio.run(scenario())


@pytest.mark.parametrize("variable_limit", [None, 100])
def test_rows_go_in_multi_row_statements_and_the_first_answer_of_an_id_wins(
    tmp_path: Path, variable_limit: int | None
) -> None:
    """150 rows (two statements of 64 and 22 by ``executemany``; with SQLite allowing only 100
    variables, statements of 4 rows) with repeated ids inside and across statements: every
    id once, with its first row's answer, and the rows' values as given."""
    cfg = WorkerConfig.load(worker_id="w", store={"path": str(tmp_path / "w.db")}).store

    def row(i: int, label: int) -> tuple[object, ...]:
        values = {c: 0 for c in COLUMNS} | {
            "id": f"id{i % 120}", "cloud_label": label, "cloud_confidence": 0.5,
            "cloud_model": "m", "worker": "w", "input": bytes([i % 256]) * 4, "shape": "[4]",
        }  # fmt: skip
        return tuple(values[c] for c in COLUMNS)

    async def scenario() -> dict[str, Answer]:
        async with HardExampleStore(cfg) as store:
            assert store._db is not None
            if variable_limit is not None:
                store._db.conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, variable_limit)
            await store.add_many([row(i, label=i) for i in range(150)])
            assert store._statement_rows == (64 if variable_limit is None else 4)
            assert await store.count() == 120
            return await store.lookup([f"id{i}" for i in range(120)])

    got = asyncio.run(scenario())
    assert {k: v.label for k, v in got.items()} == {f"id{i}": i for i in range(120)}
    with sqlite3.connect(cfg.path) as conn:
        inputs = dict(conn.execute("SELECT id, input FROM examples"))
    assert inputs == {f"id{i}": bytes([i]) * 4 for i in range(120)}
