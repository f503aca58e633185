"""Worker-outage benchmark: result latency while every cloud worker is dead.

Run from the repo root::

    .venv/bin/python -m bench.cloud_outage                  # 1,000 frames, 20 s outage
    .venv/bin/python -m bench.cloud_outage --frames 600 --outage-s 10

One fresh Mosquitto (loopback), two ``edgewise worker`` processes in one share group, and an
edge node (in this process, the bundled digits model, escalation on with the default
``deadline_ms`` of 2,000 ms, the verdict cache off). A paced sensor sends ``--frames`` frames,
half of them held-out digits the edge model is unsure of, at ``--rate`` frames/s. A quarter
into the run both workers are ``kill -9``'d; ``--outage-s`` later they are started again. A
probe subscribed to the node's results records when each result arrives; a frame's latency is
arrival minus the frame's ``ts`` (both this machine's wall clock).

The run is made twice: with the cloud-availability detection (ADR 0074, the defaults) and
without it (``escalation.watch_worker_presence = false`` and
``escalation.unavailable_after_unanswered`` out of reach: every unsure case waits for its
deadline, as before). Printed: p50/p95/max latency per phase (before, outage, after) for all
frames and for the unsure ones, the p95 of the outage against 0.25 x ``deadline_ms``, and the
results by source. A benchmark, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_node.config import NodeConfig
from edge_node.node import EdgeNode
from edgewise.assets import bundled_asset
from edgewise.cli.frames import load_holdout
from edgewise.local_broker import MosquittoProcess
from edgewise.mqtt import Inbound, MqttConfig, MqttSession
from schemas import Frame, decode_results, decode_status, encode_frame

DEADLINE_MS = 2000.0


def _unsure_and_sure() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    holdout = load_holdout()
    s = ort.InferenceSession(
        str(bundled_asset("digits_edge.onnx")), providers=["CPUExecutionProvider"]
    )
    (probs,) = s.run(None, {"image": holdout.images})
    conf = np.asarray(probs).max(axis=1)
    return holdout.images, np.flatnonzero(conf < 0.95), np.flatnonzero(conf >= 0.95)


def _start_worker(tmp: Path, port: int, worker_id: str, group: str) -> subprocess.Popen[bytes]:
    cfg = tmp / f"{worker_id}.toml"
    cfg.write_text(
        f'worker_id = "{worker_id}"\ngroup = "{group}"\nlog_level = "WARNING"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n[store]\npath = "{tmp / worker_id}.db"\n',
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
    log = open(tmp / f"{worker_id}.log", "ab")  # noqa: SIM115 - the process keeps it
    return subprocess.Popen(
        [sys.executable, "-m", "edgewise.cli.app", "worker", "--config", str(cfg)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait_ready(tmp: Path, worker_id: str, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    log = tmp / f"{worker_id}.log"
    while time.monotonic() < end:
        if log.exists() and log.read_text(errors="replace").count("ready on") >= 1:
            return
        time.sleep(0.05)
    raise RuntimeError(f"worker {worker_id} not ready: {log.read_text(errors='replace')}")


def _q(values: list[float], q: float) -> float:
    return float(np.quantile(values, q)) if values else float("nan")


async def run_once(args: argparse.Namespace, *, detect: bool) -> Run:
    images, unsure, sure = _unsure_and_sure()
    with tempfile.TemporaryDirectory(prefix="edgewise-cloud-outage-") as d:
        tmp = Path(d)
        broker = MosquittoProcess(tmp / "mosquitto")
        broker.start()
        group = f"g-{uuid.uuid4().hex[:6]}"
        ids = [f"w{i}-{uuid.uuid4().hex[:4]}" for i in range(2)]
        workers = [_start_worker(tmp, broker.info.port, wid, group) for wid in ids]
        try:
            for wid in ids:
                await asyncio.to_thread(_wait_ready, tmp, wid)
            escalation: dict[str, object] = {
                "enabled": True,
                "policy": {"max_softmax_below": 0.95, "deadline_ms": DEADLINE_MS},
                "cache_entries": 0,
            }
            if not detect:
                escalation |= {
                    "watch_worker_presence": False,
                    "unavailable_after_unanswered": 1_000_000,
                }
            mqtt = MqttConfig(host="127.0.0.1", port=broker.info.port, connect_timeout_s=5)
            cfg = NodeConfig.load(
                default_model_path=bundled_asset("digits_edge.onnx"),
                node_id="bench-node",
                mqtt=mqtt,
                storage={"state_dir": str(tmp / "state")},
                escalation=escalation,
            )
            arrived: dict[int, float] = {}
            all_in = asyncio.Event()
            sources: dict[int, str] = {}
            flags: list[tuple[float, bool]] = []

            def on_message(msg: Inbound) -> None:
                now = time.time()
                if msg.topic.endswith("/results"):
                    for r in decode_results(msg.payload).results:
                        arrived.setdefault(r.frame_seq, now)
                        sources.setdefault(r.frame_seq, r.source)
                    if len(arrived) >= args.frames:
                        all_in.set()
                elif msg.topic.endswith("/status"):
                    reasons = decode_status(msg.payload).reasons
                    flags.append((now, "cloud_unavailable" in reasons))

            async with (
                MqttSession(
                    mqtt, client_id="bench-probe", on_message=on_message, manual_ack=False,
                    persistent=False,
                ) as probe,
                MqttSession(mqtt, client_id="bench-sensor", persistent=False) as sensor,
            ):  # fmt: skip
                probe.subscribe("edge/bench-node/#")
                await probe.wait_connected(5)
                await sensor.wait_connected(5)
                async with EdgeNode(cfg) as node:
                    await asyncio.sleep(1.0)
                    n = args.frames
                    kill_at = n // 4
                    back_at = kill_at + int(args.outage_s * args.rate)
                    sent: dict[int, float] = {}
                    kinds: dict[int, str] = {}
                    killed_t = restarted_t = 0.0
                    restart: asyncio.Task[None] | None = None
                    rng = np.random.default_rng(7)
                    order = rng.permutation(["u"] * (n // 2) + ["s"] * (n - n // 2))
                    start = time.monotonic()
                    for seq in range(n):
                        if seq == kill_at:
                            for w in workers:
                                w.kill()
                            for w in workers:
                                w.wait()
                            killed_t = time.time()
                        if seq == back_at:
                            workers = [
                                _start_worker(tmp, broker.info.port, wid, group) for wid in ids
                            ]
                            restarted_t = time.time()

                            async def ready() -> None:
                                for wid in ids:
                                    await asyncio.to_thread(_wait_ready, tmp, wid)

                            restart = asyncio.create_task(ready())
                        pick = unsure if order[seq] == "u" else sure
                        kinds[seq] = str(order[seq])
                        ts = time.time()
                        sent[seq] = ts
                        frame = Frame(seq=seq, ts=ts, tensor=images[pick[seq % len(pick)]])
                        await sensor.publish("sensors/cam-1/digits", encode_frame(frame))
                        lag = start + (seq + 1) / args.rate - time.monotonic()
                        if lag > 0:
                            await asyncio.sleep(lag)
                    if restart is not None:
                        await restart
                    await asyncio.wait_for(all_in.wait(), 60)
                    assert node.escalator is not None
                    await asyncio.wait_for(node.escalator.wait_settled(), 30)
                    stats = node.escalator.stats
        finally:
            for w in workers:
                if w.poll() is None:
                    w.send_signal(signal.SIGTERM)
            for w in workers:
                try:
                    w.wait(20)
                except subprocess.TimeoutExpired:
                    w.kill()
            broker.stop()
    run = Run(probes=stats.probes, unavailable_fallback=stats.unavailable_fallback)
    for name in ("before", "outage", "after"):
        seqs = [s for s in sent if _phase(sent[s], killed_t, restarted_t) == name]
        lat_all = [(arrived[s] - sent[s]) * 1000.0 for s in seqs]
        lat_u = [(arrived[s] - sent[s]) * 1000.0 for s in seqs if kinds[s] == "u"]
        run.phases[name] = Phase(
            frames=len(seqs),
            p50_ms=_q(lat_all, 0.5),
            p95_ms=_q(lat_all, 0.95),
            max_ms=max(lat_all, default=float("nan")),
            unsure_p95_ms=_q(lat_u, 0.95),
            sources=dict(Counter(sources[s] for s in seqs)),
        )
    said = [t for t, on in flags if on]
    cleared = [t for t, on in flags if not on and said and t > said[0]]
    run.said_after_kill_s = round(said[0] - killed_t, 3) if said else None
    run.cleared_after_restart_s = round(cleared[0] - restarted_t, 3) if cleared else None
    return run


def _phase(t: float, killed_t: float, restarted_t: float) -> str:
    return "before" if t < killed_t else "outage" if t < restarted_t else "after"


@dataclass
class Phase:
    frames: int
    p50_ms: float
    p95_ms: float
    max_ms: float
    unsure_p95_ms: float
    sources: dict[str, int]


@dataclass
class Run:
    probes: int
    unavailable_fallback: int
    phases: dict[str, Phase] = field(default_factory=dict)
    said_after_kill_s: float | None = None
    cleared_after_restart_s: float | None = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=25.0, help="frames per second")
    parser.add_argument("--outage-s", type=float, default=20.0)
    parser.add_argument("--only", choices=["with", "without"], default=None)
    args = parser.parse_args()
    print(
        f"{args.frames} frames (half unsure) at {args.rate:g}/s; both workers kill -9'd for"
        f" {args.outage_s:g} s; deadline_ms {DEADLINE_MS:g} (0.25 x = {DEADLINE_MS / 4:g} ms)"
    )
    for detect in (True, False):
        if args.only == ("without" if detect else "with"):
            continue
        run = asyncio.run(run_once(args, detect=detect))
        label = "with detection (ADR 0074)" if detect else "without detection"
        print(f"\n{label}")
        print("| phase | frames | p50 ms | p95 ms | max ms | unsure p95 ms | sources |")
        print("|---|---|---|---|---|---|---|")
        for name, r in run.phases.items():
            print(
                f"| {name} | {r.frames} | {r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.max_ms:.1f} |"
                f" {r.unsure_p95_ms:.1f} | {r.sources} |"
            )
        ratio = run.phases["outage"].p95_ms / DEADLINE_MS
        print(
            f"outage p95 = {ratio:.3f} x deadline_ms; cloud_unavailable said"
            f" {run.said_after_kill_s} s after the kill, cleared {run.cleared_after_restart_s} s"
            f" after the restart; probes {run.probes}, decided at once {run.unavailable_fallback}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
