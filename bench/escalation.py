"""Escalation round trip and cloud-worker throughput: ``python -m bench.escalation``.

Starts Mosquitto (the project's config) on a free loopback port, then:

1. Round trip: an :class:`~edge_node.escalation.Escalator` (the node's side, journal on disk,
   ``synchronous = FULL``) escalates held-out digits at a paced rate (100 and 1,000 per second,
   ``--seconds`` each) to one ``edgewise worker`` process; the round trip of a case is from
   ``Escalator.escalate`` being called to its final result being handed to the node's deliver
   callback (journal commit, publish, broker, worker batch + cloud model + store + reply, broker,
   reply checks). Verdict cache off, deadline 10 s (no fallbacks in a healthy run).
2. Throughput: ``--count`` escalations published as fast as the client can, answered by 1 and
   then 2 ``edgewise worker`` processes (one share group); escalations/s from the first publish
   to the last reply. Baseline in the same run: a bare ONNX Runtime loop over the same cloud
   model and inputs, one call per input and one call per 64 inputs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_node.config import bundled_asset
from edge_node.escalation import Case, EscalationConfig, Escalator, Final, PolicyConfig
from edgewise.frames import load_holdout
from local_broker import BrokerInfo, MosquittoProcess
from mqtt_session import Inbound, MqttConfig, MqttSession
from schemas import EdgeVerdict, Result, Topics, encode_escalation, make_escalation, new_id

VERDICT = EdgeVerdict(label=1, confidence=0.5, margin=0.1, entropy=1.0)


def start_worker(
    broker: BrokerInfo, tmp: Path, worker_id: str, group: str
) -> subprocess.Popen[bytes]:
    cfg = tmp / f"{worker_id}.toml"
    cfg.write_text(
        f'worker_id = "{worker_id}"\ngroup = "{group}"\nlog_level = "WARNING"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'[store]\npath = "{tmp / worker_id}.db"\n',
        encoding="utf-8",
    )
    log = tmp / f"{worker_id}.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(
            [sys.executable, "-m", "edgewise.cli", "worker", "--config", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while "ready on" not in log.read_text(errors="replace"):
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start: {log.read_text()}")
        time.sleep(0.05)
    return p


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def case(i: int, images: np.ndarray) -> Case:
    r = Result(
        id=new_id(), seq=i + 1, device="cam-1", sensor="digits", frame_seq=i, model="digits",
        release=1, label=1, confidence=0.5, source="edge", latency_ms=0.0,
    )  # fmt: skip
    return Case(r, f"k{i}", images[i % len(images)], VERDICT, time.monotonic())


async def round_trip(broker: BrokerInfo, tmp: Path, rate: float, seconds: float) -> list[float]:
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
    async with esc:
        await esc.uplink.wait_connected(10)
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        for i in range(total):
            c = case(i, images)
            called[c.result.id] = time.perf_counter()
            await esc.escalate([c])
            lag = start + (i + 1) / rate - time.perf_counter()
            if lag > 0:
                await asyncio.sleep(lag)
        async with asyncio.timeout(60):
            await done.wait()
    return took


async def throughput(broker: BrokerInfo, count: int) -> float:
    images = load_holdout().images
    node = f"tp-{uuid.uuid4().hex[:6]}"
    topic = f"edge/{node}/reply"
    payloads = [
        encode_escalation(
            make_escalation(
                id=new_id(), node=node, model="digits", release=1, device="cam-1",
                sensor="digits", frame_seq=i, ts=time.time(), tensor=images[i % len(images)],
                edge=VERDICT, reply_to=topic, corr="c", deadline=time.time() + 600,
            )
        )
        for i in range(count)
    ]  # fmt: skip
    got = 0
    finished = asyncio.Event()
    last = 0.0

    def on_reply(msg: Inbound) -> None:
        nonlocal got, last
        got += 1
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
        start = time.perf_counter()
        window: set[asyncio.Future[None]] = set()
        for p in payloads:
            fut = s.publish_nowait("cloud/escalations/digits", p)
            window.add(fut)
            fut.add_done_callback(window.discard)
            if len(window) >= 500:
                await asyncio.wait(list(window), return_when=asyncio.FIRST_COMPLETED)
        async with asyncio.timeout(120):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per round-trip rate")
    parser.add_argument("--count", type=int, default=20_000, help="escalations per throughput run")
    parser.add_argument("--rt-workers", type=int, default=1, help="worker processes, round trip")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp_s:
        tmp = Path(tmp_s)
        broker = MosquittoProcess(tmp / "mosquitto")
        info = broker.start()
        try:
            print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}")
            w = [start_worker(info, tmp, f"rt-worker{i}", "rt") for i in range(args.rt_workers)]
            try:
                print(
                    "round trip (escalate() -> final result delivered),"
                    f" {args.rt_workers} worker process(es)"
                )
                print(f"{'rate/s':>8}{'n':>8}{'p50 ms':>10}{'p99 ms':>10}")
                for rate in (100.0, 1000.0):
                    took = asyncio.run(round_trip(info, tmp, rate, args.seconds))
                    print(
                        f"{rate:>8.0f}{len(took):>8}{pct(took, 0.5):>10.2f}{pct(took, 0.99):>10.2f}"
                    )
            finally:
                stop_workers(w)
            print("throughput (escalations/s, publish as fast as possible, all answered)")
            bare1 = bare_loop(min(args.count, 5000), 1)
            bare64 = bare_loop(args.count, 64)
            print(f"  bare ONNX Runtime loop, batch 1:   {bare1:>10,.0f}/s")
            print(f"  bare ONNX Runtime loop, batch 64:  {bare64:>10,.0f}/s")
            for n in (1, 2):
                group = f"tp{n}"
                procs = [start_worker(info, tmp, f"tp{n}-w{i}", group) for i in range(n)]
                try:
                    rate = asyncio.run(throughput(info, args.count))
                finally:
                    stop_workers(procs)
                print(
                    f"  {n} worker process(es):            {rate:>10,.0f}/s"
                    f"  = {rate / bare64:.2f} x batch-64 loop, {rate / bare1:.2f} x batch-1 loop"
                )
        finally:
            with contextlib.suppress(Exception):
                broker.stop()


if __name__ == "__main__":
    main()
