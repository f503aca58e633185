"""Escalation round trip and cloud-worker throughput: ``python -m bench.escalation``.

Starts Mosquitto (the project's config) on a free loopback port, then:

1. Round trip: an :class:`~edge_node.escalation.Escalator` (the node's side, journal on disk,
   ``synchronous = FULL``) escalates held-out digits at a paced rate (100 and 1,000 per second,
   ``--seconds`` each) to ``edgewise worker`` processes: at each tick, the cases due by then are
   handed over in one call, as a node hands over a micro-batch's unsure cases, so several go in
   one message when several are ready together (the sizes seen are printed). The round trip of
   a case is from ``Escalator.escalate`` being called to its final result being handed to the
   node's deliver callback (journal commit, publish, broker, worker batch + cloud model + store +
   reply, broker, reply checks). Verdict cache off, deadline 10 s (no fallbacks in a healthy run).
2. Throughput: ``--count`` escalations in messages of ``--cases`` cases each, published as fast as
   the client can, answered by 1 and then 2 ``edgewise worker`` processes (one share group);
   escalations/s from the first publish to the last verdict. Baseline in the same run: a bare
   ONNX Runtime loop over the same cloud model and inputs, one call per input, per 64 inputs and
   per as many inputs as the worker's handler calls held on average (from the worker's log).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_node.escalation import Case, EscalationConfig, Escalator, Final, PolicyConfig
from edgewise.assets import bundled_asset
from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo, MosquittoProcess
from edgewise.mqtt import Inbound, MqttConfig, MqttSession
from schemas import (
    EdgeVerdict,
    Result,
    Topics,
    decode_replies,
    encode_escalations,
    make_case,
    make_escalation_batch,
    new_id,
)

VERDICT = EdgeVerdict(label=1, confidence=0.5, margin=0.1, entropy=1.0)


def start_worker(
    broker: BrokerInfo, tmp: Path, worker_id: str, group: str, extra_toml: str = ""
) -> subprocess.Popen[bytes]:
    cfg = tmp / f"{worker_id}.toml"
    cfg.write_text(
        f'worker_id = "{worker_id}"\ngroup = "{group}"\nlog_level = "WARNING"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'[store]\npath = "{tmp / worker_id}.db"\n{extra_toml}',
        encoding="utf-8",
    )
    log = tmp / f"{worker_id}.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(
            [sys.executable, "-m", "edgewise.cli.app", "worker", "--config", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while "ready on" not in log.read_text(errors="replace"):
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start: {log.read_text()}")
        time.sleep(0.05)
    return p


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> tuple[int, int]:
    """Stop the workers; returns (handler calls, inputs in them) summed from their logs."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    calls = inputs = 0
    for p in procs:
        args = p.args
        assert isinstance(args, list)
        log = Path(str(args[-1])).with_suffix(".log")  # beside its config (start_worker)
        m = re.search(r"batches=(\d+) handled=(\d+)", log.read_text(errors="replace"))
        if m:
            calls += int(m.group(1))
            inputs += int(m.group(2))
    return calls, inputs


def case(i: int, images: np.ndarray) -> Case:
    r = Result(
        id=new_id(), seq=i + 1, device="cam-1", sensor="digits", frame_seq=i, model="digits",
        release=1, label=1, confidence=0.5, source="edge", latency_ms=0.0,
    )  # fmt: skip
    return Case(r, f"k{i}", images[i % len(images)], VERDICT, time.monotonic())


async def round_trip(
    broker: BrokerInfo, tmp: Path, rate: float, seconds: float
) -> tuple[list[float], Counter[int]]:
    """Round trips (ms) of the cases answered by the cloud, and messages by number of cases."""
    images = load_holdout().images
    called: dict[str, float] = {}
    took: list[float] = []
    done = asyncio.Event()
    total = int(rate * seconds)

    async def deliver(finals: list[Final]) -> None:
        now = time.perf_counter()
        for f in finals:
            if f.result.source == "cloud":
                took.append((now - called[f.result.id]) * 1000.0)
        if len(took) >= total:
            done.set()

    config = EscalationConfig(
        enabled=True,
        policies={"digits": PolicyConfig(max_softmax_below=0.95, deadline_ms=10_000.0)},
        cache_entries=0,
    )
    state = tmp / f"rt-{int(rate)}"
    esc = Escalator(
        config,
        node_id=f"bench-{int(rate)}",
        node_mqtt=MqttConfig(host=broker.host, port=broker.port),
        topics=Topics(),
        state_dir=state,
        deliver=deliver,
    )
    handing: set[asyncio.Task[list[Final]]] = set()
    async with esc:
        await esc.uplink.wait_connected(10)
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        sent = 0
        while sent < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            if due > sent:
                cases = [case(i, images) for i in range(sent, due)]
                now = time.perf_counter()
                for c in cases:
                    called[c.result.id] = now
                # Handed over without waiting for the journal, as the node does per micro-batch.
                task = asyncio.create_task(esc.escalate(cases))
                handing.add(task)
                task.add_done_callback(handing.discard)
                sent = due
            lag = start + sent / rate - time.perf_counter()
            await asyncio.sleep(max(0.0, lag))
        async with asyncio.timeout(60):
            await done.wait()
    return took, esc.stats.batch_sizes


async def throughput(
    broker: BrokerInfo,
    count: int,
    per_message: int,
    on_start: Callable[[], object] | None = None,
) -> float:
    """Escalations/s; ``on_start`` is called once the messages are built, just before the
    first publish (bench/worker_cpu.py reads CPU counters there)."""
    images = load_holdout().images
    node = f"tp-{uuid.uuid4().hex[:6]}"
    topic = f"edge/{node}/reply"
    payloads = []
    for first in range(0, count, per_message):
        deadline = time.time() + 600
        cases = [
            make_case(
                id=new_id(), release=1, device="cam-1", sensor="digits", frame_seq=i,
                tensor=images[i % len(images)], edge=VERDICT, corr=f"c{i}", deadline=deadline,
            )
            for i in range(first, min(count, first + per_message))
        ]  # fmt: skip
        batch = make_escalation_batch(
            node=node, model="digits", ts=time.time(), cases=cases, reply_to=topic, corr="m"
        )
        payloads.append(encode_escalations(batch))
    got = 0
    finished = asyncio.Event()
    last = 0.0

    def on_reply(msg: Inbound) -> None:
        nonlocal got, last
        got += len(decode_replies(msg.payload).verdicts)
        last = time.perf_counter()
        if got >= count:
            finished.set()

    mqtt = MqttConfig(host=broker.host, port=broker.port)
    async with MqttSession(
        mqtt, client_id=f"bench-{node}", on_message=on_reply, manual_ack=False, persistent=False
    ) as s:
        s.subscribe(topic)
        await s.wait_connected(10)
        await asyncio.sleep(0.2)
        if on_start is not None:
            on_start()
        start = time.perf_counter()
        window: set[asyncio.Future[None]] = set()
        for p in payloads:
            fut = s.publish_nowait("cloud/escalations/digits", p)
            window.add(fut)
            fut.add_done_callback(window.discard)
            if len(window) >= 500:
                await asyncio.wait(list(window), return_when=asyncio.FIRST_COMPLETED)
        async with asyncio.timeout(300):
            await finished.wait()
    return count / (last - start)


def bare_loop(count: int, batch: int) -> float:
    images = load_holdout().images
    session = ort.InferenceSession(
        str(bundled_asset("digits_cloud.onnx")), providers=["CPUExecutionProvider"]
    )
    opts_inputs = [
        np.ascontiguousarray(images[np.arange(i, i + batch) % len(images)])
        for i in range(0, count, batch)
    ]
    start = time.perf_counter()
    for x in opts_inputs:
        session.run(None, {"image": x})
    return len(opts_inputs) * batch / (time.perf_counter() - start)


def pct(values: list[float], q: float) -> float:
    return float(np.quantile(values, q)) if values else float("nan")


def sizes(counts: Counter[int]) -> str:
    n = sum(counts.values())
    if not n:
        return "no messages"
    mean = sum(k * v for k, v in counts.items()) / n
    common = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())[:6])
    more = " ..." if len(counts) > 6 else ""
    return (
        f"{n} messages, mean {mean:.2f} cases, max {max(counts)} (cases: messages {common}{more})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per round-trip rate")
    parser.add_argument("--count", type=int, default=20_000, help="escalations per throughput run")
    parser.add_argument("--rt-workers", type=int, default=1, help="worker processes, round trip")
    parser.add_argument(
        "--cases", default="16,64", help="cases per message in the throughput runs (comma list)"
    )
    parser.add_argument(
        "--worker-max-wait-ms",
        type=float,
        default=None,
        help="the workers' [batching] max_wait_ms (default: the worker's own default)",
    )
    args = parser.parse_args()
    extra = (
        ""
        if args.worker_max_wait_ms is None
        else f"[batching]\nmax_wait_ms = {args.worker_max_wait_ms}\n"
    )
    per_message = [int(c) for c in args.cases.split(",")]
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp_s:
        tmp = Path(tmp_s)
        broker = MosquittoProcess(tmp / "mosquitto")
        info = broker.start()
        try:
            print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}")
            print(
                "round trip (escalate() -> final result delivered),"
                f" {args.rt_workers} worker process(es)"
            )
            print(f"{'rate/s':>8}{'n':>8}{'p50 ms':>10}{'p99 ms':>10}  escalation messages; worker")
            for rate in (100.0, 1000.0):
                group = f"rt{int(rate)}"
                w = [
                    start_worker(info, tmp, f"{group}-w{i}", group, extra)
                    for i in range(args.rt_workers)
                ]
                try:
                    took, batch_sizes = asyncio.run(round_trip(info, tmp, rate, args.seconds))
                finally:
                    calls, inputs = stop_workers(w)
                formed = inputs / calls if calls else float("nan")
                print(
                    f"{rate:>8.0f}{len(took):>8}{pct(took, 0.5):>10.2f}{pct(took, 0.99):>10.2f}"
                    f"  {sizes(batch_sizes)}; handler calls of {formed:.1f} inputs on average"
                )
            print("throughput (escalations/s, publish as fast as possible, all answered)")
            bare: dict[int, float] = {}

            def bare_at(batch: int) -> float:
                if batch not in bare:
                    bare[batch] = bare_loop(min(args.count, 5000 * batch), batch)
                return bare[batch]

            print(f"  bare ONNX Runtime loop, batch 1:   {bare_at(1):>10,.0f}/s")
            print(f"  bare ONNX Runtime loop, batch 64:  {bare_at(64):>10,.0f}/s")
            for cases in per_message:
                for n in (1, 2):
                    group = f"tp{cases}x{n}"
                    procs = [
                        start_worker(info, tmp, f"{group}-w{i}", group, extra) for i in range(n)
                    ]
                    try:
                        rate = asyncio.run(throughput(info, args.count, cases))
                    finally:
                        calls, inputs = stop_workers(procs)
                    formed = max(1, round(inputs / calls)) if calls else 1
                    base = bare_at(formed)
                    print(
                        f"  {cases:>3} cases/message, {n} worker process(es): {rate:>8,.0f}/s;"
                        f" handler calls of {inputs / max(calls, 1):.1f} inputs on average;"
                        f" bare loop at batch {formed}: {base:,.0f}/s"
                        f" -> {rate / base:.2f} x that, {rate / bare_at(64):.2f} x batch 64,"
                        f" {rate / bare_at(1):.2f} x batch 1"
                    )
        finally:
            with contextlib.suppress(Exception):
                broker.stop()


if __name__ == "__main__":
    main()
