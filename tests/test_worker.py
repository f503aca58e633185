"""The cloud worker against a real Mosquitto: answers, idempotency, expiry, rejects, store,
export, config errors, SIGTERM, and the README's handler example."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gc
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import msgspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from cloud_worker import Batch, ConfigError, HardExampleStore, Verdict, Worker, WorkerConfig
from cloud_worker.export import export
from cloud_worker.service import GC_THRESHOLDS, fewer_gc_passes
from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo
from tests.test_worker_harness import (
    Replies,
    batch_bytes,
    escalation_bytes,
    node_client,
    one_case,
    start_worker_process,
    wait_ready,
    worker_config,
)
from tests.waiting import eventually

HOLDOUT = load_holdout()
REPO = Path(__file__).resolve().parent.parent


def _random_worker(cfg: WorkerConfig) -> Worker:
    """A worker whose handler answers at random: equal answers can only come from idempotency."""
    worker = Worker(cfg)

    @worker.handler("digits", version="random-1")
    def guess(batch: Batch) -> list[Verdict]:
        return [Verdict(random.randrange(10), random.random()) for _ in range(len(batch))]

    return worker


def test_worker_answers_with_the_cloud_model_and_stores_hard_examples(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(mosquitto, tmp_path)

    async def scenario() -> None:
        replies = Replies()
        async with Worker(cfg) as worker:
            async with node_client(mosquitto, replies, node) as client:
                for i in range(40):
                    payload = escalation_bytes(f"e{i}", HOLDOUT.images[i], node=node)
                    await client.publish("cloud/escalations/digits", payload)
                await replies.wait_for(lambda: len(replies.got) >= 40)
            await worker.drain()
            assert worker.stats.answered == 40
            assert worker.stats.batches <= 40
            assert await worker.store.count() == 40
        by_id = {r.id: r for r in replies.got}
        correct = sum(by_id[f"e{i}"].label == HOLDOUT.labels[i] for i in range(40))
        assert correct >= 38  # the cloud model is right on ~99 % of the held-out digits
        r = by_id["e0"]
        assert (r.node, r.message_corr, r.corr, r.worker, r.model) == (
            node,
            "c0ffee",
            "c0ffee-case",
            cfg.worker_id,
            "digits_cloud-1",
        )
        # MQTT 5: the reply carries the correlation data too.
        assert replies.raw[0].properties.CorrelationData == b"c0ffee"

    asyncio.run(scenario())


def test_duplicate_escalation_gets_the_same_answer_also_after_restart(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(mosquitto, tmp_path)
    payload = escalation_bytes("dup-1", HOLDOUT.images[3], node=node)

    async def scenario() -> None:
        replies = Replies()
        async with node_client(mosquitto, replies, node) as client:
            async with _random_worker(cfg) as worker:
                for _ in range(3):  # back to back: one in progress, then from the cache
                    await client.publish("cloud/escalations/digits", payload)
                await replies.wait_for(lambda: len(replies.got) >= 3)
                await client.publish("cloud/escalations/digits", payload)
                await replies.wait_for(lambda: len(replies.got) >= 4)
                assert await worker.drain()  # all in hand finished (no reply left unconfirmed)
                assert worker.stats.answered == 1
                assert worker.stats.duplicates == 3
            # A new worker on the same store: its cache is empty, the store remembers.
            async with _random_worker(cfg) as again:
                await client.publish("cloud/escalations/digits", payload)
                await replies.wait_for(lambda: len(replies.got) >= 5)
                await again.drain()
                assert again.stats.answered == 0
                assert again.stats.duplicates == 1
                assert await again.store.count() == 1
        answers = {(r.label, r.confidence, r.worker) for r in replies.got}
        assert len(answers) == 1, answers

    asyncio.run(scenario())


def test_expired_escalation_is_ignored(mosquitto: BrokerInfo, tmp_path: Path) -> None:
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(mosquitto, tmp_path)

    async def scenario() -> None:
        replies = Replies()
        async with Worker(cfg) as worker:
            async with node_client(mosquitto, replies, node) as client:
                stale = escalation_bytes("old", HOLDOUT.images[0], node=node, deadline_s=-1.0)
                await client.publish("cloud/escalations/digits", stale)
                fresh = escalation_bytes("new", HOLDOUT.images[1], node=node)
                await client.publish("cloud/escalations/digits", fresh)
                await replies.wait_for(lambda: any(r.id == "new" for r in replies.got))
            await worker.drain()
            assert worker.stats.expired == 1
            assert worker.stats.answered == 1
            assert await worker.store.count() == 1
        assert [r.id for r in replies.got] == ["new"]

    asyncio.run(scenario())


def test_hostile_escalations_are_rejected_and_counted(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(mosquitto, tmp_path, max_payload_bytes=4096)

    async def scenario() -> None:
        replies = Replies()
        async with Worker(cfg) as worker:
            async with node_client(mosquitto, replies, node) as client:
                client.subscribe("edge/victim/#")
                topic = "cloud/escalations/digits"
                await client.publish(topic, b"\xc1garbage")
                await client.publish(topic, b"\x80" * 5000)  # oversized
                await client.publish(topic, b"\x81\xa1v\x01")  # valid msgpack, not an escalation
                big = np.zeros((64, 64), dtype=np.float32)  # fits the limits, not 4 KiB
                await client.publish(topic, escalation_bytes("big", big, node=node))
                # A reply address of another node: the worker must not publish there.
                evil = escalation_bytes(
                    "evil", HOLDOUT.images[0], node=node, reply_to="edge/victim/cmd"
                )
                await client.publish(topic, evil)
                # Right payload, wrong topic (model mismatch).
                await client.publish(
                    "cloud/escalations/other", escalation_bytes("x", HOLDOUT.images[0], node=node)
                )
                await client.publish(topic, escalation_bytes("ok", HOLDOUT.images[2], node=node))
                await replies.wait_for(lambda: any(r.id == "ok" for r in replies.got))
            await worker.drain()
            s = worker.stats
            assert s.rejects["malformed"] == 1
            assert s.rejects["payload_too_large"] == 2
            assert s.rejects["bad_schema"] == 1
            assert s.rejects["bad_topic"] == 2
            assert s.answered == 1
            assert await worker.store.count() == 1
        assert [r.id for r in replies.got] == ["ok"]

    asyncio.run(scenario())


def test_hard_example_upload_is_stored_without_a_reply(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(mosquitto, tmp_path)

    async def scenario() -> None:
        replies = Replies()
        async with Worker(cfg) as worker:
            async with node_client(mosquitto, replies, node) as client:
                up = escalation_bytes(
                    "up", HOLDOUT.images[5], node=node, reply=False, deadline_s=None
                )
                await client.publish("cloud/escalations/digits", up)
                await client.publish(
                    "cloud/escalations/digits", escalation_bytes("m", HOLDOUT.images[6], node=node)
                )
                await replies.wait_for(lambda: any(r.id == "m" for r in replies.got))
            await worker.drain()
            assert worker.stats.uploads == 1
            assert await worker.store.count() == 2
        assert [r.id for r in replies.got] == ["m"]

    asyncio.run(scenario())


def test_export_parquet_and_csv(mosquitto: BrokerInfo, tmp_path: Path) -> None:
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(mosquitto, tmp_path)

    async def fill() -> None:
        replies = Replies()
        async with Worker(cfg) as worker:
            async with node_client(mosquitto, replies, node) as client:
                for i in range(25):
                    p = escalation_bytes(f"x{i}", HOLDOUT.images[i], node=node)
                    await client.publish("cloud/escalations/digits", p)
                await replies.wait_for(lambda: len(replies.got) >= 25)
            await worker.drain()

    started = time.time()
    asyncio.run(fill())
    seen: list[int] = []
    n = export(cfg.store.path, tmp_path / "out.parquet", "parquet", on_rows=seen.append, batch=10)
    assert n == 25 and seen == [10, 10, 5]
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.num_rows == 25
    row = table.slice(0, 1).to_pylist()[0]
    image = np.frombuffer(row["input"], dtype=np.float32).reshape(8, 8)
    ids = table.column("id").to_pylist()
    i = int(ids[0][1:])
    np.testing.assert_array_equal(image, HOLDOUT.images[i])
    assert (row["node"], row["edge_label"], row["cloud_model"]) == (node, 1, "digits_cloud-1")
    # Times are epoch seconds, all three of them, in order.
    for r in table.to_pylist():
        assert r["sent_at"] - 1 <= r["received_at"] <= r["answered_at"] <= time.time()
        assert r["received_at"] >= started - 1
    # The command, with its CSV format.
    out = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", "worker", "export", str(tmp_path / "o.csv"),
         "--format", "csv", "--store", str(cfg.store.path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "wrote 25 hard examples" in out.stdout
    with open(tmp_path / "o.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 25 and bytes.fromhex(rows[0]["input"]) == row["input"]
    missing = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", "worker", "export", str(tmp_path / "z.csv"),
         "--store", str(tmp_path / "nope.db")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert missing.returncode == 2 and "no hard-example store" in missing.stderr
    assert not (tmp_path / "z.csv").exists()


def test_bad_worker_config_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "worker.toml"
    bad.write_text('group = "a/b"\n[batching]\nmax_batch_size = 0\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        WorkerConfig.load(bad)
    assert "group" in str(err.value) and "batching.max_batch_size" in str(err.value)
    assert "EDGEWISE_WORKER_BATCHING__MAX_BATCH_SIZE" in str(err.value)
    out = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", "worker", "--config", str(bad)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2 and "batching.max_batch_size" in out.stderr
    typo = tmp_path / "typo.toml"
    typo.write_text("[modelz]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="modelz"):
        WorkerConfig.load(typo)


def test_sigterm_finishes_in_hand_and_hands_back_the_rest(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    """SIGTERM mid-stream: exit 0, every reply sent was stored; what was not answered is not
    acknowledged, so the next run of the worker (same session) answers it: nothing is lost."""
    node = f"gw-{uuid.uuid4().hex[:6]}"
    wid = f"w-{uuid.uuid4().hex[:6]}"
    total = 300

    procs: list[subprocess.Popen[bytes]] = []
    # A share group of its own: an offline persistent session another test left in the default
    # group on this broker would be queued a share of these escalations, never answered here.
    group = f'"g-{uuid.uuid4().hex[:6]}"'

    async def scenario() -> None:
        replies = Replies()
        async with node_client(mosquitto, replies, node) as client:
            p, log = start_worker_process(tmp_path, mosquitto, wid, group=group)
            procs.append(p)
            await asyncio.to_thread(wait_ready, p, log)
            for i in range(total):
                img = HOLDOUT.images[i % len(HOLDOUT)]
                await client.publish(
                    "cloud/escalations/digits", escalation_bytes(f"s{i}", img, node=node)
                )
            await replies.wait_for(lambda: len(replies.got) >= 1)
            p.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(p.wait, 30)
            text = log.read_text()
            assert code == 0, text
            m = re.search(r"answered=(\d+) replies=(\d+)", text)
            assert m, text
            first_run = {r.id for r in replies.got}
            # The second run picks up the persistent session and answers the rest.
            p2, log2 = start_worker_process(tmp_path, mosquitto, wid, group=group)
            procs.append(p2)
            await asyncio.to_thread(wait_ready, p2, log2)
            await replies.wait_for(lambda: len({r.id for r in replies.got}) >= total, 90)
            p2.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(p2.wait, 30) == 0
        assert {r.id for r in replies.got} == {f"s{i}" for i in range(total)}
        assert len(first_run) >= 1
        async with HardExampleStore(
            WorkerConfig.load(worker_id=wid, store={"path": str(tmp_path / f"{wid}.db")}).store
        ) as store:
            assert await store.count() == total

    try:
        asyncio.run(scenario())
    finally:  # a worker left running would answer the next tests' escalations
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_readme_worker_example_runs(mosquitto: BrokerInfo, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- worker-example -->\n```python\n(.*?)```", readme, re.S)
    assert m, "README lacks the worker example"
    code = m.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    script = tmp_path / "my_worker.py"
    script.write_text(code, encoding="utf-8")
    node = f"gw-{uuid.uuid4().hex[:6]}"
    env_cfg = tmp_path / "worker.toml"
    # A share group of its own: a worker another test left on this broker must not answer.
    env_cfg.write_text(
        f'group = "g-{uuid.uuid4().hex[:6]}"\n'
        f'[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\n'
        f'[store]\npath = "{tmp_path / "readme.db"}"\n',
        encoding="utf-8",
    )

    async def scenario() -> None:
        replies = Replies()
        async with node_client(mosquitto, replies, node) as client:
            proc = await asyncio.to_thread(
                subprocess.Popen,
                [sys.executable, str(script)],
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            try:
                deadline = time.monotonic() + 30
                sent = 0
                while not replies.got and time.monotonic() < deadline:
                    sent += 1
                    payload = escalation_bytes(f"r{sent}", HOLDOUT.images[0], node=node)
                    await client.publish("cloud/escalations/digits", payload)
                    with_timeout = asyncio.wait_for(replies.changed.wait(), 0.5)
                    with contextlib.suppress(TimeoutError):
                        await with_timeout
                assert replies.got, "the README worker never answered"
                assert replies.got[0].model == "threshold-1"
                proc.send_signal(signal.SIGTERM)
                out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
                assert proc.returncode == 0, out
            finally:
                if proc.poll() is None:
                    proc.kill()

    asyncio.run(scenario())


def test_every_worker_setting_is_documented(tmp_path: Path) -> None:
    doc = (REPO / "docs" / "cloud-worker.md").read_text(encoding="utf-8")
    keys: list[str] = []
    for name, f in WorkerConfig.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and name in ("batching", "store"):
            keys += [f"{name}.{sub}" for sub in ann.model_fields]  # type: ignore[attr-defined]
        else:
            keys.append(name)
    missing = [
        k
        for k in keys
        if f"`{k}`" not in doc or "EDGEWISE_WORKER_" + k.replace(".", "__").upper() not in doc
    ]
    assert not missing, missing
    example = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert example
    path = tmp_path / "worker.toml"
    path.write_text(example.group(1), encoding="utf-8")
    assert WorkerConfig.load(path).worker_id == "gpu-1"


def test_a_batch_message_gets_one_reply_and_cases_of_messages_share_a_handler_call(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    """Five messages of four cases, one an expired case and one a case answered before: each
    message gets one reply (the expired case left out, the old case answered as before), and
    the cases of the five messages go to the handler together (dynamic batching; the first case
    waits for the others although the model is idle: ``wait_when_idle``)."""
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(
        mosquitto, tmp_path,
        batching={"max_batch_size": 18, "max_wait_ms": 1000, "wait_when_idle": True},
    )  # fmt: skip

    async def scenario() -> None:
        replies = Replies()
        calls: list[list[str]] = []
        worker = Worker(cfg)

        @worker.handler("digits", version="seen-1")
        def record(batch: Batch) -> list[Verdict]:
            calls.append([e.id for e in batch.escalations])
            return [Verdict(int(e.id[1:]) % 10, 0.9) for e in batch.escalations]

        async with worker:
            async with node_client(mosquitto, replies, node) as client:
                await client.publish(
                    "cloud/escalations/digits", escalation_bytes("b0", HOLDOUT.images[0], node=node)
                )
                await replies.wait_for(lambda: len(replies.got) >= 1)
                calls.clear()
                for m in range(5):
                    cases = [one_case(f"b{4 * m + k + 1}", HOLDOUT.images[k]) for k in range(4)]
                    if m == 1:
                        cases[3] = one_case("b99", HOLDOUT.images[3], deadline_s=-1.0)
                    if m == 2:
                        cases[0] = one_case("b0", HOLDOUT.images[0])  # answered before
                    payload = batch_bytes(cases, node=node, corr=f"msg{m}")
                    await client.publish("cloud/escalations/digits", payload)
                await replies.wait_for(lambda: len(replies.raw) >= 6)
            assert await worker.drain()
            s = worker.stats
            assert (s.received, s.cases, s.replies, s.verdicts) == (6, 21, 6, 20)
            assert (s.expired, s.duplicates, s.answered) == (1, 1, 19)
            assert s.handled == 19 and await worker.store.count() == 19
        assert len(calls) == 1 and len(calls[0]) == 18  # four messages' fresh cases, one call
        per_message = {r.message_corr: [] for r in replies.got}
        for r in replies.got:
            per_message[r.message_corr].append(r.id)
        assert per_message["msg0"] == ["b1", "b2", "b3", "b4"]
        assert per_message["msg1"] == ["b5", "b6", "b7"]  # b99 expired: left out
        assert sorted(per_message["msg2"]) == ["b0", "b10", "b11", "b12"]
        assert {r.label for r in replies.got if r.id == "b0"} == {0}
        assert all(r.corr == "case" and r.model == "seen-1" for r in replies.got if r.id != "b0")

    asyncio.run(scenario())


def test_an_idle_model_takes_a_case_at_once_and_cases_gather_while_it_is_busy(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    """Default batching with the longest ``max_wait_ms`` (1 s): the first case goes to the idle
    model at once; the cases that come while its call is held up go together, in one call, the
    moment the model is free. Neither batch waits for ``max_wait_ms`` to run out."""
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(mosquitto, tmp_path, batching={"max_wait_ms": 1000})
    release = threading.Event()

    async def scenario() -> list[list[str]]:
        replies = Replies()
        calls: list[list[str]] = []
        worker = Worker(cfg)

        @worker.handler("digits", version="held-1")
        def held(batch: Batch) -> list[Verdict]:
            calls.append([e.id for e in batch.escalations])
            if len(calls) == 1:
                release.wait(30)
            return [Verdict(1, 0.9) for _ in batch.escalations]

        async with worker, node_client(mosquitto, replies, node) as client:
            await client.publish(
                "cloud/escalations/digits", escalation_bytes("i0", HOLDOUT.images[0], node=node)
            )
            await eventually(
                lambda: len(calls) == 1, "len(calls) == 1"
            )  # in the handler, without a wait
            for i in (1, 2, 3):
                await client.publish(
                    "cloud/escalations/digits",
                    escalation_bytes(f"i{i}", HOLDOUT.images[i], node=node),
                )
            await eventually(
                lambda: worker.stats.cases == 4, "worker.stats.cases == 4"
            )  # all taken in, waiting
            assert len(calls) == 1
            release.set()
            await replies.wait_for(lambda: len(replies.got) >= 4)
            assert await worker.drain()
            assert worker._batchers["digits"].timeouts == 0
        return calls

    try:
        calls = asyncio.run(scenario())
    finally:
        release.set()
    assert calls == [["i0"], ["i1", "i2", "i3"]]


def test_a_reply_answers_the_part_of_a_batch_whose_handler_call_worked(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    """One message, cases of two shapes (two handler calls); the call for the small inputs fails:
    the reply answers the others, and the message is acknowledged (not handed out again)."""
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(mosquitto, tmp_path)

    async def scenario() -> None:
        replies = Replies()
        worker = Worker(cfg)

        @worker.handler("digits", version="picky-1")
        def picky(batch: Batch) -> list[Verdict]:
            if batch.inputs.shape[1:] != (8, 8):
                raise RuntimeError("only 8x8 digits")
            return [Verdict(1, 0.8) for _ in range(len(batch))]

        async with worker:
            async with node_client(mosquitto, replies, node) as client:
                small = np.zeros((4, 4), np.float32)
                cases = [
                    one_case("p0", HOLDOUT.images[0]),
                    one_case("p1", small),
                    one_case("p2", HOLDOUT.images[2]),
                    one_case("p3", small),
                ]
                await client.publish("cloud/escalations/digits", batch_bytes(cases, node=node))
                await replies.wait_for(lambda: len(replies.raw) >= 1)
            assert await worker.drain()
            assert worker.describe()["unacknowledged"] == 0
            assert (worker.stats.handler_errors, worker.stats.answered) == (1, 2)
            assert await worker.store.count() == 2
        assert sorted(r.id for r in replies.got) == ["p0", "p2"]

    asyncio.run(scenario())


def test_a_batch_with_one_hostile_case_is_rejected_whole_and_counted(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(mosquitto, tmp_path)

    async def scenario() -> None:
        replies = Replies()
        async with Worker(cfg) as worker:
            async with node_client(mosquitto, replies, node) as client:
                good = [one_case(f"h{i}", HOLDOUT.images[i]) for i in range(3)]
                hostile = msgspec.structs.replace(good[1], shape=[9, 9])  # 81 floats, 64 sent
                await client.publish(
                    "cloud/escalations/digits",
                    batch_bytes([good[0], hostile, good[2]], node=node),
                )
                await client.publish("cloud/escalations/digits", batch_bytes(good, node=node))
                await replies.wait_for(lambda: len(replies.got) >= 3)
            assert await worker.drain()
            assert worker.stats.rejects == {"bad_shape": 1}
            assert worker.stats.answered == 3
        assert sorted(r.id for r in replies.got) == ["h0", "h1", "h2"]
        assert len(replies.raw) == 1

    asyncio.run(scenario())


def test_handler_calls_of_a_model_never_overlap_while_the_next_batch_is_prepared(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    """Batches are handed on so the next one is looked up and stacked while one is in the
    handler, but a handler is still called for one batch at a time, in order: the first call
    waits (bounded) for a second to start beside it, which must not happen."""
    node = f"gw-{uuid.uuid4().hex[:6]}"
    cfg = worker_config(mosquitto, tmp_path, batching={"max_batch_size": 8, "max_wait_ms": 0})

    async def scenario() -> None:
        replies = Replies()
        lock = threading.Lock()
        active = [0]
        overlap = threading.Event()
        calls: list[list[str]] = []
        worker = Worker(cfg)

        @worker.handler("digits", version="serial-1")
        def serial(batch: Batch) -> list[Verdict]:
            with lock:
                active[0] += 1
                if active[0] > 1:
                    overlap.set()
                calls.append([e.id for e in batch.escalations])
            if len(calls) == 1:
                overlap.wait(0.5)  # a second call beside this one would set it
            with lock:
                active[0] -= 1
            return [Verdict(1, 0.9) for _ in range(len(batch))]

        async with worker:
            async with node_client(mosquitto, replies, node) as client:
                for m in range(6):
                    cases = [one_case(f"s{m}-{k}", HOLDOUT.images[k]) for k in range(8)]
                    await client.publish(
                        "cloud/escalations/digits", batch_bytes(cases, node=node, corr=f"m{m}")
                    )
                await replies.wait_for(lambda: len(replies.got) >= 48)
            assert await worker.drain()
            assert worker.stats.answered == 48 and await worker.store.count() == 48
        assert not overlap.is_set()
        assert len(calls) >= 2
        order = [i for call in calls for i in call]
        assert order == [f"s{m}-{k}" for m in range(6) for k in range(8)]

    asyncio.run(scenario())


def test_a_serving_worker_collects_garbage_less_often_and_restores_the_thresholds() -> None:
    before = gc.get_threshold()
    with fewer_gc_passes():
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]
    assert gc.get_threshold() == before


def test_an_old_stores_monotonic_received_at_exports_as_unknown(tmp_path: Path) -> None:
    """Stores written before received_at was epoch seconds hold a monotonic reading: the
    export writes it as unknown rather than as a date in 1970."""
    import sqlite_utils

    from cloud_worker.rows import COLUMNS, TABLE

    path = tmp_path / "old.db"
    row = {c: None for c in COLUMNS}
    row.update(id="a", node="gw-1", model="digits", sent_at=1.7e9, received_at=5123.25,
               answered_at=1.7e9 + 1, input=b"\x00")  # fmt: skip
    new = dict(row, id="b", received_at=1.7e9 + 0.5)
    sqlite_utils.Database(path)[TABLE].insert_all([row, new], pk="id")
    n = export(path, tmp_path / "o.csv", "csv")
    assert n == 2
    with open(tmp_path / "o.csv", newline="") as f:
        got = {r["id"]: r["received_at"] for r in csv.DictReader(f)}
    assert got == {"a": "", "b": str(1.7e9 + 0.5)}
