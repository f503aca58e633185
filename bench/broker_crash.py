"""The broker's own crash window: results a broker acknowledged and lost in a ``kill -9``.

Run from the repo root::

    .venv/bin/python -m bench.broker_crash                               # print the figures
    .venv/bin/python -m bench.broker_crash --write docs/benchmarks.md    # block ``broker_crash``

A node's outbox lets a results message go at the broker's PUBACK. Mosquitto keeps what it
acknowledged in memory and saves it to disk only at its autosave (2.0: the whole in-memory
database, written to ``mosquitto.db.new``, fsync'd, renamed), so a broker ``kill -9`` or a power
cut loses what it took since its last save: messages queued for a consumer, and even the
consumer's session itself if it was made since. This benchmark measures that window, and the
broker's CPU cost of saving more often, for each persistence setting given with ``--setting``
(default: the shipped one, ``compose/mosquitto/conf.d/tuning.conf``, and the alternatives), with
the node's end-to-end mode off and on (docs/adr/0078-end-to-end-acks.md).

Topology (loopback, real processes): a *frames* broker (no persistence, never killed) where a
paced sensor publishes ``--frames`` frames at ``--rate`` per second; the node (``edgewise
node``) reads them there and publishes everything to its uplink, the *results* broker
(persistence on, the setting under test), where a :class:`edgewise.local_broker.ResultSink`
(persistent
session, QoS 1) takes the results and, in end-to-end mode, confirms them on ``edge/{node}/acks``.
The results broker is killed with SIGKILL ``--kills`` times, when the sink has seen results for
an evenly spaced share of the frames, and restarted after ``--outage-s``. Frames never cross the
killed broker, so every frame is answered by the node (its outbox's ``answered`` table says how
many); **results lost** = frames the node answered - distinct frames answered at the sink, once
the node has nothing left to send (mode off: its outbox holds no result; mode on: the sink has
them all, or ``--settle-s`` passed).

The CPU cost: a fresh results broker with the setting, the node and a sink at ``--rate`` for
``--cpu-s`` seconds, the sink online (the broker holds almost nothing) and then offline (its
persistent session queues every result: what a save writes grows); psutil's CPU time of the
broker process over the phase, and the size of ``mosquitto.db`` at its end.

This is a benchmark, not a test: it asserts nothing and exits 0 when every run completed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from bench.node_throughput import NodeProcess, RunInfo, machine_info, write_markdown
from edgewise.cli.frames import load_holdout
from edgewise.local_broker import MosquittoProcess, MqttProbe, ResultSink, accepts_mqtt, read_tuning
from schemas import Frame, decode_telemetry, encode_frame

MARKER = "<!-- bench:broker_crash:{label}:{end} -->"

#: Persistence settings measured (each states both keys: the shared tuning sets them too).
SETTINGS: dict[str, str] = {
    "interval-30": "autosave_on_changes false\nautosave_interval 30",
    "interval-1": "autosave_on_changes false\nautosave_interval 1",
    "changes-1": "autosave_on_changes true\nautosave_interval 1",
    "changes-100": "autosave_on_changes true\nautosave_interval 100",
}


def shipped_setting() -> str:
    """The autosave lines of the shared tuning (what compose, the tests and the demo run)."""
    tuning = read_tuning()
    return "\n".join(f"{k} {v}" for k, v in tuning.items() if k.startswith("autosave"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class CrashRun:
    setting: str
    end_to_end: bool
    frames: int
    answered_by_node: int = 0
    answered_at_sink: int = 0
    results_lost: int = 0
    duplicates: int = 0
    """Results the sink received more than once (same result id)."""
    two_ids: int = 0
    """Frames answered under two result ids (must be 0)."""
    kills_at: list[int] = field(default_factory=list)
    """Frames answered at the sink when each kill came."""
    resent: int = 0
    confirmed: int = 0
    last_result_after_restart_s: float = 0.0
    """From the last restart to the last new frame answered at the sink."""
    complete: bool = False
    node_exit: str = ""


@dataclass(slots=True)
class CpuRun:
    setting: str
    phase: str  # "sink online" / "sink offline"
    seconds: float
    broker_cpu_pct: float
    db_bytes: int
    saves: int


@dataclass(slots=True)
class SaveRun:
    queued_mb: int
    db_bytes: int
    blocked_s: float
    """From SIGUSR1 (save now) until the broker answered an MQTT CONNECT again."""


@dataclass(slots=True)
class CrashFigures(RunInfo):
    crashes: list[CrashRun] = field(default_factory=list)
    cpu: list[CpuRun] = field(default_factory=list)
    saves: list[SaveRun] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0


class Topology:
    """The frames broker, a results broker with ``setting``, the node, the sink, a sensor."""

    def __init__(
        self, workdir: Path, setting: str, *, end_to_end: bool, args: argparse.Namespace
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.node_id = f"crash-{uuid.uuid4().hex[:8]}"
        self.frames_broker = MosquittoProcess(workdir / "frames")
        rdir = workdir / "results"
        self.results_broker = MosquittoProcess(
            rdir,
            extra_config=f"persistence true\npersistence_location {rdir}/\n{setting}\n",
        )
        self.end_to_end = end_to_end
        self.args = args
        self.node: NodeProcess | None = None
        self.sink: ResultSink | None = None
        self.sensor: MqttProbe | None = None

    def start(self, *, sink_confirms: bool) -> None:
        fi = self.frames_broker.start()
        ri = self.results_broker.start()
        env = {
            "EDGEWISE_UPLINK__HOST": ri.host,
            "EDGEWISE_UPLINK__PORT": str(ri.port),
            "EDGEWISE_UPLINK__RECONNECT_FIRST_S": "0.1",
            "EDGEWISE_UPLINK__RECONNECT_CAP_S": "0.5",
            "EDGEWISE_TELEMETRY__WINDOW_S": "1",
            "EDGEWISE_LOG_LEVEL": "INFO",
        }
        if self.end_to_end:
            env["EDGEWISE_END_TO_END__ENABLED"] = "true"
            env["EDGEWISE_END_TO_END__RESEND_AFTER_S"] = str(self.args.resend_after_s)
        self.sink = ResultSink(ri, f"sink-{self.node_id}", confirm=sink_confirms)
        self.sink.connect()
        self.sink.subscribe(f"edge/{self.node_id}/results")
        self.sink.subscribe(f"edge/{self.node_id}/telemetry")
        self.node = NodeProcess(self.node_id, fi.host, fi.port, self.workdir, env)
        self.node.start()
        self.sink.wait_for(lambda m: m.topic.endswith("/telemetry"), 30)  # the node is up
        self.sensor = MqttProbe(fi, f"sensor-{self.node_id}", clean_session=False)
        self.sensor.connect()

    def publish(self, frames: int, rate: float) -> threading.Thread:
        images = load_holdout().images
        sensor = self.sensor
        assert sensor is not None
        step = max(1, int(rate / 20))

        def run() -> None:
            t0 = time.monotonic()
            for i in range(frames):
                payload = encode_frame(Frame(seq=i, ts=time.time(), tensor=images[i % len(images)]))
                sensor.client.publish("sensors/cam-1/digits", payload, qos=1)
                if i % step == step - 1:
                    time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def answered_by_node(self) -> int:
        return _count(self.workdir / "state" / f"{self.node_id}.outbox.db", "answered")

    def results_waiting(self) -> int:
        return _count(
            self.workdir / "state" / f"{self.node_id}.outbox.db",
            "records WHERE kind = 'result'",
        )

    def node_counts(self) -> dict[str, int]:
        """The node's cumulative counts from its last telemetry window (end-to-end mode)."""
        assert self.sink is not None
        counts: dict[str, int] = {}
        for m in self.sink.messages:
            if m.topic.endswith("/telemetry"):
                t = decode_telemetry(m.payload)
                for k, v in t.counts.items():
                    counts[k] = counts.get(k, 0) + v
        return counts

    def stop(self) -> str:
        exit_line = self.node.stop() if self.node is not None else ""
        for probe in (self.sink, self.sensor):
            if probe is not None:
                probe.close()
        self.results_broker.stop()
        self.frames_broker.stop()
        return exit_line


def _count(db: Path, table: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def crash_run(
    args: argparse.Namespace, name: str, setting: str, end_to_end: bool, workdir: Path
) -> CrashRun:
    run = CrashRun(setting=name, end_to_end=end_to_end, frames=args.frames)
    topo = Topology(workdir, setting, end_to_end=end_to_end, args=args)
    try:
        topo.start(sink_confirms=end_to_end)
        sink = topo.sink
        assert sink is not None
        publisher = topo.publish(args.frames, args.rate)
        restarted_at = time.monotonic()
        for k in range(1, args.kills + 1):
            at = args.frames * k // (args.kills + 1)
            sink.wait_answered(at, 120)
            run.kills_at.append(sink.answered())
            topo.results_broker.kill()
            time.sleep(args.outage_s)
            topo.results_broker.start()
            restarted_at = time.monotonic()
        publisher.join(300)
        deadline = time.monotonic() + args.settle_s
        last, last_at = sink.answered(), time.monotonic()
        while time.monotonic() < deadline:
            made = topo.answered_by_node()
            now = sink.answered()
            if now != last:
                last, last_at = now, time.monotonic()
            if made >= args.frames and (now >= made if end_to_end else topo.results_waiting() == 0):
                time.sleep(1.0)  # anything still on its way
                break
            time.sleep(0.2)
        run.answered_by_node = topo.answered_by_node()
        run.answered_at_sink = sink.answered()
        run.results_lost = run.answered_by_node - run.answered_at_sink
        run.two_ids = len(sink.twice())
        run.duplicates = sink.results - sum(len(ids) for ids in sink.frames.values())
        run.last_result_after_restart_s = max(0.0, last_at - restarted_at)
        run.complete = run.answered_by_node >= args.frames
        counts = topo.node_counts()
        run.resent = counts.get("results_resent", 0)
        run.confirmed = counts.get("results_confirmed", 0)
    finally:
        run.node_exit = topo.stop()
    return run


def cpu_run(args: argparse.Namespace, name: str, setting: str, workdir: Path) -> list[CpuRun]:
    topo = Topology(workdir, setting, end_to_end=False, args=args)
    out: list[CpuRun] = []
    try:
        topo.start(sink_confirms=False)
        sink = topo.sink
        assert sink is not None
        pid = topo.results_broker.pid
        assert pid is not None
        broker = psutil.Process(pid)
        frames = int(args.rate * args.cpu_s)
        for phase in ("sink online", "sink offline"):
            if phase == "sink offline":
                sink.client.disconnect()  # its persistent session queues every result now
            log_before = topo.results_broker.log_text().count("Saving in-memory database")
            t0 = time.monotonic()
            c0 = sum(broker.cpu_times()[:2])
            topo.publish(frames, args.rate).join(args.cpu_s * 3 + 60)
            seconds = time.monotonic() - t0
            cpu = sum(broker.cpu_times()[:2]) - c0
            db = topo.results_broker.workdir / "mosquitto.db"
            saves = topo.results_broker.log_text().count("Saving in-memory database") - log_before
            out.append(
                CpuRun(
                    setting=name,
                    phase=phase,
                    seconds=seconds,
                    broker_cpu_pct=100.0 * cpu / seconds,
                    db_bytes=db.stat().st_size if db.exists() else 0,
                    saves=saves,
                )
            )
            log(f"  {name} {phase}: broker CPU {out[-1].broker_cpu_pct:.1f}%, {saves} saves")
    finally:
        topo.stop()
    return out


def save_cost(mb: int, workdir: Path) -> SaveRun:
    """How long one save blocks Mosquitto with ``mb`` MB queued for an offline consumer."""
    broker = MosquittoProcess(
        workdir,
        extra_config=f"persistence true\npersistence_location {workdir}/\n"
        "autosave_on_changes false\nautosave_interval 86400\n",
    )
    info = broker.start()
    try:
        offline = MqttProbe(info, "offline-consumer", clean_session=False)
        offline.connect()
        offline.subscribe("backlog/#")
        offline.close()
        size = 5000
        publisher = MqttProbe(info)
        publisher.client.max_inflight_messages_set(1000)
        publisher.connect()
        publisher.publish_many("backlog/x", [b"x" * size] * (mb * 1_000_000 // size), timeout_s=600)
        publisher.close()
        pid = broker.pid
        assert pid is not None
        t0 = time.monotonic()
        os.kill(pid, signal.SIGUSR1)  # Mosquitto: save the in-memory database now
        time.sleep(0.05)  # the signal is handled at the top of its loop
        while not accepts_mqtt(info.host, info.port, timeout_s=30):
            pass
        blocked = time.monotonic() - t0
        db = workdir / "mosquitto.db"
        return SaveRun(
            queued_mb=mb, db_bytes=db.stat().st_size if db.exists() else 0, blocked_s=blocked
        )
    finally:
        broker.kill()


def run(args: argparse.Namespace, command: str) -> CrashFigures:
    names = args.setting or ["shipped", *SETTINGS]
    settings = {n: (shipped_setting() if n == "shipped" else SETTINGS[n]) for n in names}
    load = os.getloadavg()
    busy = psutil.cpu_percent(interval=1.0)
    f = CrashFigures(
        command=command,
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine_info(),
        load_before=(round(load[0], 2), round(load[1], 2), round(load[2], 2)),
        busy_before=busy,
        config={
            "frames": args.frames,
            "rate": args.rate,
            "kills": args.kills,
            "outage_s": args.outage_s,
            "runs": args.runs,
            "cpu_s": args.cpu_s,
            "resend_after_s": args.resend_after_s,
        },
        settings=settings,
    )
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="edgewise-broker-crash-"))
    try:
        for name, setting in settings.items():
            modes = {"off": [False], "on": [True], "both": [False, True]}[args.end_to_end]
            if name not in args.e2e_settings.split(","):
                modes = [m for m in modes if not m] or modes  # mode on: only those settings
            for e2e in modes:
                for i in range(args.runs):
                    log(f"crash: {name}, end-to-end {'on' if e2e else 'off'}, run {i + 1}")
                    r = crash_run(args, name, setting, e2e, root / f"{name}-{e2e}-{i}")
                    log(
                        f"  lost {r.results_lost} of {r.answered_by_node}, kills at"
                        f" {r.kills_at}, duplicates {r.duplicates}, resent {r.resent}"
                    )
                    f.crashes.append(r)
            if args.cpu_s > 0:
                log(f"cpu: {name}")
                f.cpu += cpu_run(args, name, setting, root / f"{name}-cpu")
        for mb in args.save_mb:
            log(f"save: {mb} MB queued")
            f.saves.append(save_cost(mb, root / f"save-{mb}"))
            log(
                f"  {f.saves[-1].db_bytes / 1e6:.0f} MB saved, broker blocked"
                f" {f.saves[-1].blocked_s:.2f} s"
            )
    finally:
        if args.keep_workdir:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    load = os.getloadavg()
    f.load_after = (round(load[0], 2), round(load[1], 2), round(load[2], 2))
    f.elapsed_s = time.monotonic() - t0
    return f


def markdown(f: CrashFigures) -> str:
    c = f.config
    m = f.machine
    out = [f"Measured {f.date}, in {f.elapsed_s:.0f} s, with:\n", f"```sh\n{f.command}\n```\n"]
    out.append(
        f"Code: commit {m['code']}. Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, "
        f"{m['os']}; Python {m['python']}, Mosquitto {m['mosquitto']}. Load average "
        f"{'/'.join(map(str, f.load_before))} before (machine {f.busy_before:.0f}% busy in the "
        f"second before), {'/'.join(map(str, f.load_after))} after.\n"
    )
    out.append(
        f"Settings: {c['frames']:,} frames at {c['rate']:g}/s per run, {c['kills']} results-broker"
        f" kills (SIGKILL) each followed by {c['outage_s']:g} s down, {c['runs']} run(s) per"
        f" case; end-to-end mode's first resend {c['resend_after_s']:g} s after the PUBACK.\n"
    )
    out.append("Persistence settings (besides `persistence true`):\n")
    for name, setting in f.settings.items():
        out.append(f"- `{name}`: `{'; '.join(setting.splitlines())}`")
    out.append("")
    out.append(
        "| setting | end-to-end | results lost (of answered) | kills at (answered) |"
        " duplicates at sink | frames with 2 ids | resent | last new result after restart |"
    )
    out.append("|---|---|--:|---|--:|--:|--:|--:|")
    for r in f.crashes:
        out.append(
            f"| `{r.setting}` | {'on' if r.end_to_end else 'off'} |"
            f" {r.results_lost:,} ({r.answered_by_node:,})"
            f"{'' if r.complete else ' incomplete'} | {', '.join(f'{k:,}' for k in r.kills_at)} |"
            f" {r.duplicates:,} | {r.two_ids} | {r.resent:,} |"
            f" {r.last_result_after_restart_s:.1f} s |"
        )
    out.append("")
    if f.cpu:
        out.append(
            f"Broker CPU at {c['rate']:g} frames/s for {c['cpu_s']:g} s (100 = one core), saves"
            " in that time (Mosquitto's log) and the saved database at the end:\n"
        )
        out.append("| setting | consumer | broker CPU % | saves | mosquitto.db |")
        out.append("|---|---|--:|--:|--:|")
        for cr in f.cpu:
            out.append(
                f"| `{cr.setting}` | {cr.phase} | {cr.broker_cpu_pct:.1f} | {cr.saves} |"
                f" {cr.db_bytes / 1024:,.0f} KiB |"
            )
        out.append("")
    if f.saves:
        out.append(
            "One save with a backlog (an offline consumer's persistent session holding 5,000-byte"
            " messages; save forced with SIGUSR1): how long the broker answered nothing.\n"
        )
        out.append("| queued | mosquitto.db | broker blocked |")
        out.append("|--:|--:|--:|")
        for sr in f.saves:
            out.append(
                f"| {sr.queued_mb} MB | {sr.db_bytes / 1e6:,.0f} MB | {sr.blocked_s:.2f} s |"
            )
        out.append("")
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.broker_crash",
        description="Measure the results lost in a broker kill -9, per persistence setting.",
    )
    p.add_argument("--frames", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=500.0, help="frames/s")
    p.add_argument("--kills", type=int, default=2)
    p.add_argument("--outage-s", type=float, default=3.0)
    p.add_argument("--runs", type=int, default=1, help="runs per setting and mode")
    p.add_argument(
        "--setting",
        action="append",
        choices=["shipped", *SETTINGS],
        help="persistence setting(s) to measure (default: all)",
    )
    p.add_argument("--end-to-end", choices=["off", "on", "both"], default="both")
    p.add_argument(
        "--e2e-settings",
        default="shipped,interval-30",
        help="settings measured with end-to-end mode on too (comma-separated)",
    )
    p.add_argument(
        "--save-mb",
        type=int,
        action="append",
        default=None,
        help="time one save of this many MB queued (repeatable; default 10 and 100)",
    )
    p.add_argument("--resend-after-s", type=float, default=10.0)
    p.add_argument("--settle-s", type=float, default=90.0, help="wait for the last results")
    p.add_argument("--cpu-s", type=float, default=30.0, help="CPU phases' length (0: skip)")
    p.add_argument("--write", type=Path, default=None, help="update this Markdown file")
    p.add_argument("--label", default="broker_crash", help="block of --write to replace")
    p.add_argument("--json", type=Path, default=None, help="also dump the raw figures here")
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args(argv)
    if args.save_mb is None:
        args.save_mb = [10, 100]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench.broker_crash " + shlex.join(sys.argv[1:] if argv is None else argv)
    figures = run(args, command.strip())
    text = markdown(figures)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(figures), indent=2))
    if args.write is not None:
        write_markdown(args.write, text, args.label, MARKER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
