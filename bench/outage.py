"""Uplink outage benchmark: results stored offline, the drain after reconnect, live latency.

Run from the repo root::

    .venv/bin/python -m bench.outage                               # print the figures
    .venv/bin/python -m bench.outage --write docs/benchmarks.md    # block ``outage``

One run, one fresh Mosquitto (the project's tuning, loopback). The node runs as users run it
(``.venv/bin/edgewise node``, configured by ``EDGEWISE_*`` variables): it reads frames from the
broker directly and publishes everything through a separate uplink (``EDGEWISE_UPLINK``) that
goes through a :class:`edgewise.local_broker.TcpProxy` the benchmark cuts and restores. Publishers
and
consumers are plain paho clients, each in its own process (:mod:`bench.workers`).

1. Input baseline: a bare paho subscriber's receive rate for a flood of ``--frames`` QoS 1
   frames (the most any Python consumer takes from this publisher on this machine).
2. For each drain cap (the node's default ``storage.drain_max_msgs_per_s``, then 0 = no cap),
   on a fresh node:

   a. warm-up: live frames at ``--live-rate`` for ``--warm-s`` with the uplink up (the live
      latency without a backlog: the reference for the latency during the drain);
   b. outage: the uplink is cut, ``--frames`` frames are flooded; the node's outbox is polled
      read-only (``max(n)`` of table ``answered``: frames answered durably) to time the stored
      results from the first to the last; the node's RSS is sampled (psutil) for the growth;
   c. (first node only) output baseline: a bare paho publisher floods a bare subscriber with
      QoS 1 messages of the size of the node's own stored results messages, through a second
      proxy (the same path as the node's uplink) and directly;
   d. drain: the uplink is restored while a paced publisher sends live frames at
      ``--live-rate`` on another device; the consumer times the backlog (restore to the last
      backlog result) and the live results (frame ``ts`` to receipt).

This is a benchmark, not a test: it asserts nothing about time and exits 0 when every phase
completed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil

from bench.node_throughput import (
    Bench,
    NodeProcess,
    Observer,
    RunInfo,
    _sigterm_as_interrupt,
    console,
    forget_session,
    log,
    machine_info,
    write_markdown,
)
from bench.workers import (
    ConsumeSpec,
    DrainReport,
    DrainSpec,
    FloodSpec,
    PacedSpec,
    PublishReport,
    connect,
    consume_drain,
    publish_flood,
    publish_paced,
    subscribe,
)
from edge_node.config import HealthConfig, StorageConfig
from edgewise.local_broker import MosquittoProcess, TcpProxy, mosquitto_path
from schemas import ContractError, decode_status

MARKER = "<!-- bench:outage:{label}:{end} -->"
MB = 1024 * 1024
DEFAULT_CAP = StorageConfig().drain_max_msgs_per_s
DEFAULT_WINDOW = StorageConfig().uplink_window
DEFAULT_GRACE_S = HealthConfig().uplink_grace_s
STORE_TARGET = 20_000.0
DRAIN_TARGET = 5_000.0
RSS_TARGET_MB = 50.0
LIVE_P95_TARGET_S = 2.0


# ---------------------------------------------------------------------------- figures
@dataclass(slots=True)
class LiveLatency:
    sent: int = 0
    received: int = 0
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")

    @classmethod
    def of(cls, sent: int, lat_ms: list[float]) -> LiveLatency:
        if not lat_ms:
            return cls(sent=sent)
        a = np.asarray(lat_ms, dtype=np.float64)
        p50, p95, p99 = (float(x) for x in np.percentile(a, [50, 95, 99]))
        return cls(sent, len(lat_ms), p50, p95, p99, float(a.max()))

    def describe(self) -> str:
        if not self.received:
            return "none received"
        return (
            f"p50 {_ms(self.p50_ms)}, p95 {_ms(self.p95_ms)}, p99 {_ms(self.p99_ms)}, "
            f"max {_ms(self.max_ms)} ({self.received:,} results)"
        )


@dataclass(slots=True)
class OutageRun:
    cap: float
    """the node's storage.drain_max_msgs_per_s (0: no cap)"""
    node_id: str = ""
    warm: LiveLatency = field(default_factory=LiveLatency)
    # -- outage
    frames: int = 0
    answered: int = 0
    store_rate: float = 0.0
    """results stored per second, first to last answered (outbox polled)"""
    store_span_s: float = 0.0
    publisher_rate: float = 0.0
    """frames PUBACKed per second at the flood publisher (the node acks once stored)"""
    rss_at_cut_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_end_mb: float = 0.0
    records: int = 0
    record_items: int = 0
    record_avg_bytes: float = 0.0
    record_max_items: int = 0
    outbox_mb: float = 0.0
    store_cpu: dict[str, float] = field(default_factory=dict)
    # -- drain
    reconnect_s: float = float("nan")
    """restore to the proxy accepting the node's new uplink connection"""
    first_backlog_s: float = float("nan")
    """restore to the first backlog result at the consumer"""
    drain_s: float = float("nan")
    """restore to the last backlog result at the consumer"""
    backlog_received: int = 0
    backlog_duplicates: int = 0
    backlog_inversions: int = 0
    drain_rate: float = 0.0
    """backlog results per second, restore to the last backlog result"""
    drain_rate_flowing: float = 0.0
    """backlog results per second, first to last backlog result"""
    outbox_empty_s: float = float("nan")
    """restore to the outbox holding no record (deletes lag PUBACKs by up to 0.5 s)"""
    live: LiveLatency = field(default_factory=LiveLatency)
    """live frames published from the restore to the last backlog result"""
    live_after_reconnect: LiveLatency = field(default_factory=LiveLatency)
    """of those, the ones published once the uplink had reconnected"""
    live_behind_backlog: int = 0
    """live results made before the uplink reconnected (they wait in the backlog)"""
    drain_rss_peak_mb: float = 0.0
    drain_cpu: dict[str, float] = field(default_factory=dict)
    statuses: list[tuple[float, str]] = field(default_factory=list)
    """(s since the cut, state and reasons) as the consumer saw the node's status"""
    node_exit: str = ""
    node_log_issues: list[str] = field(default_factory=list)


@dataclass(slots=True)
class OutageFigures(RunInfo):
    input_rate: float = 0.0
    """bare paho subscriber, frames/s, first to last received"""
    input_publisher_rate: float = 0.0
    output_payload_bytes: int = 0
    output_items: float = 0.0
    """results in the message used for the output baseline"""
    output_rate_proxy: float = 0.0
    """bare paho publisher -> subscriber through a TcpProxy, messages/s"""
    output_rate_direct: float = 0.0
    runs: list[OutageRun] = field(default_factory=list)
    elapsed_s: float = 0.0


def _ms(x: float) -> str:
    return f"{x / 1000:.2f} s" if x >= 1000 else f"{x:.1f} ms"


# ---------------------------------------------------------------------------- helpers
class Sampler(threading.Thread):
    """The node's RSS every 50 ms while it runs: the peak since :meth:`reset`."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="rss")
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.halt = threading.Event()

    def reset(self) -> int:
        rss = int(self.proc.memory_info().rss)
        self.peak = rss
        return rss

    def run(self) -> None:
        while not self.halt.wait(0.05):
            try:
                self.peak = max(self.peak, int(self.proc.memory_info().rss))
            except psutil.Error:
                return


class StatusWatch:
    """The node's retained status as it changes (paho network thread)."""

    def __init__(self, host: str, port: int, node_id: str, client_id: str) -> None:
        self.seen: list[tuple[float, str, list[str]]] = []
        self.client, _ = connect(host, port, client_id)
        self.client.on_message = self._on_message
        subscribe(self.client, f"edge/{node_id}/status")
        self.client.loop_start()

    def _on_message(self, c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with contextlib.suppress(ContractError):
            s = decode_status(bytes(msg.payload))
            self.seen.append((time.monotonic(), s.state, list(s.reasons)))

    def wait_reason(self, reason: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(reason in r for _, _, r in list(self.seen)):
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class OutboxReader:
    """The node's outbox, read-only, as any SQLite reader would (WAL: never blocks the node)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _c(self) -> sqlite3.Connection | None:
        if self._conn is None and self.path.exists():
            with contextlib.suppress(sqlite3.Error):
                self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        return self._conn

    def answered(self) -> int:
        """Frames answered durably so far (the ``answered`` rows are numbered 1, 2, ...)."""
        c = self._c()
        if c is None:
            return 0
        try:
            return int(c.execute("SELECT coalesce(max(n), 0) FROM answered").fetchone()[0])
        except sqlite3.Error:
            return 0

    def records(self) -> tuple[int, int, float, int]:
        """Result records: count, results they hold, mean payload bytes, most results in one."""
        c = self._c()
        if c is None:
            return 0, 0, 0.0, 0
        row = c.execute(
            "SELECT count(*), coalesce(sum(items), 0), coalesce(avg(length(payload)), 0),"
            " coalesce(max(items), 0) FROM records WHERE kind = 'result'"
        ).fetchone()
        return int(row[0]), int(row[1]), float(row[2]), int(row[3])

    def rows(self) -> int:
        c = self._c()
        if c is None:
            return 0
        with contextlib.suppress(sqlite3.Error):
            return int(c.execute("SELECT count(*) FROM records").fetchone()[0])
        return -1

    def median_payload(self) -> tuple[bytes, int]:
        """The payload of the median-sized result record, and how many results it holds."""
        c = self._c()
        assert c is not None
        n = int(c.execute("SELECT count(*) FROM records WHERE kind = 'result'").fetchone()[0])
        payload, items = c.execute(
            "SELECT payload, items FROM records WHERE kind = 'result'"
            " ORDER BY length(payload) LIMIT 1 OFFSET ?",
            (n // 2,),
        ).fetchone()
        return bytes(payload), int(items)

    def size_mb(self) -> float:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += Path(f"{self.path}{suffix}").stat().st_size
        return total / MB

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---------------------------------------------------------------------------- the run
class OutageBench(Bench):
    """:class:`bench.node_throughput.Bench` (its node, its workers) plus the outage phases."""

    def __init__(self, args: argparse.Namespace, broker: MosquittoProcess, workdir: Path) -> None:
        super().__init__(args, broker, workdir)
        self.base_env = dict(self.extra_env)
        self.base_node_id = self.node_id

    def _procs(self, **workers: int | None) -> dict[str, psutil.Process]:
        procs = {"broker": psutil.Process(self.broker.pid)}
        if self.node is not None:
            procs["node"] = psutil.Process(self.node.pid)
        for name, pid in workers.items():
            if pid is not None:
                procs[name] = psutil.Process(pid)
        return procs

    # -- 1. input baseline ---------------------------------------------------------------
    def input_baseline(self, figures: OutageFigures) -> None:
        f = self.flood("baseline", 1, self.args.frames)
        figures.input_rate = f.rate
        figures.input_publisher_rate = f.publish_rate
        log(
            f"input baseline: bare subscriber {f.rate:,.0f} frames/s "
            f"({f.received:,}/{f.frames:,}; publisher {f.publish_rate:,.0f}/s)"
        )

    # -- output baseline -----------------------------------------------------------------
    def output_flood(self, payload: bytes, count: int, host: str, port: int) -> float:
        topic = f"baseline/out-{os.getpid()}-{self._clients}/results"
        cspec = ConsumeSpec(self.host, self.port, topic, self._client_id("osub"), "frames", count)
        pspec = FloodSpec(
            host,
            port,
            topic,
            count,
            self._client_id("opub"),
            window=DEFAULT_WINDOW,
            payload=payload,
        )
        crep, _, _, _, _ = self._run(cspec, publish_flood, pspec, timeout_s=180)
        if crep.received < count:
            log(f"[red]output baseline: only {crep.received} of {count} received[/]")
        return crep.rate

    def output_baseline(self, figures: OutageFigures, reader: OutboxReader) -> None:
        payload, items = reader.median_payload()
        count = max(2_000, min(50_000, reader.records()[0]))
        figures.output_payload_bytes = len(payload)
        figures.output_items = items
        with TcpProxy(self.host, self.port) as proxy:
            figures.output_rate_proxy = self.output_flood(payload, count, proxy.host, proxy.port)
        figures.output_rate_direct = self.output_flood(payload, count, self.host, self.port)
        log(
            f"output baseline ({len(payload):,}-byte messages holding {items} results, window "
            f"{DEFAULT_WINDOW}): {figures.output_rate_proxy:,.0f} msgs/s through a proxy, "
            f"{figures.output_rate_direct:,.0f} direct"
        )

    def _start_node(self, node_id: str) -> NodeProcess:
        """Start the node and wait for a result. The status says ``online`` as soon as either
        connection is up (the uplink may be first), before the sensor subscription exists:
        a frame is sent every 0.5 s until one is answered."""
        obs = Observer(self.host, self.port, node_id)
        node = NodeProcess(node_id, self.host, self.port, self.workdir, self.extra_env)
        try:
            node.start()
            if not obs.online.wait(30):
                raise RuntimeError(f"node {node_id} not online after 30 s; see {node.log_path}")
            for i in range(60):
                obs.send_frame(i)
                if obs.result.wait(0.5):
                    break
            else:
                raise RuntimeError(f"no result from node {node_id}; see {node.log_path}")
        except BaseException:
            node.stop()
            forget_session(self.host, self.port, node_id)
            raise
        finally:
            obs.close()
        self.node = node
        return node

    # -- 2. one node through one outage --------------------------------------------------
    def outage(self, figures: OutageFigures, proxy: TcpProxy, cap: float, index: int) -> OutageRun:
        args = self.args
        run = OutageRun(cap=cap)
        node_id = f"{self.base_node_id}-o{index}"
        run.node_id = node_id
        self.node_id = node_id
        uplink = {
            "host": proxy.host,
            "port": proxy.port,
            "keepalive_s": 5,
            "connect_timeout_s": 2,
            "reconnect_first_s": args.reconnect_first_s,
            "reconnect_cap_s": args.reconnect_cap_s,
        }
        self.extra_env = {
            **self.base_env,
            "EDGEWISE_UPLINK": json.dumps(uplink),
            "EDGEWISE_HEALTH__UPLINK_GRACE_S": str(args.uplink_grace_s),
            "EDGEWISE_STORAGE__ANSWERED_KEEP": str(2 * args.frames + 100_000),
            "EDGEWISE_STORAGE__DRAIN_MAX_MSGS_PER_S": str(cap),
            "EDGEWISE_LOG_LEVEL": "INFO",
        }
        node = self._start_node(node_id)
        watch = StatusWatch(self.host, self.port, node_id, self._client_id("status"))
        reader = OutboxReader(self.workdir / "state" / f"{node_id}.outbox.db")
        sampler = Sampler(node.pid)
        sampler.start()
        try:
            # a. warm-up: live latency with no backlog
            lat = self.latency("node", args.live_rate, args.warm_s, tag=f"warm{index}")
            run.warm = LiveLatency(lat.sent, lat.received, lat.p50, lat.p95, lat.p99, lat.max)
            log(f"[{node_id}] live latency with no backlog: {run.warm.describe()}")
            time.sleep(1.0)  # the forwarder deletes PUBACKed records within 0.5 s

            # b. the outage
            t_cut = time.monotonic()
            proxy.cut()
            if not watch.wait_reason("uplink_down", args.uplink_grace_s + 10):
                log(f"[yellow][{node_id}] no uplink_down status after the cut[/]")
            run.rss_at_cut_mb = sampler.reset() / MB
            self._store(run, reader, sampler)
            run.rss_peak_mb = sampler.peak / MB
            run.rss_end_mb = sampler.proc.memory_info().rss / MB
            run.records, run.record_items, run.record_avg_bytes, run.record_max_items = (
                reader.records()
            )
            run.outbox_mb = reader.size_mb()
            log(
                f"[{node_id}] offline: {run.answered:,}/{run.frames:,} stored at "
                f"{run.store_rate:,.0f} results/s (publisher {run.publisher_rate:,.0f}/s); RSS "
                f"{run.rss_at_cut_mb:.1f} -> peak {run.rss_peak_mb:.1f} MB; {run.records:,} "
                f"records hold {run.record_items:,} results ({run.outbox_mb:.1f} MB on disk)"
            )

            # c. output baseline, with the size of this node's own results messages
            if index == 0:
                self.output_baseline(figures, reader)

            # d. the drain
            sampler.reset()
            self._drain(run, proxy, reader)
            run.drain_rss_peak_mb = sampler.peak / MB
            log(
                f"[{node_id}] drain (cap {cap:g} msgs/s): {run.backlog_received:,} backlog "
                f"results at {run.drain_rate:,.0f}/s from restore ({run.drain_rate_flowing:,.0f}/s "
                f"flowing; reconnect {run.reconnect_s:.2f} s); live {run.live.describe()}"
            )
            run.statuses = [
                (round(t - t_cut, 2), state + (f": {', '.join(r)}" if r else ""))
                for t, state, r in watch.seen
                if t >= t_cut
            ]
        finally:
            sampler.halt.set()
            watch.close()
            reader.close()
            run.node_exit = node.stop()
            run.node_log_issues = node.log_issues()
            forget_session(self.host, self.port, node_id)
            self.node = None
        return run

    def _store(self, run: OutageRun, reader: OutboxReader, sampler: Sampler) -> None:
        n = self.args.frames
        run.frames = n
        device = f"bench-outage-{self.node_id}"
        before = reader.answered()
        ctx = self.mp
        ready, go = ctx.Event(), ctx.Event()
        out: Any = ctx.Queue()
        spec = FloodSpec(
            self.host,
            self.port,
            f"sensors/{device}/digits",
            n,
            self._client_id("pub"),
            window=self.args.window,
            frames_per_message=self.args.frames_per_message,
        )
        pp = ctx.Process(target=publish_flood, args=(spec, ready, go, out), daemon=True)
        pp.start()
        polls: list[tuple[float, int]] = []
        try:
            self._wait_ready([(ready, pp, out)])
            procs = self._procs(publisher=pp.pid)
            cpu0 = self._cpu(procs)
            t0 = time.monotonic()
            go.set()
            deadline = t0 + 60 + n / 1000
            count = before
            while count < before + n and time.monotonic() < deadline:
                time.sleep(0.01)
                count = reader.answered()
                polls.append((time.monotonic(), count - before))
                if not out.empty() and count < before + n:
                    rep: PublishReport = out.get()
                    if rep.error:
                        raise RuntimeError(rep.error)
                    out.put(rep)
            wall = time.monotonic() - t0
            cpu1 = self._cpu(procs)
            prep: PublishReport = out.get(timeout=30)
        finally:
            pp.join(10)
            if pp.is_alive():
                pp.kill()
                pp.join()
        if prep.error:
            raise RuntimeError(prep.error)
        run.store_cpu = {k: 100 * (cpu1[k] - cpu0[k]) / wall for k in cpu1 if k in cpu0}
        run.publisher_rate = prep.rate * self.args.frames_per_message  # frames/s
        run.answered = polls[-1][1] if polls else 0
        moving = [(t, c) for t, c in polls if c > 0]
        if len(moving) >= 2:
            (t_a, c_a), final = moving[0], moving[-1][1]
            t_b = next(t for t, c in moving if c == final)
            if t_b > t_a:
                run.store_span_s = t_b - t_a
                run.store_rate = (final - c_a) / run.store_span_s

    def _drain(self, run: OutageRun, proxy: TcpProxy, reader: OutboxReader) -> None:
        args = self.args
        device = f"bench-outage-{self.node_id}"
        live_device = f"bench-live-{self.node_id}"
        ctx = self.mp
        c_ready, p_ready, go = ctx.Event(), ctx.Event(), ctx.Event()
        backlog_done, finish, stop = ctx.Event(), ctx.Event(), ctx.Event()
        live_expect: Any = ctx.Value("q", 1 << 40)
        c_out: Any = ctx.Queue()
        p_out: Any = ctx.Queue()
        dspec = DrainSpec(
            self.host,
            self.port,
            f"edge/{self.node_id}/results",
            self._client_id("drain"),
            device,
            run.answered,
            live_device,
            deadline_s=args.drain_timeout_s + 30,
        )
        pspec = PacedSpec(
            self.host,
            self.port,
            f"sensors/{live_device}/digits",
            args.live_rate,
            args.drain_timeout_s,
            self._client_id("live"),
        )
        pc = ctx.Process(
            target=consume_drain,
            args=(dspec, c_ready, backlog_done, finish, live_expect, c_out),
            daemon=True,
        )
        pp = ctx.Process(target=publish_paced, args=(pspec, p_ready, go, p_out, stop), daemon=True)
        pc.start()
        pp.start()
        try:
            self._wait_ready([(c_ready, pc, c_out), (p_ready, pp, p_out)])
            procs = self._procs(publisher=pp.pid, consumer=pc.pid)
            cpu0 = self._cpu(procs)
            accepted = proxy.connections_accepted
            t_restore = time.monotonic()
            wall_restore = time.time()
            go.set()
            proxy.restore()
            reconnect_wall = float("nan")
            deadline = t_restore + args.drain_timeout_s
            while not backlog_done.wait(0.005) and time.monotonic() < deadline:
                if run.reconnect_s != run.reconnect_s and proxy.connections_accepted > accepted:
                    run.reconnect_s = time.monotonic() - t_restore
                    reconnect_wall = time.time()
                if not pc.is_alive():
                    break
            t_done = time.monotonic()
            if not backlog_done.is_set():
                log(f"[red][{self.node_id}] backlog not drained in {args.drain_timeout_s} s[/]")
            stop.set()
            prep: PublishReport = p_out.get(timeout=30)
            live_expect.value = prep.acked
            finish.set()
            crep: DrainReport = c_out.get(timeout=60)
            wall = time.monotonic() - t_restore
            cpu1 = self._cpu(procs)
            while reader.rows() > 0 and time.monotonic() < t_done + 10:
                time.sleep(0.02)
            if reader.rows() == 0:
                run.outbox_empty_s = time.monotonic() - t_restore
        finally:
            for p in (pc, pp):
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()
        for err in (crep.error, prep.error):
            if err:
                raise RuntimeError(err)
        run.drain_cpu = {k: 100 * (cpu1[k] - cpu0[k]) / wall for k in cpu1 if k in cpu0}
        run.backlog_received = crep.backlog_received
        run.backlog_duplicates = crep.backlog_duplicates
        run.backlog_inversions = crep.backlog_inversions
        if crep.backlog_received:
            run.first_backlog_s = crep.backlog_first - t_restore
            run.drain_s = crep.backlog_last - t_restore
            run.drain_rate = crep.backlog_received / run.drain_s
            flowing = crep.backlog_last - crep.backlog_first
            if flowing > 0:
                run.drain_rate_flowing = crep.backlog_received / flowing
        drain_end_wall = wall_restore + (run.drain_s if run.drain_s == run.drain_s else wall)
        during: list[float] = []
        after_reconnect: list[float] = []
        sent_during = 0
        for ts, arrived in zip(crep.live_ts, crep.live_arrived, strict=True):
            if not wall_restore <= ts <= drain_end_wall:
                continue
            sent_during += 1
            ms = (arrived - ts) * 1000
            during.append(ms)
            if ts >= reconnect_wall:
                after_reconnect.append(ms)
            else:
                run.live_behind_backlog += 1
        # Live frames published during the drain whose result never came count as sent.
        sent = min(prep.acked, round((drain_end_wall - wall_restore) * args.live_rate))
        run.live = LiveLatency.of(max(sent, sent_during), during)
        run.live_after_reconnect = LiveLatency.of(len(after_reconnect), after_reconnect)


# ---------------------------------------------------------------------------- main flow
def run(args: argparse.Namespace, command: str) -> OutageFigures:
    t_start = time.monotonic()
    load0 = os.getloadavg()
    caps = [DEFAULT_CAP, 0.0] if args.cap is None else args.cap
    figures = OutageFigures(
        command=command,
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine_info(),
        load_before=(round(load0[0], 2), round(load0[1], 2), round(load0[2], 2)),
        config={
            "frames": args.frames,
            "window": args.window,
            "live_rate": args.live_rate,
            "warm_s": args.warm_s,
            "caps": caps,
            "reconnect": f"{args.reconnect_first_s:g}..{args.reconnect_cap_s:g} s",
            "uplink_grace_s": args.uplink_grace_s,
            "synchronous": args.synchronous or "default (FULL)",
            "max_batch_size": args.max_batch_size or "default (64)",
            "frames_per_message": args.frames_per_message,
        },
    )
    figures.busy_before = psutil.cpu_percent(interval=1.0)
    if figures.busy_before > 10 or load0[0] > 1.0:
        log(
            f"[yellow]the machine is busy ({figures.busy_before:.0f}% CPU, load {load0[0]:.2f})"
            f": other work will disturb the figures[/]"
        )
    workdir = Path(tempfile.mkdtemp(prefix="edgewise-outage-"))
    broker = MosquittoProcess(workdir / "broker")
    broker.start()
    log(f"Mosquitto on {broker.info.url} (pid {broker.pid}); workdir {workdir}")
    bench = OutageBench(args, broker, workdir)
    try:
        bench.input_baseline(figures)
        with TcpProxy(broker.info.host, broker.info.port) as proxy:
            for i, cap in enumerate(caps):
                figures.runs.append(bench.outage(figures, proxy, cap, i))
    finally:
        if bench.node is not None:
            bench.node.stop()
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
def _cap(cap: float) -> str:
    return "no cap" if cap <= 0 else f"cap {cap:,.0f} msgs/s"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def summary_rows(f: OutageFigures) -> list[list[str]]:
    """Rows of the main table: figure, target, one column per run, same-run baseline."""
    rows: list[list[str]] = []
    runs = f.runs
    # the baseline's message holds output_items results: convert with that, not a mean
    out_results = f.output_rate_proxy * f.output_items

    def row(name: str, target: str, cells: list[str], base: str) -> None:
        rows.append([name, target, *cells, base])

    per_message = int(f.config.get("frames_per_message", 1))
    capped = f.input_rate < STORE_TARGET and per_message == 1
    row(
        "offline: results stored/s (uplink cut, first to last stored)",
        f">= {STORE_TARGET:,.0f}/s",
        [
            f"{r.store_rate:,.0f}/s "
            + (_verdict(r.store_rate >= STORE_TARGET) if r.store_rate else "**not measured**")
            for r in runs
        ],
        f"bare subscriber {f.input_rate:,.0f} frames/s"
        + (" (caps the figure below the target)" if capped else "")
        + (f" (one frame per message; the node's flood: {per_message})" if per_message > 1 else ""),
    )
    row(
        "offline: flood publisher frames/s (PUBACKs come from the broker)",
        "-",
        [f"{r.publisher_rate:,.0f}/s" for r in runs],
        f"{f.input_publisher_rate:,.0f}/s",
    )
    row(
        "node RSS growth during the outage (peak - at the cut)",
        f"< {RSS_TARGET_MB:.0f} MB",
        [
            f"{r.rss_peak_mb - r.rss_at_cut_mb:.1f} MB ({r.rss_at_cut_mb:.1f} -> "
            f"{r.rss_peak_mb:.1f}) {_verdict(r.rss_peak_mb - r.rss_at_cut_mb < RSS_TARGET_MB)}"
            for r in runs
        ],
        "-",
    )
    row(
        "outbox records holding the results",
        "-",
        [
            f"{r.records:,} records, {r.record_items:,} results "
            f"({r.record_items / max(1, r.records):.1f} each, max {r.record_max_items}; "
            f"{r.record_avg_bytes:,.0f} B avg; {r.outbox_mb:.1f} MB on disk)"
            for r in runs
        ],
        "-",
    )
    row("restore -> uplink reconnected", "-", [f"{r.reconnect_s:.2f} s" for r in runs], "-")
    row(
        "restore -> first backlog result",
        "-",
        [f"{r.first_backlog_s:.2f} s" for r in runs],
        "-",
    )
    row(
        "drain: backlog results/s (restore to last backlog result)",
        f">= {DRAIN_TARGET:,.0f}/s",
        [
            f"{r.drain_rate:,.0f}/s ({r.backlog_received:,} in {r.drain_s:.2f} s) "
            + _verdict(r.drain_rate >= DRAIN_TARGET and r.backlog_received >= r.answered)
            for r in runs
        ],
        f"bare pub -> sub through a proxy: {f.output_rate_proxy:,.0f} msgs/s "
        f"(~{out_results:,.0f} results/s); direct {f.output_rate_direct:,.0f} msgs/s",
    )
    row(
        "drain: backlog results/s (first to last backlog result)",
        "-",
        [f"{r.drain_rate_flowing:,.0f}/s" for r in runs],
        "-",
    )
    row(
        "drain: duplicates / out-of-order backlog results",
        "-",
        [f"{r.backlog_duplicates:,} / {r.backlog_inversions:,}" for r in runs],
        "-",
    )
    row(
        "restore -> outbox empty",
        "-",
        [f"{r.outbox_empty_s:.2f} s" for r in runs],
        "-",
    )
    for q, name in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"), ("max_ms", "max")):
        cells = []
        for r in runs:
            v = getattr(r.live, q)
            cell = _ms(v)
            if name == "p95":
                cell += " " + _verdict(v <= LIVE_P95_TARGET_S * 1000)
            cells.append(cell)
        warm = [_ms(getattr(r.warm, q)) for r in runs]
        row(
            f"live latency {name} during the drain (frame ts to receipt)",
            f"<= {LIVE_P95_TARGET_S:g} s" if name == "p95" else "-",
            cells,
            "no backlog: " + " / ".join(warm),
        )
    row(
        "live results during the drain (of them, made before the uplink reconnected)",
        "-",
        [f"{r.live.received:,}/{r.live.sent:,} ({r.live_behind_backlog:,})" for r in runs],
        "-",
    )
    row(
        "live p95 / max for frames sent after the uplink reconnected",
        "-",
        [
            f"{_ms(r.live_after_reconnect.p95_ms)} / {_ms(r.live_after_reconnect.max_ms)}"
            for r in runs
        ],
        "-",
    )
    row(
        "node RSS peak during the drain",
        "-",
        [f"{r.drain_rss_peak_mb:.1f} MB" for r in runs],
        "-",
    )
    return rows


def markdown(f: OutageFigures) -> str:
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
        f"Settings: {c['frames']:,} frames flooded during each outage, "
        f"{c.get('frames_per_message', 1)} per message (publisher window "
        f"{c['window']} messages); live frames at {c['live_rate']:g}/s (warm-up "
        f"{c['warm_s']:g} s, and "
        f"through each drain); uplink through a TcpProxy, reconnect backoff {c['reconnect']}, "
        f"health.uplink_grace_s {c['uplink_grace_s']:g}; outbox synchronous {c['synchronous']};"
        f" batching max_batch_size {c['max_batch_size']}; one fresh node per drain cap.\n"
    )
    heads = [_cap(r.cap) for r in f.runs]
    out.append("| figure | target | " + " | ".join(heads) + " | same-run baseline |")
    out.append("|---|---|" + "--:|" * len(heads) + "---|")
    for cells in summary_rows(f):
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append(
        f"Output baseline: a bare paho publisher (window {DEFAULT_WINDOW}, the node's "
        f"`storage.uplink_window`) floods a bare subscriber with the node's median stored "
        f"results message ({f.output_payload_bytes:,} bytes, {f.output_items:g} results); "
        f"results/s = messages/s x the results in that message.\n"
    )
    out.append("CPU % over each phase (100 = one core):\n")
    out.append("| run | phase | " + "CPU % by process |")
    out.append("|---|---|---|")
    for r in f.runs:
        for phase, cpu in (("outage (store)", r.store_cpu), ("drain", r.drain_cpu)):
            out.append(
                f"| {_cap(r.cap)} | {phase} | "
                + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
                + " |"
            )
    out.append("")
    out.append("Node status seen by a subscriber (s after the cut):\n")
    for r in f.runs:
        seq = "; ".join(f"{t:.2f} {s}" for t, s in r.statuses) or "none"
        out.append(f"- {_cap(r.cap)}: {seq}")
    out.append("")
    for r in f.runs:
        out.append(
            f"Node ({_cap(r.cap)}) stop: {r.node_exit}; "
            f"{len(r.node_log_issues)} warning/error lines in its log."
        )
    return "\n".join(out) + "\n"


def print_report(f: OutageFigures) -> None:
    from rich.table import Table

    t = Table(title="edgewise uplink outage benchmark", title_justify="left")
    for col in ("figure", "target", *(_cap(r.cap) for r in f.runs), "same-run baseline"):
        t.add_column(col)
    for row in summary_rows(f):
        t.add_row(*(cell.replace("**", "") for cell in row))
    console.print(t)
    for r in f.runs:
        for line in r.node_log_issues[:10]:
            console.print(f"  node log ({_cap(r.cap)}): {line}", highlight=False, markup=False)


# ---------------------------------------------------------------------------- cli
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.outage",
        description="Benchmark an edgewise node through an uplink outage: results stored "
        "offline, the drain after reconnect and live latency during it.",
    )
    p.add_argument("--frames", type=int, default=100_000, help="frames flooded during each outage")
    p.add_argument("--window", type=int, default=1000, help="flood publisher QoS 1 window")
    p.add_argument(
        "--frames-per-message",
        type=int,
        default=1,
        help="frames per flood message during the outage (> 1: frame batches, ADR 0067); the"
        " input baseline and the live frames stay one per message",
    )
    p.add_argument("--live-rate", type=float, default=100.0, help="live frames/s")
    p.add_argument("--warm-s", type=float, default=3.0, help="live-only warm-up seconds")
    p.add_argument(
        "--cap",
        type=float,
        action="append",
        default=None,
        help=f"storage.drain_max_msgs_per_s of a run (repeatable; default: {DEFAULT_CAP:g}, 0)",
    )
    p.add_argument("--reconnect-first-s", type=float, default=0.1, help="uplink first retry")
    p.add_argument("--reconnect-cap-s", type=float, default=0.5, help="uplink retry cap")
    p.add_argument("--uplink-grace-s", type=float, default=1.0, help="node's health.uplink_grace_s")
    p.add_argument("--drain-timeout-s", type=float, default=300.0, help="give up a drain after")
    p.add_argument("--max-batch-size", type=int, default=None, help="node's max_batch_size")
    p.add_argument("--max-wait-ms", type=float, default=None, help="node's max_wait_ms")
    p.add_argument(
        "--synchronous",
        choices=["OFF", "NORMAL", "FULL", "EXTRA"],
        default=None,
        help="node's EDGEWISE_STORAGE__SYNCHRONOUS (default: the node's own, FULL)",
    )
    p.add_argument("--write", type=Path, default=None, help="update this Markdown file")
    p.add_argument("--label", default="outage", help="which generated block of --write to replace")
    p.add_argument("--json", type=Path, default=None, help="also dump the raw figures here")
    p.add_argument("--keep-workdir", action="store_true", help="keep broker and node logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if mosquitto_path() is None:
        console.print("[red]mosquitto not found[/] (apt-get install mosquitto)")
        return 2
    shown = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python -m bench.outage", *map(shlex.quote, shown)])
    with _sigterm_as_interrupt():
        figures = run(args, command)
    print_report(figures)
    md = markdown(figures)
    if args.write is not None:
        write_markdown(args.write, md, args.label, MARKER)
        log(f"wrote the figures into {args.write} (block {args.label!r})")
    else:
        console.print(md, markup=False, highlight=False)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(figures), indent=2) + "\n")
    return 0


__all__ = ["OutageFigures", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
