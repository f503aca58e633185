"""The node knows when the cloud is gone (docs/adr/0074-cloud-availability.md).

Against a fresh Mosquitto per test (retained worker presence of other tests must not leak in),
with the real escalator, real workers (in-process or ``edgewise worker`` processes, killed with
``kill -9``) and, for the whole story, a real node: after K unanswered cases, or when the last
worker's presence says offline, unsure cases are decided ``edge_fallback`` at once, the node
says ``degraded: cloud_unavailable`` on its retained status, probes at a bounded rate, and
clears once a reply comes back. Counts and order only.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from cloud_worker import Worker
from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo, MosquittoProcess
from schemas import decode_status, decode_telemetry
from tests.nodeharness import running_node
from tests.test_escalation import Finals, _case, _escalator
from tests.test_escalation_node import _check_every_frame_answered_once, _results, _send_mix
from tests.test_worker_harness import start_worker_process, wait_ready, worker_config
from tests.waiting import eventually

HOLDOUT = load_holdout()


class Changes:
    """What ``on_cloud_change`` heard, in order."""

    def __init__(self) -> None:
        self.heard: list[bool] = []

    def __call__(self, available: bool) -> None:
        self.heard.append(available)


def test_k_unanswered_cases_make_the_cloud_unavailable_then_a_probe_reply_clears_it(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    broker = fresh_mosquitto.info

    async def scenario() -> None:
        finals = Finals()
        changes = Changes()
        async with _escalator(
            broker,
            finals,
            deadline_ms=200,
            cache_entries=0,
            unavailable_after_unanswered=3,
            probe_interval_s=0.2,
        ) as esc:
            esc.availability.on_cloud_change = changes
            assert await esc.escalate([_case(i) for i in range(3)]) == []  # nobody answers
            await finals.wait_for(3)
            assert {f.result.source for f in finals.got} == {"edge_fallback"}
            assert esc.unavailable == "no_replies" and changes.heard == [False]
            # Unavailable: every unsure case is decided at once, a probe at most per interval.
            decided = await esc.escalate([_case(i, seq=10 + i) for i in range(5)])
            assert [f.result.source for f in decided] == ["edge_fallback"] * 5
            assert esc.pending == 0 and esc.stats.probes <= 1
            await asyncio.sleep(0.25)  # past the probe interval: the next case probes
            probes = esc.stats.probes
            decided = await esc.escalate([_case(i, seq=20 + i) for i in range(5)])
            assert [f.result.source for f in decided] == ["edge_fallback"] * 5
            assert esc.stats.probes == probes + 1
            assert esc.stats.unavailable_fallback == 10
            # A worker comes: its presence makes the next unsure case a probe; the reply clears.
            async with Worker(worker_config(broker, tmp_path)):
                await eventually(lambda: esc.workers_online == 1, "esc.workers_online == 1")
                await esc.escalate([_case(7, seq=30)])
                await eventually(lambda: esc.unavailable is None, "esc.unavailable is None")
                assert changes.heard == [False, True]
                assert esc.stats.probe_replies == 1
                # Available again: cases wait for the cloud's verdict.
                assert await esc.escalate([_case(8, seq=40)]) == []
                await eventually(lambda: esc.stats.cloud == 1, "esc.stats.cloud == 1")
                assert esc.stats.unavailable_episodes == 1
            # The worker stops: its presence says offline, the last one online: unavailable.
            await eventually(
                lambda: esc.unavailable == "no_workers", 'esc.unavailable == "no_workers"'
            )
            assert changes.heard == [False, True, False]

    asyncio.run(scenario())


def test_the_last_workers_presence_going_offline_decides_pending_cases_at_once(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    """A worker process ``kill -9``'d: its will marks it offline; with no worker online, the
    cases waiting for the cloud (deadline 60 s) are decided ``edge_fallback`` at once."""
    broker = fresh_mosquitto.info
    proc, log = start_worker_process(tmp_path, broker, f"w-{uuid.uuid4().hex[:6]}")
    try:
        wait_ready(proc, log)

        async def scenario() -> None:
            finals = Finals()
            changes = Changes()
            async with _escalator(broker, finals, deadline_ms=60_000, cache_entries=0) as esc:
                esc.availability.on_cloud_change = changes
                await eventually(lambda: esc.workers_online == 1, "esc.workers_online == 1")
                proc.send_signal(signal.SIGSTOP)  # it cannot answer what comes now
                assert await esc.escalate([_case(i) for i in range(4)]) == []
                proc.kill()  # SIGKILL
                await finals.wait_for(4, timeout_s=30)
                assert {f.result.source for f in finals.got} == {"edge_fallback"}
                assert esc.unavailable == "no_workers" and changes.heard == [False]
                assert esc.workers_online == 0 and esc.pending == 0
                assert esc.stats.unavailable_fallback == 4
                await esc.wait_settled()
                assert await esc.journal.count() == 0
                decided = await esc.escalate([_case(5, seq=50)])
                assert [f.result.source for f in decided] == ["edge_fallback"]

        asyncio.run(scenario())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_a_worker_stopped_cleanly_says_offline_on_its_presence(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    broker = fresh_mosquitto.info

    async def scenario() -> None:
        finals = Finals()
        async with _escalator(broker, finals, cache_entries=0) as esc:
            cfg = worker_config(broker, tmp_path)
            async with Worker(cfg) as worker:
                await eventually(
                    lambda: esc.workers.get(cfg.worker_id) is True,
                    "esc.workers.get(cfg.worker_id) is True",
                )
                assert await worker.drain()
            await eventually(
                lambda: esc.workers.get(cfg.worker_id) is False,
                "esc.workers.get(cfg.worker_id) is False",
            )
            assert esc.unavailable == "no_workers"

    asyncio.run(scenario())


# ---------------------------------------------------------------------- the whole story
@contextlib.contextmanager
def _worker_pool(
    tmp_path: Path, broker: BrokerInfo, ids: list[str]
) -> Iterator[tuple[list[subprocess.Popen[bytes]], Callable[[], list[subprocess.Popen[bytes]]]]]:
    group = f'"g-{uuid.uuid4().hex[:6]}"'
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> list[subprocess.Popen[bytes]]:
        started = []
        for wid in ids:
            p, log = start_worker_process(tmp_path, broker, wid, group=group, log_level="WARNING")
            started.append((p, log))
        for p, log in started:
            wait_ready(p, log)
        procs.extend(p for p, _ in started)
        return [p for p, _ in started]

    try:
        yield start(), start
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


OUTAGE_S = 6.0
"""Both workers stay dead this long (the report's 20 s, shortened: the assertions are counts)."""


def test_both_workers_kill_9_mid_run_every_frame_one_result_and_cloud_unavailable_said_and_cleared(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    """1,000 frames, half unsure, at 50 frames/s; both worker processes ``kill -9``'d after
    300 frames, started again ``OUTAGE_S`` later. Every frame gets exactly one result, nothing
    stays pending, the node's retained status said ``cloud_unavailable`` during the outage and
    no longer after it, and its telemetry counts the cases decided at once."""
    broker = fresh_mosquitto.info
    ids = [f"w{i}-{uuid.uuid4().hex[:4]}" for i in range(2)]
    rate_hz = 50.0
    escalation = {
        "enabled": True,
        "policy": {"max_softmax_below": 0.95, "deadline_ms": 2000},
        "cache_entries": 0,
        "probe_interval_s": 0.5,
    }

    async def scenario() -> None:
        with _worker_pool(tmp_path, broker, ids) as (workers, restart):
            async with running_node(broker, escalation=escalation) as h:
                esc = h.node.escalator
                assert esc is not None
                await eventually(lambda: esc.workers_online == 2, "esc.workers_online == 2")
                killed: list[int] = []
                restarted: list[asyncio.Task[list[subprocess.Popen[bytes]]]] = []

                async def outage(seq: int) -> None:
                    if seq == 300:
                        for w in workers:
                            w.kill()  # SIGKILL
                        for w in workers:
                            w.wait(10)
                        killed.append(seq)
                    if seq == 300 + int(OUTAGE_S * rate_hz):
                        restarted.append(asyncio.create_task(asyncio.to_thread(restart)))

                unsure, sure = await _send_mix(h, 500, 500, rate_hz=rate_hz, on_sent=outage)
                assert killed and restarted
                await restarted[0]
                await h.seen.wait_for(lambda: len({r.frame_seq for r in _results(h)}) >= 1000, 60)
                await asyncio.wait_for(esc.wait_settled(), 30)
                assert esc.pending == 0
                assert await esc.journal.count() == 0
                final = _check_every_frame_answered_once(h, unsure, sure)
                sources = Counter(final[s].source for s in unsure)
                assert sources["cloud"] + sources["edge_fallback"] == 500
                assert sources["cloud"] > 0 and sources["edge_fallback"] > 0, sources
                # The cloud came back and was seen to: cleared, and cases go to it again.
                await eventually(
                    lambda: esc.unavailable is None, "esc.unavailable is None", timeout_s=30
                )
                statuses = [decode_status(m.payload) for m in h.messages("status")]
                said = [i for i, s in enumerate(statuses) if "cloud_unavailable" in s.reasons]
                assert said, [s.reasons for s in statuses]
                assert "cloud_unavailable" not in statuses[-1].reasons
                assert statuses[-1].state == "online"
                assert esc.stats.unavailable_episodes >= 1
                assert esc.stats.unavailable_fallback > 0
                # Telemetry: the windows' deltas add up to the escalator's counts.
                windows = len(h.messages("telemetry"))
                await h.node.close_window()
                await h.seen.wait_for(lambda: len(h.messages("telemetry")) > windows, 20)
                total: Counter[str] = Counter()
                for m in h.messages("telemetry"):
                    total.update(decode_telemetry(m.payload).counts)
                assert total["edge_fallback_cloud_unavailable"] == esc.stats.unavailable_fallback
                assert total["cloud_probes"] == esc.stats.probes >= 1

    asyncio.run(scenario())
