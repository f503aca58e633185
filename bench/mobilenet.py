"""MobileNetV3-Small on this CPU: bare runtimes, fp32 against int8, and the node end to end.

Run from the repo root, once the models are built (random weights, nothing downloaded)::

    # once: bench/.models/ (TensorFlow in a venv of its own, see that script's docstring)
    /tmp/tf/bin/python scripts/build_mobilenet_models.py
    .venv/bin/python -m bench.mobilenet                            # print the figures
    .venv/bin/python -m bench.mobilenet --write docs/benchmarks.md --label run1

One run, one machine, batch 1, 224x224x3 uint8 frames (150,528 bytes):

1. **Bare runtimes.** Per call latency of ONNX Runtime through the node's own backend
   (``edgewise.serving.runtime.load_runtime``, the session options the node uses) and of LiteRT
   (``ai_edge_litert.interpreter.Interpreter``, called directly: set_tensor, invoke,
   get_tensor; the project has no LiteRT backend on this branch), fp32 and int8, 1 and 2
   threads. The cases take turns in rounds so that load from elsewhere spreads over all of them.
2. **End to end.** A fresh Mosquitto (the project's tuning, loopback) and a real ``edgewise
   node`` process serving the ONNX fp32 model, configured by ``EDGEWISE_*`` variables like
   ``bench.node_throughput``; a paho publisher sends frames at a steady ``--rate``, a paho
   subscriber takes the results, latency from the frame's ``ts`` (publish) to the receipt of
   its result. Against it, in the same run: the bare ONNX Runtime call on the same model with
   the node's thread count (measured before and after the end-to-end phase), and a bare paho
   subscriber taking the same frames (one MQTT hop of a 150 KB frame). The node's overhead is
   e2e p50 - bare p50, also as a share of the bare p50. The bare call is also timed paced at
   ``--rate``, as the node's calls come: one call every 50 ms at 20/s is ~1 ms slower here than
   back-to-back calls (caches go cold, the core idles), and the overhead is given against that
   too.
3. With ``--profile``, one more end-to-end run (not counted) under ``py-spy record``, summed by
   part of the node (:mod:`bench.stacks`).

A benchmark, not a test: it asserts nothing about time and exits 0 when every phase completed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import psutil
from rich.table import Table

from bench.node_throughput import (
    Bench,
    Latency,
    NodeProcess,
    Observer,
    RunInfo,
    console,
    forget_session,
    latency_of,
    log,
    machine_info,
    write_markdown,
)
from bench.relay import RelaySpec, run_relay
from bench.stacks import IDLE, Summary, summarize
from bench.workers import ConsumeReport, PublishReport, random_frames
from edgewise.local_broker import MosquittoProcess, mosquitto_path
from edgewise.serving.runtime import load_runtime

MARKER = "<!-- bench:mobilenet:{label}:{end} -->"
MODELS_DIR = Path(__file__).resolve().parent / ".models"
BUILD_COMMAND = (
    "python3 -m venv /tmp/tf && /tmp/tf/bin/pip install -e '.[build-tflite]' tf2onnx"
    " && /tmp/tf/bin/python scripts/build_mobilenet_models.py"
)
BUILD_HINT = (
    f"{BUILD_COMMAND}  (any Python with tensorflow-cpu, tf2onnx, onnx, onnxruntime and "
    "ai-edge-litert will do: it builds the graph in code and downloads nothing)"
)
FRAME_SHAPE = (224, 224, 3)
FRAME_BYTES = int(np.prod(FRAME_SHAPE))
FILES: dict[tuple[str, str], str] = {
    ("onnxruntime", "fp32"): "mobilenet_v3_small_fp32.onnx",
    ("onnxruntime", "int8"): "mobilenet_v3_small_int8.onnx",
    ("litert", "fp32"): "mobilenet_v3_small_fp32.tflite",
    ("litert", "int8"): "mobilenet_v3_small_int8.tflite",
}
"""(runtime, precision) -> file in the models directory (scripts/build_mobilenet_models.py)"""
NODE_THREADS = 1
"""the node's model.intra_op_threads in the end-to-end phase (its default)"""
TARGET_SHARE = 0.10
"""the node's overhead over the bare call, as a share of the bare p50"""

Runtime = Literal["onnxruntime", "litert"]
Precision = Literal["fp32", "int8"]


# ---------------------------------------------------------------------------- figures
@dataclass(frozen=True, slots=True)
class Stats:
    n: int
    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float

    @classmethod
    def of(cls, ms: Sequence[float]) -> Stats:
        """Percentiles (linear interpolation) of latencies in ms; needs at least one."""
        a = np.asarray(ms, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no samples")
        p50, p90, p99 = (float(x) for x in np.percentile(a, [50, 90, 99]))
        return cls(int(a.size), p50, p90, p99, float(a.mean()), float(a.min()), float(a.max()))


@dataclass(slots=True)
class BareCase:
    runtime: Runtime
    precision: Precision
    threads: int
    file: str
    serves: str = ""
    """provider (ONNX Runtime) or delegate (LiteRT) that runs the graph"""
    stats: Stats | None = None

    @property
    def name(self) -> str:
        return f"{self.runtime} {self.precision} {self.threads} thread{'s' * (self.threads > 1)}"


@dataclass(slots=True)
class EndToEnd:
    node: Latency
    mqtt: Latency
    """bare paho subscriber, the same frames at the same rate (one hop)"""
    bare: Stats
    """the bare ONNX Runtime call on the node's model and thread count, blocks between runs"""
    relay: Latency | None = None
    """bare paho relay (bench.relay): frames in, the same model inline, a result out; the same
    frames at the same rate, the same consumer (two hops, no batching, no durable store)"""
    paced: Stats | None = None
    """the same call paced at the node's frame rate (the CPU idles between calls, as the node's
    does: caches go cold, the core may sleep); the like-for-like baseline"""
    rounds: list[tuple[float, float, float]] = field(default_factory=list)
    """per round: bare call p50, node e2e p50, bare paho p50 (ms)"""
    node_exit: str = ""
    node_log_issues: list[str] = field(default_factory=list)
    node_rss_mb: float = 0.0

    @property
    def overhead_ms(self) -> float:
        return self.node.p50 - self.bare.p50

    @property
    def overhead_share(self) -> float:
        return overhead_share(self.node.p50, self.bare.p50)

    @property
    def relay_overhead_ms(self) -> float:
        return float("nan") if self.relay is None else self.node.p50 - self.relay.p50

    @property
    def paced_overhead_ms(self) -> float:
        return float("nan") if self.paced is None else self.node.p50 - self.paced.p50

    @property
    def paced_overhead_share(self) -> float:
        if self.paced is None:
            return float("nan")
        return overhead_share(self.node.p50, self.paced.p50)


def overhead_share(e2e_p50: float, bare_p50: float) -> float:
    """(e2e p50 - bare p50) / bare p50: what the node adds, relative to the inference."""
    if bare_p50 <= 0:
        raise ValueError(f"bare p50 must be > 0, got {bare_p50}")
    return (e2e_p50 - bare_p50) / bare_p50


@dataclass(slots=True)
class Profile:
    samples: int
    busy: int
    """samples of threads at work (the rest: threads waiting)"""
    by_part: list[tuple[str, int]]
    top_leaves: list[tuple[str, int]]
    path: str
    latency: Latency | None = None


@dataclass(slots=True)
class Figures(RunInfo):
    models: dict[str, Any] = field(default_factory=dict)
    bare: list[BareCase] = field(default_factory=list)
    litert_note: str = ""
    e2e: EndToEnd | None = None
    profile: Profile | None = None
    elapsed_s: float = 0.0

    def case(self, runtime: str, precision: str, threads: int) -> BareCase | None:
        return next(
            (
                c
                for c in self.bare
                if (c.runtime, c.precision, c.threads) == (runtime, precision, threads)
            ),
            None,
        )


def _load3() -> tuple[float, float, float]:
    a, b, c = os.getloadavg()
    return (round(a, 2), round(b, 2), round(c, 2))


# ---------------------------------------------------------------------------- bare runtimes
Call = Callable[[npt.NDArray[np.uint8]], Any]


def onnx_call(path: Path, threads: int) -> tuple[Call, str]:
    """One frame through the node's ONNX Runtime backend; returns (call, provider)."""
    rt = load_runtime(path, intra_op_threads=threads)

    def call(frame: npt.NDArray[np.uint8]) -> Any:
        return rt.run(frame[None])

    return call, rt.provider


def litert_call(path: Path, threads: int) -> tuple[Call, str]:
    """One frame through a LiteRT interpreter (XNNPACK, its default CPU delegate)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    out = it.get_output_details()[0]
    if tuple(inp["shape"][1:]) != FRAME_SHAPE or inp["dtype"] != np.uint8:
        raise SystemExit(f"{path}: input {inp['shape']} {inp['dtype']}, want uint8 {FRAME_SHAPE}")
    index_in, index_out = inp["index"], out["index"]

    def call(frame: npt.NDArray[np.uint8]) -> Any:
        it.set_tensor(index_in, frame[None])
        it.invoke()
        return it.get_tensor(index_out)

    return call, f"XNNPACK delegate (LiteRT default), {_partitions(it)}"


def _partitions(it: Any) -> str:
    """How many pieces the default delegate took the graph in (private API: best effort)."""
    try:
        n = sum(1 for op in it._get_ops_details() if op.get("op_name") == "DELEGATE")
    except Exception:  # not every LiteRT build has it
        return "partitions unknown"
    return f"{n} delegated partition{'s' * (n != 1)}"


def time_paced_calls(
    call: Call, frames: npt.NDArray[np.uint8], n: int, rate_hz: float
) -> list[float]:
    """``n`` calls at ``rate_hz`` (sleeping until each tick), as frames reach the node."""
    out: list[float] = []
    clock = time.perf_counter
    start = clock()
    for i in range(n):
        time.sleep(max(0.0, start + i / rate_hz - clock()))
        frame = frames[i % len(frames)]
        t0 = clock()
        call(frame)
        out.append((clock() - t0) * 1000.0)
    return out


def time_calls(call: Call, frames: npt.NDArray[np.uint8], n: int, start: int = 0) -> list[float]:
    """``n`` calls, cycling through ``frames``; each call's wall time in ms."""
    out: list[float] = []
    clock = time.perf_counter
    for i in range(n):
        frame = frames[(start + i) % len(frames)]
        t0 = clock()
        call(frame)
        out.append((clock() - t0) * 1000.0)
    return out


def measure_bare(
    cases: list[BareCase],
    models: Path,
    frames: npt.NDArray[np.uint8],
    *,
    iterations: int,
    rounds: int,
    warmup: int,
) -> None:
    """Load every case, warm each up, then ``rounds`` turns of ``iterations`` calls each."""
    calls: list[Call] = []
    for case in cases:
        make = onnx_call if case.runtime == "onnxruntime" else litert_call
        call, case.serves = make(models / case.file, case.threads)
        time_calls(call, frames, warmup)
        calls.append(call)
    samples: list[list[float]] = [[] for _ in cases]
    for r in range(rounds):
        for i, call in enumerate(calls):
            samples[i] += time_calls(call, frames, iterations, start=r * iterations)
        log(f"bare runtimes: round {r + 1}/{rounds} done")
    for case, ms in zip(cases, samples, strict=True):
        case.stats = Stats.of(ms)


# ---------------------------------------------------------------------------- end to end
def node_env(model: Path, args: argparse.Namespace) -> dict[str, str]:
    """What the node needs to serve this model on 150 KB frames (see docs/benchmarks.md)."""
    env = {
        "EDGEWISE_MODEL__PATH": str(model),
        "EDGEWISE_MODEL__NAME": "mobilenet",
        "EDGEWISE_MODEL__OUTPUT": "probabilities",
        "EDGEWISE_MODEL__INTRA_OP_THREADS": str(NODE_THREADS),
        # A frame is 150,528 bytes of data plus a ~60-byte MessagePack header.
        "EDGEWISE_LIMITS__MAX_PAYLOAD_BYTES": str(args.max_payload_bytes),
        "EDGEWISE_LIMITS__MAX_TENSOR_ELEMENTS": str(args.max_tensor_elements),
    }
    if args.synchronous is not None:
        env["EDGEWISE_STORAGE__SYNCHRONOUS"] = args.synchronous
    return env


def start_node(bench: Bench, node_id: str, env: dict[str, str]) -> NodeProcess:
    obs = Observer(bench.host, bench.port, node_id)
    node = NodeProcess(node_id, bench.host, bench.port, bench.workdir, env)
    try:
        node.start()
        if not obs.online.wait(60):
            node.stop()
            raise RuntimeError(f"node {node_id} not online after 60 s; see {node.log_path}")
    finally:
        obs.close()
    bench.node, bench.node_id = node, node_id
    return node


def run_end_to_end(
    args: argparse.Namespace,
    bench: Bench,
    bare: Call,
    frames: npt.NDArray[np.uint8],
) -> tuple[EndToEnd, Profile | None]:
    """Rounds of: a block of bare calls, the node at ``--rate``, the bare subscriber at
    ``--rate``; then one more block of bare calls. Samples pooled over the rounds."""
    model = args.models / FILES[("onnxruntime", "fp32")]
    node = start_node(bench, f"bench-mnet-{os.getpid()}", node_env(model, args))
    profile: Profile | None = None
    bench.frame_shape = FRAME_SHAPE
    secs = args.seconds / args.e2e_rounds
    bare_ms: list[float] = []
    paced_ms: list[float] = []
    runs: dict[str, tuple[list[ConsumeReport], list[PublishReport]]] = {
        "node": ([], []),
        "baseline": ([], []),
        "relay": ([], []),
    }
    relay = start_relay(bench, model, args)
    rounds: list[tuple[float, float, float]] = []
    try:
        warm, _ = bench.paced("node", args.rate, args.warmup_s, tag="warmup")
        log(f"node warm-up: {warm.received} results")
        for r in range(args.e2e_rounds):
            block = time_calls(bare, frames, args.iterations, start=r * args.iterations)
            bare_ms += block
            paced_ms += time_paced_calls(bare, frames, max(20, int(args.rate * secs)), args.rate)
            p50s = [Stats.of(block).p50]
            kinds: tuple[Literal["node", "baseline", "relay"], ...] = ("node", "baseline", "relay")
            for kind in kinds:
                crep, prep = bench.paced(kind, args.rate, secs, tag=f"{kind[0]}{r}")
                runs[kind][0].append(crep)
                runs[kind][1].append(prep)
                p50s.append(Stats.of(crep.latencies_ms).p50)
            rounds.append((p50s[0], p50s[1], p50s[2]))
            log(
                f"round {r + 1}/{args.e2e_rounds}: bare call p50 {p50s[0]:.2f} ms, node e2e "
                f"p50 {p50s[1]:.2f} ms, bare paho p50 {p50s[2]:.2f} ms, bare relay e2e p50 "
                f"{p50s[3]:.2f} ms"
            )
        bare_ms += time_calls(bare, frames, args.iterations)
        rss = round(node.rss_mb(), 1)
        if args.profile is not None:
            profile = profile_node(args, bench, node)
    finally:
        exit_note = node.stop()
        forget_session(bench.host, bench.port, bench.node_id)
        bench.node = None
        relay.stop()
    e2e = EndToEnd(
        node=latency_of("node", args.rate, *runs["node"]),
        mqtt=latency_of("baseline", args.rate, *runs["baseline"]),
        relay=latency_of("relay", args.rate, *runs["relay"]),
        bare=Stats.of(bare_ms),
        paced=Stats.of(paced_ms),
        rounds=rounds,
        node_exit=exit_note,
        node_log_issues=node.log_issues(),
        node_rss_mb=rss,
    )
    return e2e, profile


class RelayProcess:
    """bench.relay in a process of its own (spawn), serving until stopped."""

    def __init__(self, bench: Bench, spec: RelaySpec) -> None:
        ctx = bench.mp
        self._stop = ctx.Event()
        self._errors: Any = ctx.Queue()
        ready = ctx.Event()
        self._proc = ctx.Process(
            target=run_relay, args=(spec, ready, self._stop, self._errors), daemon=True
        )
        self._proc.start()
        if not ready.wait(60):
            raise RuntimeError("the bare relay did not start in 60 s")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if not self._errors.empty():
            raise RuntimeError(f"bare relay failed:\n{self._errors.get()}")

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._raise_if_failed()


def start_relay(bench: Bench, model: Path, args: argparse.Namespace) -> RelayProcess:
    spec = RelaySpec(
        bench.host,
        bench.port,
        bench.relay_id,
        str(model),
        threads=NODE_THREADS,
        max_payload_bytes=args.max_payload_bytes,
        max_tensor_elements=args.max_tensor_elements,
    )
    return RelayProcess(bench, spec)


def profile_node(args: argparse.Namespace, bench: Bench, node: NodeProcess) -> Profile:
    """One more end-to-end run with py-spy sampling the node; not counted in the figures."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    out: Path = args.profile
    secs = args.seconds
    cmd = [spy, "record", "--format", "raw", "-r", "200", "-d", f"{secs + 2:.0f}"]
    cmd += ["-o", str(out), "-p", str(node.pid)]
    log(f"profiling the node with py-spy for {secs + 2:.0f} s -> {out}")
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as spy_proc:
        time.sleep(1.0)
        lat = bench.latency("node", args.rate, secs, tag="profiled")
        _, err = spy_proc.communicate(timeout=secs + 60)
    if spy_proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({spy_proc.returncode}): {err.decode()[-500:]}")
    s: Summary = summarize(out.read_text().splitlines())
    return Profile(
        samples=s.samples,
        busy=s.busy,
        by_part=s.by_part.most_common(),
        top_leaves=s.by_leaf.most_common(10),
        path=str(out),
        latency=lat,
    )


# ---------------------------------------------------------------------------- main flow
def model_info(models: Path) -> dict[str, Any]:
    info: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((models / "models.json").read_text())
    sizes = {name: (models / name).stat().st_size for name in FILES.values()}
    return {"sizes": sizes, "built": info.get("versions", {}), "checks": info.get("files", {})}


def missing_models(models: Path) -> list[str]:
    return [name for name in FILES.values() if not (models / name).is_file()]


def litert_available() -> str:
    """'' when ai_edge_litert imports; else why not."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError as exc:
        return f"ai_edge_litert not importable ({exc}): .venv/bin/pip install ai-edge-litert"
    return ""


def run(args: argparse.Namespace, command: str) -> Figures:
    t_start = time.monotonic()
    machine = machine_info()
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        machine["ai-edge-litert"] = importlib.metadata.version("ai-edge-litert")
    figures = Figures(
        command=command,
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine,
        load_before=_load3(),
        config={
            "iterations": args.iterations,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "threads": args.threads,
            "rate_hz": args.rate,
            "seconds": args.seconds,
            "warmup_s": args.warmup_s,
            "e2e_rounds": args.e2e_rounds,
            "max_payload_bytes": args.max_payload_bytes,
            "max_tensor_elements": args.max_tensor_elements,
            "synchronous": args.synchronous or "default (FULL)",
        },
        models=model_info(args.models),
    )
    figures.busy_before = psutil.cpu_percent(interval=1.0)
    if figures.busy_before > 10 or figures.load_before[0] > 1.0:
        log(
            f"[yellow]the machine is busy ({figures.busy_before:.0f}% CPU, load "
            f"{figures.load_before[0]:.2f}): other work will disturb the figures[/]"
        )
    frames = random_frames(FRAME_SHAPE, count=16)

    # 1. bare runtimes
    figures.litert_note = litert_available()
    runtimes: list[Runtime] = ["onnxruntime"] if figures.litert_note else ["onnxruntime", "litert"]
    if figures.litert_note:
        log(f"[yellow]LiteRT skipped: {figures.litert_note}[/]")
    precisions: tuple[Precision, ...] = ("fp32", "int8")
    figures.bare = [
        BareCase(rt, p, t, FILES[(rt, p)])
        for rt in runtimes
        for p in precisions
        for t in args.threads
    ]
    measure_bare(
        figures.bare,
        args.models,
        frames,
        iterations=args.iterations,
        rounds=args.rounds,
        warmup=args.warmup,
    )
    for c in figures.bare:
        assert c.stats is not None
        log(f"{c.name:32s} p50 {c.stats.p50:7.2f}  p99 {c.stats.p99:7.2f} ms")

    # 2. end to end through the node
    if args.seconds > 0:
        bare, _ = onnx_call(args.models / FILES[("onnxruntime", "fp32")], NODE_THREADS)
        time_calls(bare, frames, args.warmup)
        workdir = Path(tempfile.mkdtemp(prefix="edgewise-bench-mnet-"))
        broker = MosquittoProcess(workdir / "broker")
        broker.start()
        log(f"Mosquitto on {broker.info.url} (pid {broker.pid}); workdir {workdir}")
        ns = argparse.Namespace(max_batch_size=None, max_wait_ms=None, synchronous=None)
        bench = Bench(ns, broker, workdir)
        try:
            figures.e2e, figures.profile = run_end_to_end(args, bench, bare, frames)
        finally:
            if bench.node is not None:
                bench.node.stop()
            broker.stop()
            if args.keep_workdir:
                log(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    figures.load_after = _load3()
    figures.elapsed_s = round(time.monotonic() - t_start, 1)
    return figures


# ---------------------------------------------------------------------------- reporting
def _ms(x: float) -> str:
    return f"{x:.2f}"


def bare_rows(f: Figures) -> list[list[str]]:
    """runtime, precision, threads, p50, p90, p99, mean, min, calls, int8 speed-up, serves."""
    rows: list[list[str]] = []
    for c in f.bare:
        s = c.stats
        if s is None:
            continue
        speedup = "-"
        if c.precision == "int8":
            fp = f.case(c.runtime, "fp32", c.threads)
            if fp is not None and fp.stats is not None:
                speedup = f"{fp.stats.p50 / s.p50:.2f}x"
        rows.append(
            [
                c.runtime,
                c.precision,
                str(c.threads),
                _ms(s.p50),
                _ms(s.p90),
                _ms(s.p99),
                _ms(s.mean),
                _ms(s.min),
                f"{s.n:,}",
                speedup,
                c.serves,
            ]
        )
    return rows


BARE_COLUMNS = (
    "runtime",
    "precision",
    "threads",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "mean ms",
    "min ms",
    "calls",
    "int8 speed-up (fp32 p50 / int8 p50)",
    "runs on",
)


def e2e_rows(e: EndToEnd) -> list[list[str]]:
    """what, p50, p99, max, count of the end-to-end comparison."""

    def latency(what: str, lat: Latency) -> list[str]:
        return [what, _ms(lat.p50), _ms(lat.p99), _ms(lat.max), f"{lat.received:,}/{lat.sent:,}"]

    def stats(what: str, st: Stats) -> list[str]:
        return [what, _ms(st.p50), _ms(st.p99), _ms(st.max), f"{st.n:,}"]

    n = e.node
    rows = [
        latency("node: frame published -> result received", n),
        [
            "inside the node (its latency_ms: frame in -> result built)",
            _ms(n.node_p50 if n.node_p50 is not None else float("nan")),
            _ms(n.node_p99 if n.node_p99 is not None else float("nan")),
            "-",
            "-",
        ],
        stats(f"bare ONNX Runtime call, fp32, {NODE_THREADS} thread (baseline)", e.bare),
    ]
    if e.paced is not None:
        what = f"the same bare call paced at the node's frame rate ({n.rate_hz:g}/s)"
        rows.append(stats(what, e.paced))
    if e.relay is not None:
        what = (
            "bare paho relay: frame published -> result received (the same model inline in"
            " paho's callback; no batching, checks or durable store)"
        )
        rows.append(latency(what, e.relay))
    rows.append(latency("bare paho subscriber, same frames and rate (one MQTT hop)", e.mqtt))
    return rows


def breakdown(e: EndToEnd) -> str:
    """Where the e2e p50 goes, from differences of p50s (approximate: p50s do not add up)."""
    n = e.node
    if n.node_p50 is None:
        return ""
    hop = e.mqtt.p50
    base = e.paced if e.paced is not None else e.bare
    inside = n.node_p50 - base.p50
    rest = n.p50 - hop - n.node_p50
    return (
        f"Roughly, of the e2e p50 {n.p50:.2f} ms: inference {base.p50:.2f} ms (bare call"
        f"{' paced at the same rate' if e.paced is not None else ''}); "
        f"the frame's MQTT hop ~{hop:.2f} ms (bare paho subscriber); inside the node besides "
        f"the inference ~{inside:.2f} ms (its latency_ms p50 {n.node_p50:.2f} - that); the rest,"
        f" ~{rest:.2f} ms, after the result is built: the outbox commit, the results publish,"
        f" the second hop and the subscriber's decode."
    )


def verdict(e: EndToEnd) -> str:
    met = e.overhead_share < TARGET_SHARE
    text = (
        f"node overhead = e2e p50 - bare p50 = {e.node.p50:.2f} - {e.bare.p50:.2f} = "
        f"{e.overhead_ms:.2f} ms = {e.overhead_share:.1%} of the bare inference "
        f"(target < {TARGET_SHARE:.0%}: {'met' if met else 'missed'})"
    )
    if e.paced is not None:
        text += (
            f"; against the bare call paced at the same rate ({e.paced.p50:.2f} ms): "
            f"{e.paced_overhead_ms:.2f} ms = {e.paced_overhead_share:.1%}"
        )
    if e.relay is not None:
        base = e.paced if e.paced is not None else e.bare
        text += (
            f"; a bare paho relay of the same model (e2e p50 {e.relay.p50:.2f} ms) itself adds "
            f"{e.relay.p50 - base.p50:.2f} ms = {overhead_share(e.relay.p50, base.p50):.1%} to "
            f"that call, and the node {e.relay_overhead_ms:.2f} ms more than the relay"
        )
    return text


def print_report(f: Figures) -> None:
    t = Table(title="bare runtimes, batch 1, ms per call", title_justify="left")
    for col in BARE_COLUMNS:
        t.add_column(col, justify="right" if "ms" in col or col == "calls" else "left")
    for row in bare_rows(f):
        t.add_row(*row)
    console.print(t)
    if f.e2e is not None:
        t2 = Table(title=f"end to end @ {f.config['rate_hz']:g} frames/s", title_justify="left")
        for col in ("what", "p50 ms", "p99 ms", "max ms", "n"):
            t2.add_column(col, justify="left" if col == "what" else "right")
        for row in e2e_rows(f.e2e):
            t2.add_row(*row)
        console.print(t2)
        console.print(verdict(f.e2e), breakdown(f.e2e), highlight=False)
    console.print(
        f"load average before {f.load_before}, after {f.load_after}; run took {f.elapsed_s:.0f} s",
        highlight=False,
    )


def markdown(f: Figures) -> str:
    out: list[str] = [f"Measured {f.date}, in {f.elapsed_s:.0f} s, with:\n"]
    out.append(f"```sh\n{f.command}\n```\n")
    m = f.machine
    out.append(
        f"Code: commit {m['code']}. Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, "
        f"{m['os']}; Python {m['python']}, onnxruntime {m['onnxruntime']}, ai-edge-litert "
        f"{m.get('ai-edge-litert', 'not installed')}, numpy {m['numpy']}, paho-mqtt "
        f"{m['paho-mqtt']}, Mosquitto {m['mosquitto']}. **Load average (1/5/15 min) "
        f"{'/'.join(map(str, f.load_before))} before the run** (machine {f.busy_before:.0f}% "
        f"busy in the second before it), **{'/'.join(map(str, f.load_after))} after**.\n"
    )
    c = f.config
    out.append(
        f"Bare runtimes: {c['rounds']} rounds x {c['iterations']} calls per case, cases taking "
        f"turns, after {c['warmup']} warm-up calls; 16 random uint8 frames in turn.\n"
    )
    out.append("| " + " | ".join(BARE_COLUMNS) + " |")
    out.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|")
    for row in bare_rows(f):
        out.append("| " + " | ".join(row) + " |")
    if f.litert_note:
        out.append(f"\nLiteRT not measured: {f.litert_note}.")
    out.append("")
    e = f.e2e
    if e is not None:
        out.append(
            f"End to end: the node serving `{FILES[('onnxruntime', 'fp32')]}` "
            f"(`model.intra_op_threads` {NODE_THREADS}), frames at {c['rate_hz']:g}/s for "
            f"{c['seconds']:g} s in {c['e2e_rounds']} rounds after a {c['warmup_s']:g} s "
            f"warm-up; before each round, and once more at the end, a block of "
            f"{c['iterations']} bare calls. `limits.max_payload_bytes` "
            f"{c['max_payload_bytes']:,}, `limits.max_tensor_elements` "
            f"{c['max_tensor_elements']:,}; outbox synchronous {c['synchronous']}.\n"
        )
        out.append("| what | p50 ms | p99 ms | max ms | n |\n|---|--:|--:|--:|--:|")
        for row in e2e_rows(e):
            out.append("| " + " | ".join(row) + " |")
        out.append("")
        out.append(f"**{verdict(e)}**. {breakdown(e)}\n")
        per_round = "; ".join(
            f"{i + 1}: {b:.2f} / {n:.2f} / {m:.2f}" for i, (b, n, m) in enumerate(e.rounds)
        )
        out.append(f"p50 per round (bare call / node e2e / bare paho, ms): {per_round}.\n")
        out.append(
            f"Node RSS after the run {e.node_rss_mb:.1f} MB; stop: {e.node_exit}; "
            f"{len(e.node_log_issues)} warning/error lines in its log.\n"
        )
    p = f.profile
    if p is not None:
        lat = p.latency
        extra = f" (that run: p50 {lat.p50:.2f} ms, p99 {lat.p99:.2f} ms)" if lat else ""
        out.append(
            f"py-spy on the node (`{p.path}`), {p.samples:,} samples of its threads, "
            f"{p.busy:,} of them at work{extra}:\n"
        )
        out.append("| part (innermost frame) | samples | share of the busy |\n|---|--:|--:|")
        for part, n in p.by_part:
            share = "-" if part == IDLE else f"{n / max(p.busy, 1):.1%}"
            out.append(f"| {part} | {n:,} | {share} |")
        out.append("\nTop leaf functions (busy samples):\n")
        out.append("| function | samples |\n|---|--:|")
        for leaf, n in p.top_leaves:
            out.append(f"| `{leaf}` | {n:,} |")
        out.append("")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- cli
def _threads(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ints: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1: {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.mobilenet",
        description="MobileNetV3-Small (224x224x3 uint8, random weights) on this CPU: ONNX "
        "Runtime and LiteRT, fp32 and int8, batch 1; then the node end to end against the "
        f"bare call. Build the models first: {BUILD_COMMAND}",
    )
    p.add_argument("--models", type=Path, default=MODELS_DIR, help=f"default {MODELS_DIR}")
    p.add_argument("--iterations", type=int, default=100, help="calls per case per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the bare cases (default 3)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up calls per case")
    p.add_argument(
        "--threads", type=_threads, default=[1, 2], help="thread counts, e.g. 1,2 (default)"
    )
    p.add_argument("--rate", type=float, default=20.0, help="end-to-end frames/s (default 20)")
    p.add_argument(
        "--seconds", type=float, default=30.0, help="end-to-end seconds (0: skip the node)"
    )
    p.add_argument("--warmup-s", type=float, default=3.0, help="node warm-up seconds")
    p.add_argument(
        "--e2e-rounds", type=int, default=3, help="rounds the end-to-end seconds are split in"
    )
    p.add_argument(
        "--max-payload-bytes",
        type=int,
        default=256 * 1024,
        help="node's EDGEWISE_LIMITS__MAX_PAYLOAD_BYTES (default 262144)",
    )
    p.add_argument(
        "--max-tensor-elements",
        type=int,
        default=FRAME_BYTES,
        help=f"node's EDGEWISE_LIMITS__MAX_TENSOR_ELEMENTS (default {FRAME_BYTES})",
    )
    p.add_argument(
        "--synchronous",
        choices=["OFF", "NORMAL", "FULL", "EXTRA"],
        default=None,
        help="node's EDGEWISE_STORAGE__SYNCHRONOUS (default: the node's own, FULL)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="also run py-spy on the node during one extra end-to-end run; raw stacks here",
    )
    p.add_argument("--write", type=Path, default=None, help="update this Markdown file")
    p.add_argument("--label", default="default", help="which generated block of --write to replace")
    p.add_argument("--json", type=Path, default=None, help="also dump the raw figures here")
    p.add_argument("--keep-workdir", action="store_true", help="keep broker and node logs")
    args = p.parse_args(argv)
    for name in ("iterations", "rounds", "e2e_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rate <= 0:
        p.error("--rate must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_models(args.models)
    if missing:
        console.print(
            f"[red]models missing in {args.models}:[/] {', '.join(missing)}\n"
            f"build them (once, ~30 s) with:\n  {BUILD_HINT}",
            highlight=False,
        )
        return 2
    if args.seconds > 0 and mosquitto_path() is None:
        console.print("[red]mosquitto not found[/] (apt-get install mosquitto) or --seconds 0")
        return 2
    shown = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python -m bench.mobilenet", *map(shlex.quote, shown)])
    figures = run(args, command)
    print_report(figures)
    md = markdown(figures)
    if args.write is not None:
        write_markdown(args.write, md, args.label, marker=MARKER)
        log(f"wrote the figures into {args.write} (block {args.label!r})")
    else:
        console.print(md, markup=False, highlight=False)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(figures), indent=2, default=str) + "\n")
    return 0


__all__ = ["Figures", "Stats", "main", "overhead_share", "run"]

if __name__ == "__main__":
    sys.exit(main())
