"""Edge node benchmark: throughput vs a bare paho subscriber, latency, memory and start-up.

Run from the repo root::

    .venv/bin/python -m bench.node_throughput                       # print the figures
    .venv/bin/python -m bench.node_throughput --write docs/benchmarks.md

One run, one fresh Mosquitto (the project's tuning, loopback), one edge node run as users run
it (``.venv/bin/edgewise node`` configured by ``EDGEWISE_*`` variables), and plain paho 2.x
publishers and consumers, each in its own process (see :mod:`bench.workers`):

1. start-up: Popen to the node's retained ``online`` status, and to the first result for a
   frame published then (fresh node id); and with a persistent session already holding a frame
   published right at Popen (a restart);
2. throughput: floods of N QoS 1 frames, alternating a bare paho subscriber (receive only) and
   the node (results counted by a subscriber to ``edge/{node}/results``), rates measured from
   the first to the last item received, median of the repetitions;
3. latency: a steady rate for a few seconds, publish (``ts``) to receipt, for the bare
   subscriber and for the node's results (``frame_ts``);
4. memory: the node's RSS once it has taken ``--memory-frames`` frames in all;
5. memory without a backlog: a fresh node's RSS (and latency) after ``--steady-frames`` frames
   at a steady ``--steady-rate``;
6. the look-up every frame pays (is it answered already? docs/adr/0076-intake-bounds.md),
   in-process on this machine: the in-memory filter for a new frame, the outbox query for a
   batch of "maybe"s, and the rebuild of the filter at start, with ``--lookup-keys`` answered
   keys (``storage.answered_keep``).

Before all that it checks whether the broker honours a subscriber's Receive Maximum
(:mod:`bench.broker_quota`), on which the node's memory under a flood depends.

The bare subscriber's frames go to ``baseline/{device}/digits``, which the node (subscribed to
``sensors/+/+``) does not match, so one node process serves every phase. This is a benchmark,
not a test: it asserts nothing about time and exits 0 when every phase completed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.context import SpawnContext
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import paho.mqtt.client as mqtt
import psutil
from rich.console import Console
from rich.table import Table

from bench.broker_quota import max_unacked
from bench.workers import (
    ConsumeReport,
    ConsumeSpec,
    FloodSpec,
    PacedSpec,
    PublishReport,
    connect,
    consume,
    publish_flood,
    publish_paced,
    subscribe,
)
from edge_node.answered import AnsweredFilter
from edgewise.cli.frames import load_holdout
from edgewise.local_broker import MosquittoProcess, mosquitto_path
from edgewise.outbox import Outbox, OutboxConfig, Record
from schemas import ContractError, Frame, decode_results, decode_status, encode_frame

MARKER = "<!-- bench:node_throughput:{label}:{end} -->"
MB = 1024 * 1024

console = Console()


def log(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}", highlight=False)


# ---------------------------------------------------------------------------- figures
@dataclass(slots=True)
class Flood:
    kind: Literal["baseline", "node"]
    rep: int
    frames: int
    received: int
    rate: float
    """items/s from the first to the last received at the consumer"""
    publish_rate: float
    """PUBACKed frames/s at the publisher, first publish to last PUBACK"""
    span_s: float
    """first publish to last item received"""
    messages: int
    duplicates: int
    cpu: dict[str, float]
    """CPU % of each process over the run (100 % = one core)"""
    machine_cpu: float
    """whole machine busy %, 100 % = every core"""


@dataclass(slots=True)
class Latency:
    kind: Literal["baseline", "node", "relay"]
    rate_hz: float
    sent: int
    received: int
    p50: float
    p95: float
    p99: float
    max: float
    mean: float
    publisher_max_lag_ms: float
    messages: int
    node_p50: float | None = None
    """node: its own latency_ms (frame received to result built), p50 and p99"""
    node_p99: float | None = None


def latency_of(
    kind: Literal["baseline", "node", "relay"],
    rate: float,
    creps: list[ConsumeReport],
    preps: list[PublishReport],
) -> Latency:
    """Latency figures of one or more paced runs (their samples pooled)."""
    lat = np.asarray([x for c in creps for x in c.latencies_ms], dtype=np.float64)
    if lat.size == 0:
        raise RuntimeError(f"{kind} latency run received nothing")
    p50, p95, p99 = (float(x) for x in np.percentile(lat, [50, 95, 99]))
    node_p50 = node_p99 = None
    inner = np.asarray([x for c in creps for x in c.node_ms], dtype=np.float64)
    if inner.size:
        node_p50, node_p99 = (float(x) for x in np.percentile(inner, [50, 99]))
    return Latency(
        kind=kind,
        rate_hz=rate,
        sent=sum(p.sent for p in preps),
        received=sum(c.received for c in creps),
        p50=p50,
        p95=p95,
        p99=p99,
        max=float(lat.max()),
        mean=float(lat.mean()),
        publisher_max_lag_ms=max(p.max_lag_ms for p in preps),
        messages=sum(c.messages for c in creps),
        node_p50=node_p50,
        node_p99=node_p99,
    )


@dataclass(slots=True)
class Startup:
    mode: Literal["fresh", "restart"]
    to_online_s: float
    to_result_s: float
    first_result_latency_ms: float

    def describe(self) -> str:
        return f"online {self.to_online_s:.3f} s, first result {self.to_result_s:.3f} s"


@dataclass(slots=True)
class RunInfo:
    """What every benchmark's figures start with: how it was run, where, and how busy."""

    command: str
    date: str
    machine: dict[str, str]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    busy_before: float = 0.0
    """machine busy % (100 = every core) over 1 s just before the run: others' work"""
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Figures(RunInfo):
    startups: list[Startup] = field(default_factory=list)
    floods: list[Flood] = field(default_factory=list)
    latencies: list[Latency] = field(default_factory=list)
    rss_mb: list[tuple[str, int, float]] = field(default_factory=list)
    """(after what, frames taken so far, RSS MB)"""
    peak_rss_mb: float = 0.0
    memory_frames: int = 0
    node_exit: str = ""
    node_log_issues: list[str] = field(default_factory=list)
    steady: Latency | None = None
    """node latency at --steady-rate on a fresh node (the memory check without a backlog)"""
    steady_frames: int = 0
    steady_rss_start_mb: float = 0.0
    steady_rss_mb: float = 0.0
    steady_peak_mb: float = 0.0
    broker_max_unacked: int = 0
    """bench.broker_quota: most messages a Receive Maximum 10 subscriber held (10 = honoured)"""
    lookup: dict[str, float] = field(default_factory=dict)
    """the per-frame look-up's cost (see lookup_cost); empty when skipped"""
    elapsed_s: float = 0.0

    # -- summaries ---------------------------------------------------------------------
    def median_rate(self, kind: str) -> float:
        rates = [f.rate for f in self.floods if f.kind == kind]
        return statistics.median(rates) if rates else 0.0

    @property
    def ratio(self) -> float:
        base = self.median_rate("baseline")
        return self.median_rate("node") / base if base else 0.0

    def latency(self, kind: str) -> Latency | None:
        return next((lat for lat in self.latencies if lat.kind == kind), None)

    def startup_median(self, mode: str, what: Literal["online", "result"]) -> float:
        xs = [
            s.to_online_s if what == "online" else s.to_result_s
            for s in self.startups
            if s.mode == mode
        ]
        return statistics.median(xs) if xs else float("nan")

    def startup_max(self, mode: str, what: Literal["online", "result"]) -> float:
        xs = [
            s.to_online_s if what == "online" else s.to_result_s
            for s in self.startups
            if s.mode == mode
        ]
        return max(xs) if xs else float("nan")

    @property
    def final_rss_mb(self) -> float:
        return self.rss_mb[-1][2] if self.rss_mb else float("nan")


# ---------------------------------------------------------------------------- machine
def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            model = m.group(1).strip()
    mosq = "?"
    binary = mosquitto_path()
    if binary:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5)
            m2 = re.search(r"mosquitto version (\S+)", out.stdout + out.stderr)
            mosq = m2.group(1) if m2 else "?"

    def ver(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    code = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        repo = Path(__file__).resolve().parent.parent
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=repo,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=repo,
        ).stdout.strip()
        code = f"{head} (with uncommitted changes)" if dirty else head

    return {
        "code": code or "?",
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "paho-mqtt": ver("paho-mqtt"),
        "onnxruntime": ver("onnxruntime"),
        "msgspec": ver("msgspec"),
        "numpy": ver("numpy"),
        "mosquitto": mosq,
    }


# ---------------------------------------------------------------------------- the node
class NodeProcess:
    """``edgewise node`` as a subprocess, configured only through EDGEWISE_* variables."""

    def __init__(
        self, node_id: str, host: str, port: int, workdir: Path, extra_env: dict[str, str]
    ) -> None:
        self.node_id = node_id
        self.log_path = workdir / f"node-{node_id}.log"
        exe = Path(sys.executable).with_name("edgewise")
        found = str(exe) if exe.exists() else shutil.which("edgewise")
        if found is None:
            raise SystemExit("edgewise command not found next to this Python nor on PATH")
        self.argv = [found, "node"]
        keep = ("EDGEWISE_PAHO_FAST",)  # not node config: edgewise/mqtt/paho_guard.py
        env = {k: v for k, v in os.environ.items() if k in keep or not k.startswith("EDGEWISE_")}
        env.update(
            EDGEWISE_NODE_ID=node_id,
            EDGEWISE_MQTT__HOST=host,
            EDGEWISE_MQTT__PORT=str(port),
            EDGEWISE_STORAGE__STATE_DIR=str(workdir / "state"),
            **extra_env,
        )
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None
        self.ps: psutil.Process | None = None
        self.started = 0.0

    def start(self) -> float:
        with self.log_path.open("ab") as log_file:
            self.started = time.monotonic()
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.ps = psutil.Process(self.popen.pid)
        return self.started

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def rss_mb(self) -> float:
        assert self.ps is not None
        return float(self.ps.memory_info().rss) / MB

    def peak_rss_mb(self) -> float:
        with contextlib.suppress(OSError):
            m = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{self.pid}/status").read_text(), re.M)
            if m:
                return int(m.group(1)) / 1024
        return float("nan")

    def stop(self, timeout_s: float = 20.0) -> str:
        """SIGTERM (the node drains), wait; SIGKILL if it hangs. Says what happened."""
        p = self.popen
        if p is None or p.poll() is not None:
            return f"already exited ({None if p is None else p.returncode})"
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            return f"did not exit within {timeout_s:.0f} s of SIGTERM: killed"
        return f"exit status {rc}, {time.monotonic() - t0:.2f} s after SIGTERM"

    def log_issues(self) -> list[str]:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        keep = ("WARNING", "ERROR", "Traceback", "CRITICAL")
        return [ln.rstrip() for ln in text.splitlines() if any(k in ln for k in keep)]


def forget_session(host: str, port: int, node_id: str) -> None:
    """End the node's persistent session on the broker (clean start, expiry 0).

    Otherwise the broker would keep queueing every sensor frame for a node that is gone.
    """
    client, _ = connect(host, port, f"edgewise-node-{node_id}", clean_start=True)
    client.disconnect()
    client.loop(0.05)


def precreate_session(host: str, port: int, node_id: str) -> None:
    """Leave a persistent session for the node, subscribed like the node subscribes."""
    client, _ = connect(
        host, port, f"edgewise-node-{node_id}", clean_start=True, session_expiry_s=3600
    )
    subscribe(client, "sensors/+/+")
    client.disconnect()
    client.loop(0.05)


class Observer:
    """A paho client (network thread) watching one node's status and results."""

    def __init__(self, host: str, port: int, node_id: str) -> None:
        self.node_id = node_id
        self.online = threading.Event()
        self.result = threading.Event()
        self.online_at = 0.0
        self.result_at = 0.0
        self.result_latency_ms = float("nan")
        self.image = load_holdout().images[0]
        self.client, _ = connect(host, port, f"bench-observer-{node_id}")
        self.client.on_message = self._on_message
        subscribe(self.client, f"edge/{node_id}/#")
        self.client.loop_start()

    def _on_message(self, c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        wall = time.time()
        try:
            if msg.topic.endswith("/status"):
                if (
                    decode_status(cast(bytes, msg.payload)).state == "online"
                    and not self.online.is_set()
                ):
                    self.online_at = now
                    self.online.set()
            elif msg.topic.endswith("/results") and not self.result.is_set():
                batch = decode_results(cast(bytes, msg.payload))
                ts = batch.results[0].frame_ts
                self.result_at = now
                self.result_latency_ms = (wall - ts) * 1000 if ts else float("nan")
                self.result.set()
        except ContractError:
            pass

    def send_frame(self, seq: int = 0) -> None:
        payload = encode_frame(Frame(seq=seq, ts=time.time(), tensor=self.image))
        self.client.publish("sensors/bench-start/digits", payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---------------------------------------------------------------------------- the run
class Bench:
    def __init__(self, args: argparse.Namespace, broker: MosquittoProcess, workdir: Path) -> None:
        self.args = args
        self.broker = broker
        self.host = broker.info.host
        self.port = broker.info.port
        self.workdir = workdir
        self.mp: SpawnContext = mp.get_context("spawn")
        self.extra_env: dict[str, str] = {}
        if args.max_batch_size is not None:
            self.extra_env["EDGEWISE_BATCHING__MAX_BATCH_SIZE"] = str(args.max_batch_size)
        if args.max_wait_ms is not None:
            self.extra_env["EDGEWISE_BATCHING__MAX_WAIT_MS"] = str(args.max_wait_ms)
        if args.synchronous is not None:
            self.extra_env["EDGEWISE_STORAGE__SYNCHRONOUS"] = args.synchronous
        self.node: NodeProcess | None = None
        self.node_id = f"bench-{os.getpid()}"
        self.relay_id = f"relay-{os.getpid()}"
        """the bare relay's results topic level (bench.relay, started by bench.mobilenet)"""
        self.frames_to_node = 0
        self._clients = 0
        self.frame_shape: tuple[int, ...] | None = None
        """latency runs: random uint8 frames of this shape instead of digits (bench.mobilenet)"""

    def _client_id(self, what: str) -> str:
        self._clients += 1
        return f"bench-{what}-{os.getpid()}-{self._clients}"

    # -- start-up ----------------------------------------------------------------------
    def startup(self, mode: Literal["fresh", "restart"], node_id: str, keep: bool) -> Startup:
        if mode == "restart":
            precreate_session(self.host, self.port, node_id)
        obs = Observer(self.host, self.port, node_id)
        node = NodeProcess(node_id, self.host, self.port, self.workdir, self.extra_env)
        ok = False
        try:
            t0 = node.start()
            if mode == "restart":
                obs.send_frame()  # right away: the broker holds it in the node's session
            if not obs.online.wait(30):
                raise RuntimeError(f"node {node_id} not online after 30 s; see {node.log_path}")
            if mode == "fresh":
                obs.send_frame()
            if not obs.result.wait(30):
                raise RuntimeError(f"no result from node {node_id}; see {node.log_path}")
            s = Startup(mode, obs.online_at - t0, obs.result_at - t0, obs.result_latency_ms)
            ok = True
        finally:
            obs.close()
            if not (keep and ok):
                node.stop()
                forget_session(self.host, self.port, node_id)
        if keep:
            self.node = node
            self.frames_to_node += 1
        return s

    # -- processes ---------------------------------------------------------------------
    def _cpu(self, procs: dict[str, psutil.Process]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, p in procs.items():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                out[name] = t.user + t.system
        return out

    def _run(
        self,
        cspec: ConsumeSpec,
        publisher: Any,
        pspec: FloodSpec | PacedSpec,
        timeout_s: float,
    ) -> tuple[ConsumeReport, PublishReport, dict[str, float], float, float]:
        ctx = self.mp
        c_ready, p_ready, go = ctx.Event(), ctx.Event(), ctx.Event()
        c_out: Any = ctx.Queue()
        p_out: Any = ctx.Queue()
        pc = ctx.Process(target=consume, args=(cspec, c_ready, c_out), daemon=True)
        pp = ctx.Process(target=publisher, args=(pspec, p_ready, go, p_out), daemon=True)
        pc.start()
        pp.start()
        try:
            self._wait_ready([(c_ready, pc, c_out), (p_ready, pp, p_out)])
            procs = {"broker": psutil.Process(self.broker.pid)}
            if self.node is not None:
                procs["node"] = psutil.Process(self.node.pid)
            assert pc.pid is not None and pp.pid is not None
            procs["publisher"] = psutil.Process(pp.pid)
            procs["consumer"] = psutil.Process(pc.pid)
            cpu0 = self._cpu(procs)
            psutil.cpu_percent(None)
            t_go = time.monotonic()
            go.set()
            crep: ConsumeReport = c_out.get(timeout=timeout_s)
            wall = time.monotonic() - t_go
            cpu1 = self._cpu(procs)
            machine = psutil.cpu_percent(None)
            prep: PublishReport = p_out.get(timeout=30)
        finally:
            for p in (pc, pp):
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()
        for rep in (crep, prep):
            if rep.error:
                raise RuntimeError(rep.error)
        cpu = {k: 100 * (cpu1[k] - cpu0[k]) / wall for k in cpu1 if k in cpu0}
        return crep, prep, cpu, machine, wall

    @staticmethod
    def _wait_ready(workers: list[tuple[Any, Any, Any]], timeout_s: float = 30.0) -> None:
        """Wait for every worker's ready event; fail at once if one reports or dies first."""
        deadline = time.monotonic() + timeout_s
        for ready, proc, out in workers:
            while not ready.wait(0.1):
                if not out.empty():
                    raise RuntimeError(f"worker failed to start:\n{out.get().error}")
                if not proc.is_alive():
                    raise RuntimeError(f"worker exited with {proc.exitcode} before ready")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker not ready after {timeout_s:.0f} s")

    def _specs(
        self, kind: Literal["baseline", "node", "relay"], device: str, expect: int, latency: bool
    ) -> tuple[str, ConsumeSpec]:
        if kind == "baseline":
            topic = f"baseline/{device}/digits"
            cspec = ConsumeSpec(
                self.host,
                self.port,
                topic,
                self._client_id("sub"),
                "frames",
                expect,
                latency=latency,
            )
        else:
            # The node's results, or a bare relay's (bench.relay) in the same format.
            topic = f"{'sensors' if kind == 'node' else 'relay'}/{device}/digits"
            results_of = self.node_id if kind == "node" else self.relay_id
            cspec = ConsumeSpec(
                self.host,
                self.port,
                f"edge/{results_of}/results",
                self._client_id("results"),
                "results",
                expect,
                device=device,
                latency=latency,
            )
        return topic, cspec

    # -- throughput --------------------------------------------------------------------
    def flood(self, kind: Literal["baseline", "node"], rep: int, count: int) -> Flood:
        device = f"bench-{kind[0]}{rep}-{os.getpid()}"
        topic, cspec = self._specs(kind, device, count, latency=False)
        pspec = FloodSpec(
            self.host, self.port, topic, count, self._client_id("pub"), window=self.args.window
        )
        crep, prep, cpu, machine, _ = self._run(cspec, publish_flood, pspec, timeout_s=180)
        if kind == "node":
            self.frames_to_node += prep.acked
        if crep.received < count:
            log(f"[red]{kind} flood {rep}: only {crep.received} of {count} received[/]")
        return Flood(
            kind=kind,
            rep=rep,
            frames=count,
            received=crep.received,
            rate=crep.rate,
            publish_rate=prep.rate,
            span_s=crep.last - prep.started,
            messages=crep.messages,
            duplicates=crep.duplicates,
            cpu=cpu,
            machine_cpu=machine,
        )

    # -- latency -----------------------------------------------------------------------
    def paced(
        self,
        kind: Literal["baseline", "node", "relay"],
        rate: float,
        secs: float,
        tag: str = "lat",
    ) -> tuple[ConsumeReport, PublishReport]:
        """Frames at a steady rate to the bare subscriber or the node; the raw reports."""
        expect = round(rate * secs)
        device = f"bench-{tag}-{kind[0]}-{os.getpid()}"
        topic, cspec = self._specs(kind, device, expect, latency=True)
        cspec = dataclasses.replace(cspec, deadline_s=secs + 50)
        pspec = PacedSpec(
            self.host,
            self.port,
            topic,
            rate,
            secs,
            self._client_id("pub"),
            frame_shape=self.frame_shape,
        )
        crep, prep, _, _, _ = self._run(cspec, publish_paced, pspec, timeout_s=secs + 60)
        if kind == "node":
            self.frames_to_node += prep.acked
        return crep, prep

    def latency(
        self, kind: Literal["baseline", "node"], rate: float, secs: float, tag: str = "lat"
    ) -> Latency:
        crep, prep = self.paced(kind, rate, secs, tag)
        return latency_of(kind, rate, [crep], [prep])

    # -- memory ------------------------------------------------------------------------
    def record_rss(self, figures: Figures, after: str) -> None:
        assert self.node is not None
        figures.rss_mb.append((after, self.frames_to_node, round(self.node.rss_mb(), 1)))


# ---------------------------------------------------------------------------- look-up cost
def _keys(n: int, start: int = 0, device: str = "cam") -> list[str]:
    """Frame keys as the node makes them (edge_node.intake.frame_key): topic, seq, ts, digest."""
    return [
        f"sensors/{device}-{i % 50}/digits\x00{i}\x00{1766400000.0 + i / 1000!r}"
        f"\x00{i * 2654435761 % 2**64:016x}"
        for i in range(start, start + n)
    ]


def lookup_cost(keep: int, workdir: Path, batch: int = 64) -> dict[str, float]:
    """What the node's "answered already?" look-up costs here, with ``keep`` keys remembered:
    ns per new frame in the filter (fresh key strings: the hash is paid too), share of new
    frames the filter calls "maybe" (each then asked of the outbox), ns per key added, µs per
    outbox query for a batch of ``batch`` keys, ms to rebuild the filter at start."""
    remembered = _keys(keep)
    f = AnsweredFilter(keep)
    t0 = time.perf_counter()
    for k in remembered:
        f.add(k)
    add_ns = (time.perf_counter() - t0) / keep * 1e9
    fresh = _keys(200_000, start=10 * keep, device="new")
    t0 = time.perf_counter()
    maybes = sum(1 for k in fresh if k in f)
    in_ns = (time.perf_counter() - t0) / len(fresh) * 1e9
    config = OutboxConfig(path=workdir / "lookup.outbox.db", max_bytes=256 * MB, answered_keep=keep)
    with Outbox.open(config) as outbox:
        for i in range(0, keep, 1024):
            pairs = [(k, f"id-{j}") for j, k in enumerate(remembered[i : i + 1024], i)]
            outbox.append([Record("result", "edge/bench/results", b"x" * 64)], pairs)
        rounds = 200
        asked = [remembered[(i * 7919) % keep : (i * 7919) % keep + batch] for i in range(rounds)]
        t0 = time.perf_counter()
        for keys in asked:
            outbox.answered_many(keys)
        query_us = (time.perf_counter() - t0) / rounds * 1e6
        t0 = time.perf_counter()
        rebuilt = AnsweredFilter(keep)
        for k in outbox.answered_keys():
            rebuilt.add(k)
        rebuild_ms = (time.perf_counter() - t0) * 1e3
    return {
        "keep": float(keep),
        "filter_bytes": float(f.nbytes),
        "in_ns": in_ns,
        "maybe_share": maybes / len(fresh),
        "add_ns": add_ns,
        "batch": float(batch),
        "query_us": query_us,
        "rebuild_ms": rebuild_ms,
    }


# ---------------------------------------------------------------------------- main flow
def run(args: argparse.Namespace, command: str) -> Figures:
    t_start = time.monotonic()
    load0 = os.getloadavg()
    figures = Figures(
        command=command,
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine_info(),
        load_before=(round(load0[0], 2), round(load0[1], 2), round(load0[2], 2)),
        config={
            "flood_frames": args.frames,
            "reps": args.reps,
            "window": args.window,
            "rate_hz": args.rate,
            "latency_s": args.latency_s,
            "memory_frames": args.memory_frames,
            "steady_rate": args.steady_rate,
            "steady_frames": args.steady_frames,
            "max_batch_size": args.max_batch_size or "default (64)",
            "max_wait_ms": args.max_wait_ms if args.max_wait_ms is not None else "default (0.0)",
            "synchronous": args.synchronous or "default (FULL)",
            "lookup_keys": args.lookup_keys,
        },
    )
    figures.busy_before = psutil.cpu_percent(interval=1.0)
    if figures.busy_before > 10 or load0[0] > 1.0:
        log(
            f"[yellow]the machine is busy ({figures.busy_before:.0f}% CPU, load {load0[0]:.2f})"
            f": other work will disturb the figures[/]"
        )
    workdir = Path(tempfile.mkdtemp(prefix="edgewise-bench-"))
    if args.lookup_keys > 0:  # 6. first, while nothing else of the benchmark runs
        figures.lookup = lookup_cost(args.lookup_keys, workdir)
        lk = figures.lookup
        log(
            f"look-up with {args.lookup_keys:,} keys: filter {lk['in_ns']:.0f} ns per new frame"
            f" ({lk['maybe_share']:.2%} maybe), outbox {lk['query_us']:.0f} µs per batch of"
            f" {lk['batch']:.0f}, rebuild {lk['rebuild_ms']:.0f} ms"
        )
    broker = MosquittoProcess(workdir / "broker")
    broker.start()
    log(f"Mosquitto on {broker.info.url} (pid {broker.pid}); workdir {workdir}")
    bench = Bench(args, broker, workdir)
    try:
        figures.broker_max_unacked = max_unacked(bench.host, bench.port)
        log(
            f"broker Receive Maximum check: a subscriber declaring 10 held up to "
            f"{figures.broker_max_unacked} unacknowledged"
        )
        # 1. start-up
        for i in range(args.startup_samples):
            s = bench.startup("fresh", f"{bench.node_id}-s{i}", keep=False)
            figures.startups.append(s)
            log(f"start-up (fresh) {i + 1}: {s.describe()}")
        for i in range(args.restart_samples):
            s = bench.startup("restart", f"{bench.node_id}-r{i}", keep=False)
            figures.startups.append(s)
            log(f"start-up (restart) {i + 1}: {s.describe()}")
        s = bench.startup("fresh", bench.node_id, keep=True)
        figures.startups.append(s)
        assert bench.node is not None
        log(
            f"node {bench.node_id} (pid {bench.node.pid}): online {s.to_online_s:.3f} s, "
            f"result {s.to_result_s:.3f} s"
        )
        time.sleep(0.5)
        bench.record_rss(figures, "start-up")

        # 2. throughput, baseline and node alternating on the same broker
        kinds: tuple[Literal["baseline", "node"], ...] = ("baseline", "node")
        for rep in range(1, args.reps + 1):
            for kind in kinds:
                f = bench.flood(kind, rep, args.frames)
                figures.floods.append(f)
                if kind == "node":
                    bench.record_rss(figures, f"node flood {rep}")
                cpu = ", ".join(f"{k} {v:.0f}%" for k, v in f.cpu.items())
                log(
                    f"{kind:8s} flood {rep}: {f.rate:,.0f}/s ({f.received}/{f.frames}; "
                    f"publisher {f.publish_rate:,.0f}/s; {cpu}; machine {f.machine_cpu:.0f}%)"
                )

        # 3. latency at a steady rate
        for kind in kinds:
            lat = bench.latency(kind, args.rate, args.latency_s)
            figures.latencies.append(lat)
            inner = "" if lat.node_p50 is None else f"; inside the node p50 {lat.node_p50:.2f}"
            log(
                f"{kind:8s} latency @ {lat.rate_hz:.0f}/s: p50 {lat.p50:.2f} p95 {lat.p95:.2f} "
                f"p99 {lat.p99:.2f} max {lat.max:.2f} ms ({lat.received}/{lat.sent}{inner})"
            )
        bench.record_rss(figures, "latency run")

        # 4. memory: top up to --memory-frames through the node
        remaining = args.memory_frames - bench.frames_to_node
        if remaining > 0:
            bench.flood("node", 0, remaining)
            bench.record_rss(figures, "top-up flood")
        time.sleep(1.0)
        bench.record_rss(figures, "1 s idle")
        figures.memory_frames = bench.frames_to_node
        figures.peak_rss_mb = round(bench.node.peak_rss_mb(), 1)
        log(
            f"node RSS {figures.final_rss_mb:.1f} MB after {bench.frames_to_node:,} frames "
            f"(peak {figures.peak_rss_mb:.1f} MB)"
        )
        figures.node_exit = bench.node.stop()
        figures.node_log_issues = bench.node.log_issues()
        forget_session(bench.host, bench.port, bench.node_id)
        bench.node = None

        # 5. memory (and latency) at a steady rate, on a fresh node: no backlog
        if args.steady_rate > 0 and args.steady_frames > 0:
            bench.node_id = f"{bench.node_id}-steady"
            bench.startup("fresh", bench.node_id, keep=True)
            node = bench.node
            assert node is not None
            time.sleep(0.5)
            figures.steady_rss_start_mb = round(node.rss_mb(), 1)
            secs = args.steady_frames / args.steady_rate
            figures.steady = bench.latency("node", args.steady_rate, secs, tag="steady")
            figures.steady_rss_mb = round(node.rss_mb(), 1)
            figures.steady_peak_mb = round(node.peak_rss_mb(), 1)
            figures.steady_frames = bench.frames_to_node - figures.memory_frames
            log(
                f"steady {args.steady_rate:,.0f}/s: node RSS {figures.steady_rss_mb:.1f} MB after"
                f" {figures.steady_frames:,} frames (peak {figures.steady_peak_mb:.1f} MB);"
                f" latency p50 {figures.steady.p50:.2f} p99 {figures.steady.p99:.2f} ms"
            )
            exit_note = node.stop()
            issues = node.log_issues()
            figures.node_exit += f"; steady node: {exit_note}"
            figures.node_log_issues += issues
            bench.node = None
    finally:
        if bench.node is not None:  # a phase failed
            figures.node_exit = bench.node.stop()
            figures.node_log_issues = bench.node.log_issues()
        broker.stop()
        if args.keep_workdir:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    load1 = os.getloadavg()
    figures.load_after = (round(load1[0], 2), round(load1[1], 2), round(load1[2], 2))
    figures.elapsed_s = round(time.monotonic() - t_start, 1)
    return figures


# ---------------------------------------------------------------------------- reporting
def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def summary_rows(f: Figures) -> list[tuple[str, str, str, str, str]]:
    """(figure, target, measured, baseline, verdict) rows of the main table."""
    rows: list[tuple[str, str, str, str, str]] = []
    base, node = f.median_rate("baseline"), f.median_rate("node")
    rows.append(
        (
            "throughput ratio (node / bare subscriber)",
            ">= 0.80",
            f"{f.ratio:.2f} ({node:,.0f} frames/s)",
            f"{base:,.0f} frames/s",
            _verdict(f.ratio >= 0.8),
        )
    )
    nl, bl = f.latency("node"), f.latency("baseline")
    if nl is not None:
        bp50 = f"{bl.p50:.2f} ms" if bl else "-"
        bp99 = f"{bl.p99:.2f} ms" if bl else "-"
        rate = f"{nl.rate_hz:,.0f}/s"
        rows.append(
            (f"latency p50 @ {rate}", "<= 1 ms", f"{nl.p50:.2f} ms", bp50, _verdict(nl.p50 <= 1))
        )
        rows.append(
            (
                f"latency p95 @ {rate}",
                "-",
                f"{nl.p95:.2f} ms",
                f"{bl.p95:.2f} ms" if bl else "-",
                "",
            )
        )
        rows.append(
            (f"latency p99 @ {rate}", "<= 5 ms", f"{nl.p99:.2f} ms", bp99, _verdict(nl.p99 <= 5))
        )
        rows.append(
            (
                f"latency max @ {rate}",
                "-",
                f"{nl.max:.2f} ms",
                f"{bl.max:.2f} ms" if bl else "-",
                "",
            )
        )
    rows.append(
        (
            f"node RSS after {f.memory_frames:,} frames",
            "<= 150 MB",
            f"{f.final_rss_mb:.1f} MB (peak {f.peak_rss_mb:.1f} MB)",
            "-",
            _verdict(f.final_rss_mb <= 150),
        )
    )
    if f.steady is not None:
        rows.append(
            (
                f"node RSS after {f.steady_frames:,} frames at a steady "
                f"{f.steady.rate_hz:,.0f}/s (fresh node)",
                "<= 150 MB",
                f"{f.steady_rss_mb:.1f} MB (peak {f.steady_peak_mb:.1f} MB)",
                "-",
                _verdict(f.steady_rss_mb <= 150),
            )
        )
    on = f.startup_median("fresh", "online")
    res = f.startup_median("fresh", "result")
    n_fresh = sum(1 for s in f.startups if s.mode == "fresh")
    rows.append(
        (
            f"start-up: Popen to online (median of {n_fresh})",
            "-",
            f"{on:.2f} s (max {f.startup_max('fresh', 'online'):.2f} s)",
            "-",
            "",
        )
    )
    rows.append(
        (
            f"start-up: Popen to first result (median of {n_fresh})",
            "<= 2 s",
            f"{res:.2f} s (max {f.startup_max('fresh', 'result'):.2f} s)",
            "-",
            _verdict(res <= 2),
        )
    )
    n_restart = sum(1 for s in f.startups if s.mode == "restart")
    if n_restart:
        rr = f.startup_median("restart", "result")
        rows.append(
            (
                f"restart with queued frame: Popen to result (median of {n_restart})",
                "<= 2 s",
                f"{rr:.2f} s (max {f.startup_max('restart', 'result'):.2f} s)",
                "-",
                _verdict(rr <= 2),
            )
        )
    return rows


def print_report(f: Figures) -> None:
    t = Table(title="edgewise node benchmark", title_justify="left")
    for col in ("figure", "target", "measured", "bare paho baseline", ""):
        t.add_column(col, justify="right" if col in ("measured", "bare paho baseline") else "left")
    for row in summary_rows(f):
        t.add_row(*(c.replace("**", "") for c in row))
    console.print(t)

    ft = Table(title="throughput floods (QoS 1, rates first to last item received)")
    for col in ("case", "rep", "received", "items/s", "publisher/s", "msgs", "CPU % by process"):
        ft.add_column(col)
    for fl in f.floods:
        ft.add_row(
            fl.kind,
            str(fl.rep),
            f"{fl.received:,}/{fl.frames:,}",
            f"{fl.rate:,.0f}",
            f"{fl.publish_rate:,.0f}",
            f"{fl.messages:,}",
            ", ".join(f"{k} {v:.0f}" for k, v in fl.cpu.items())
            + f" (machine {fl.machine_cpu:.0f})",
        )
    console.print(ft)
    console.print(
        f"machine: {f.machine}\nload average before {f.load_before}, after {f.load_after}; "
        f"node: {f.node_exit}; {len(f.node_log_issues)} warning/error lines in its log; "
        f"broker Receive Maximum 10 -> up to {f.broker_max_unacked} unacked; "
        f"run took {f.elapsed_s:.0f} s"
    )
    for line in f.node_log_issues[:10]:
        console.print(f"  node log: {line}", highlight=False, markup=False)


def markdown(f: Figures) -> str:
    out: list[str] = []
    out.append(f"Measured {f.date}, in {f.elapsed_s:.0f} s, with:\n")
    out.append(f"```sh\n{f.command}\n```\n")
    m = f.machine
    out.append(
        f"Code: commit {m['code']}. "
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, {m['os']}; "
        f"Python {m['python']}, paho-mqtt {m['paho-mqtt']}, onnxruntime {m['onnxruntime']}, "
        f"msgspec {m['msgspec']}, numpy {m['numpy']}, Mosquitto {m['mosquitto']}. "
        f"Load average (1/5/15 min) {'/'.join(map(str, f.load_before))} before the run "
        f"(machine {f.busy_before:.0f}% busy in the second before it), "
        f"{'/'.join(map(str, f.load_after))} after.\n"
    )
    c = f.config
    out.append(
        f"Settings: floods of {c['flood_frames']:,} frames x {c['reps']} per case "
        f"(publisher window {c['window']} QoS 1 messages in flight); latency at "
        f"{c['rate_hz']:,.0f} frames/s for {c['latency_s']} s; node batching "
        f"max_batch_size {c['max_batch_size']}, max_wait_ms {c['max_wait_ms']}; outbox"
        f" synchronous {c['synchronous']}; memory after "
        f"{c['memory_frames']:,} frames on the node of the floods, and after "
        f"{c['steady_frames']:,} frames at a steady {c['steady_rate']:,.0f}/s on a fresh node.\n"
    )
    out.append("| figure | target | measured | bare paho baseline | |")
    out.append("|---|---|--:|--:|---|")
    for row in summary_rows(f):
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out.append("Throughput floods, in run order (items/s from the first to the last received):\n")
    out.append(
        "| case | rep | received | items/s | publisher frames/s | messages | "
        "CPU % (100 = one core) | machine busy % |"
    )
    out.append("|---|--:|--:|--:|--:|--:|---|--:|")
    for fl in f.floods:
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in fl.cpu.items())
        out.append(
            f"| {fl.kind} | {fl.rep} | {fl.received:,}/{fl.frames:,} | {fl.rate:,.0f} | "
            f"{fl.publish_rate:,.0f} | {fl.messages:,} | {cpu} | {fl.machine_cpu:.0f} |"
        )
    out.append("")
    out.append(
        "Latency, publish (`ts`) to receipt, ms:\n\n"
        "| case | rate | received | messages | p50 | p95 | p99 | max | mean | "
        "inside the node p50 / p99 | publisher worst lag |\n"
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    )
    for lat in f.latencies + ([f.steady] if f.steady else []):
        inner = "-"
        if lat.node_p50 is not None and lat.node_p99 is not None:
            inner = f"{lat.node_p50:.2f} / {lat.node_p99:.2f}"
        out.append(
            f"| {lat.kind} | {lat.rate_hz:,.0f}/s | {lat.received:,}/{lat.sent:,} | "
            f"{lat.messages:,} | {lat.p50:.2f} | {lat.p95:.2f} | {lat.p99:.2f} | {lat.max:.2f} | "
            f"{lat.mean:.2f} | {inner} | {lat.publisher_max_lag_ms:.2f} |"
        )
    out.append("")
    out.append("Start-up samples (s from Popen):\n")
    out.append("| mode | to online | to first result | that result's latency (ms) |")
    out.append("|---|--:|--:|--:|")
    for s in f.startups:
        out.append(
            f"| {s.mode} | {s.to_online_s:.3f} | {s.to_result_s:.3f} | "
            f"{s.first_result_latency_ms:.1f} |"
        )
    out.append("")
    out.append("Node RSS through the run:\n")
    out.append("| after | frames taken | RSS MB |\n|---|--:|--:|")
    for after, frames, rss in f.rss_mb:
        out.append(f"| {after} | {frames:,} | {rss:.1f} |")
    if f.steady is not None:
        out.append(
            f"\nFresh node for the steady run: RSS {f.steady_rss_start_mb:.1f} MB when online, "
            f"{f.steady_rss_mb:.1f} MB after {f.steady_frames:,} frames at "
            f"{f.steady.rate_hz:,.0f}/s (peak {f.steady_peak_mb:.1f} MB)."
        )
    out.append("")
    issues = len(f.node_log_issues)
    out.append(f"Node stop: {f.node_exit}; {issues} warning/error lines in its log.\n")
    if f.lookup:
        lk = f.lookup
        out.append(
            f"The look-up every frame pays (is it answered already?), in-process with"
            f" {lk['keep']:,.0f} answered keys remembered: {lk['in_ns']:.0f} ns per new frame in"
            f" the filter ({lk['filter_bytes'] / MB:.1f} MiB; {lk['maybe_share']:.2%} of new"
            f' frames are a "maybe" and asked of the outbox), {lk["add_ns"]:.0f} ns per key'
            f" added; the outbox answers a batch of {lk['batch']:.0f} keys in"
            f" {lk['query_us']:.0f} µs (on its own thread); rebuilding the filter at start takes"
            f" {lk['rebuild_ms']:.0f} ms.\n"
        )
    honoured = "honours it" if f.broker_max_unacked <= 10 else "does **not** honour it"
    out.append(
        f"Broker flow control (`bench.broker_quota`): a subscriber declaring Receive Maximum 10 "
        f"held up to {f.broker_max_unacked} unacknowledged QoS 1 messages while acking one at "
        f"a time: this Mosquitto {honoured}."
    )
    return "\n".join(out) + "\n"


def write_markdown(path: Path, body: str, label: str, marker: str = MARKER) -> None:
    """Replace the block between this label's markers (or append one)."""
    begin = marker.format(label=label, end="begin")
    end = marker.format(label=label, end="end")
    block = f"{begin}\n{body}{end}"
    if path.exists():
        text = path.read_text()
        if begin in text and end in text:
            head, _, rest = text.partition(begin)
            _, _, tail = rest.partition(end)
            path.write_text(head + block + tail)
            return
        path.write_text(text.rstrip() + "\n\n" + block + "\n")
        return
    path.write_text(f"# Benchmarks\n\n{block}\n")


# ---------------------------------------------------------------------------- cli
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.node_throughput",
        description="Benchmark an edgewise node against a bare paho subscriber.",
    )
    p.add_argument("--frames", type=int, default=30_000, help="frames per flood (default 30000)")
    p.add_argument("--reps", type=int, default=3, help="floods per case (default 3)")
    p.add_argument("--window", type=int, default=1000, help="publisher QoS 1 in-flight window")
    p.add_argument("--rate", type=float, default=1000.0, help="latency run frames/s")
    p.add_argument("--latency-s", type=float, default=10.0, help="latency run seconds")
    p.add_argument("--memory-frames", type=int, default=100_000, help="frames before the RSS")
    p.add_argument(
        "--steady-rate", type=float, default=3000.0, help="steady memory run frames/s (0: skip)"
    )
    p.add_argument("--steady-frames", type=int, default=100_000, help="steady memory run frames")
    p.add_argument("--startup-samples", type=int, default=2, help="extra fresh start-ups")
    p.add_argument("--restart-samples", type=int, default=2, help="start-ups with a queued frame")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="node's EDGEWISE_BATCHING__MAX_BATCH_SIZE (default: the node's own, 64)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=None,
        help="node's EDGEWISE_BATCHING__MAX_WAIT_MS (default: the node's own, 0.0)",
    )
    p.add_argument(
        "--synchronous",
        choices=["OFF", "NORMAL", "FULL", "EXTRA"],
        default=None,
        help="node's EDGEWISE_STORAGE__SYNCHRONOUS (default: the node's own, FULL)",
    )
    p.add_argument(
        "--lookup-keys",
        type=int,
        default=100_000,
        help="answered keys remembered for the look-up cost (default 100000; 0: skip)",
    )
    p.add_argument("--write", type=Path, default=None, help="update this Markdown file")
    p.add_argument("--label", default="default", help="which generated block of --write to replace")
    p.add_argument("--json", type=Path, default=None, help="also dump the raw figures here")
    p.add_argument("--keep-workdir", action="store_true", help="keep broker and node logs")
    return p.parse_args(argv)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if mosquitto_path() is None:
        console.print("[red]mosquitto not found[/] (apt-get install mosquitto)")
        return 2
    shown = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python -m bench.node_throughput", *map(shlex.quote, shown)])
    with _sigterm_as_interrupt():
        figures = run(args, command)
    print_report(figures)
    md = markdown(figures)
    if args.write is not None:
        write_markdown(args.write, md, args.label)
        log(f"wrote the figures into {args.write} (block {args.label!r})")
    else:
        console.print(md, markup=False, highlight=False)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(figures), indent=2) + "\n")
    return 0


__all__ = ["Figures", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
