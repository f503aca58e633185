"""Unit tests of micro-batching and dead-letter rate limiting (the reconnect schedule:
tests/test_reconnect_schedule.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from edge_node.deadletter import DeadLetters
from edge_node.inference import AdaptiveRunner
from edgewise.serving.batcher import MicroBatcher
from schemas import decode_deadletter


def _run_batcher(items: int, max_batch: int, max_wait_s: float, chunk: int = 0) -> list[list[int]]:
    batches: list[list[int]] = []

    async def main() -> None:
        async def process(batch: list[int]) -> None:
            batches.append(batch)

        b: MicroBatcher[int] = MicroBatcher(
            process, max_batch_size=max_batch, max_wait_s=max_wait_s
        )
        runner = asyncio.create_task(b.run())
        if chunk:
            b.add_many([])
            for first in range(0, items, chunk):
                b.add_many(list(range(first, min(items, first + chunk))))
        else:
            for i in range(items):
                b.add(i)
        await asyncio.wait_for(b.wait_idle(), 5)
        runner.cancel()

    asyncio.run(main())
    return batches


def test_batcher_caps_batch_size_and_keeps_order() -> None:
    batches = _run_batcher(100, max_batch=32, max_wait_s=0.5)
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    assert [x for b in batches for x in b] == list(range(100))


def test_batcher_add_many_batches_like_add() -> None:
    batches = _run_batcher(100, max_batch=32, max_wait_s=0.5, chunk=24)
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    assert [x for b in batches for x in b] == list(range(100))


def test_batcher_flushes_partial_batch_after_wait() -> None:
    batches = _run_batcher(3, max_batch=64, max_wait_s=0.01)
    assert batches == [[0, 1, 2]]


def test_batcher_zero_wait_sends_what_is_there() -> None:
    batches = _run_batcher(5, max_batch=64, max_wait_s=0.0)
    assert [x for b in batches for x in b] == [0, 1, 2, 3, 4]


def test_deadletters_are_capped_and_counted() -> None:
    now = [0.0]
    sent: list[tuple[str, bytes]] = []
    d = DeadLetters(
        "gw-1",
        "edge/gw-1/deadletter",
        lambda t, p: sent.append((t, p)),
        max_per_s=10,
        clock=lambda: now[0],
    )
    for _ in range(50):
        d.reject("sensors/a/b", b"\x91" * 100, "malformed", "broken")
    assert d.by_reason["malformed"] == 50
    assert d.published == 10
    assert d.suppressed == 40
    now[0] = 1.0  # a second later the bucket has refilled
    d.reject("sensors/a/b", b"x", "bad_shape", "wrong")
    assert d.published == 11
    letter = decode_deadletter(sent[-1][1])
    assert (letter.reason, letter.topic, letter.payload_bytes) == ("bad_shape", "sensors/a/b", 1)
    first = decode_deadletter(sent[0][1])
    assert first.payload_head == b"\x91" * 64 and first.payload_bytes == 100


def test_deadletter_rate_below_one_per_second_still_publishes() -> None:
    sent: list[str] = []
    now = [0.0]
    letters = DeadLetters("n", "edge/n/deadletter", lambda t, p: sent.append(t),
                          max_per_s=0.5, clock=lambda: now[0])  # fmt: skip
    letters.reject("sensors/a/b", b"x", "malformed", "x")
    letters.reject("sensors/a/b", b"x", "malformed", "x")
    assert (len(sent), letters.suppressed) == (1, 1)
    now[0] += 2.0  # one token back after 2 s at 0.5/s
    letters.reject("sensors/a/b", b"x", "malformed", "x")
    assert len(sent) == 2


def test_adaptive_runner_moves_slow_calls_to_a_thread_and_back() -> None:
    cost_s = [0.0]
    threads: list[str] = []

    def model(x: int) -> int:
        threads.append(threading.current_thread().name)
        time.sleep(cost_s[0])  # stands in for the model's own work
        return x * 2

    async def scenario() -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="infer") as pool:
            runner = AdaptiveRunner(model, pool, thread_above_s=0.05, smoothing=1.0)
            assert await runner(1) == 2
            assert not runner.on_thread
            cost_s[0] = 0.2
            assert await runner(2) == 4  # measured slow: the next call goes to the thread
            assert runner.on_thread
            cost_s[0] = 0.0
            assert await runner(3) == 6  # ran on the thread, measured fast: back inline
            assert not runner.on_thread
            assert await runner(4) == 8

    asyncio.run(scenario())
    main = threading.main_thread().name
    assert threads == [main, main, threads[2], main]
    assert threads[2].startswith("infer")
