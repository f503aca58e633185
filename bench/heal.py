"""Healing after an outage: how soon after the broker (or the uplink) is back do results flow?

Issue 16 point 4 asks: after an outage of up to 60 s, results flow again within 3 s of the
broker's return (p95 over repeated runs). Run from the repo root::

    .venv/bin/python -m bench.heal                                  # print the figures
    .venv/bin/python -m bench.heal --write docs/benchmarks.md       # block ``heal``

Set-up: one Mosquitto (the project's tuning, persistence on, as the compose brokers run), and
``--nodes`` real ``edgewise node`` processes with the default reconnect settings (``--schedule
old`` instead makes the waits grow to 30 s as before ADR 0077, for comparison). A paho sensor
publishes a frame (``ts`` = its wall clock, QoS 0, dropped while it is disconnected: no backlog
to flush afterwards) every ``1 / --rate`` s to ``sensors/bench-heal/digits``, which every node
takes; a paho consumer with a persistent session reads every node's results. Both reconnect
every 50 ms after a loss, so what is measured is the nodes' healing. Before each outage the
nodes run normally for ``--settle-s`` (15 s): a connection up for less than
``mqtt.reconnect_reset_after_s`` (10 s) goes on with the schedule of the outage before it.

Each round, for each outage length in ``--outages``:

- ``broker``: the broker is killed (``kill -9``), left down for the outage, and started again on
  the same port (its saved state, as after a crash). *Back* is the moment it is started (its
  own start-up, ~0.1 s, counts against the nodes).
- ``uplink``: each node publishes through its own ``TcpProxy`` (``EDGEWISE_UPLINK``) that is cut
  (every connection reset, new ones refused) for the outage and restored; *back* is the restore.

Per node and round, *heal* is the time from *back* to the arrival of the node's first result for
a frame the sensor published after *back* (results of older frames, drained from the outbox or
redelivered by the broker, do not count: they say nothing about frames flowing again). The
figures are p50 / p95 / max over every node and round. A benchmark, not a test: it asserts
nothing about time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.node_throughput import (
    NodeProcess,
    _sigterm_as_interrupt,
    machine_info,
    write_markdown,
)
from edgewise.cli.frames import load_holdout
from edgewise.local_broker import MosquittoProcess, TcpProxy
from schemas import ContractError, Frame, decode_results, decode_status, encode_frame

TOPIC = "sensors/bench-heal/digits"
MARKER = "<!-- bench:heal:{label}:{end} -->"
OLD_SCHEDULE = {
    f"EDGEWISE_{conn}__RECONNECT_{key}": value
    for conn in ("MQTT", "UPLINK")
    for key, value in (("FAST_CAP_S", "30"), ("CAP_S", "30"), ("FAST_FOR_S", "3600"))
}
"""The waits before ADR 0077, nearly: 0.5 s doubling to 30 s (drawn from [ceiling / 2, ceiling]
where it was [0.25 s, ceiling]), on both of a node's connections."""


def log(msg: str) -> None:
    print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _client(client_id: str, *, persistent: bool) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=not persistent,
    )
    client.reconnect_delay_set(min_delay=0.05, max_delay=0.05)  # type: ignore[arg-type]
    client.max_queued_messages_set(0)
    return client


class Sensor:
    """Publishes a frame (QoS 0) every ``period_s`` from its own thread; while disconnected the
    frames are dropped (no backlog to flush after the outage), and it reconnects every 50 ms."""

    def __init__(self, host: str, port: int, period_s: float) -> None:
        self.client = _client(f"bench-heal-sensor-{uuid.uuid4().hex[:6]}", persistent=False)
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        self._image = load_holdout().images[0]
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seq = 0
        while not self._stop.wait(self._period_s):
            seq += 1
            frame = Frame(seq=seq, ts=time.time(), tensor=self._image)
            with contextlib.suppress(Exception):
                self.client.publish(TOPIC, encode_frame(frame), qos=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Consumer:
    """Every node's results: per node, (arrival wall clock, frame ts) of each result."""

    host: str
    port: int
    arrivals: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    online: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self.client = _client(f"bench-heal-consumer-{uuid.uuid4().hex[:6]}", persistent=True)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("edge/+/#", qos=1)
        self.client.connect(self.host, self.port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        node = msg.topic.split("/")[1]
        try:
            if msg.topic.endswith("/status"):
                if decode_status(cast(bytes, msg.payload)).state == "online":
                    with self.lock:
                        self.online.add(node)
            elif msg.topic.endswith("/results"):
                batch = decode_results(cast(bytes, msg.payload))
                with self.lock:
                    got = self.arrivals.setdefault(node, [])
                    got.extend((now, r.frame_ts or 0.0) for r in batch.results)
        except ContractError:
            pass

    def first_fresh(self, node: str, back_wall: float) -> float | None:
        """Arrival of the node's first result for a frame published at or after ``back_wall``."""
        with self.lock:
            fresh = [a for a, ts in self.arrivals.get(node, []) if ts >= back_wall]
        return min(fresh) if fresh else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Sample:
    kind: str
    outage_s: float
    heals_s: list[float]
    missing: int


def _wait(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench.heal: timed out waiting for {what}")
        time.sleep(0.02)


def _heals(
    consumer: Consumer, nodes: list[NodeProcess], back_wall: float, timeout_s: float
) -> tuple[list[float], int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        firsts = [consumer.first_fresh(n.node_id, back_wall) for n in nodes]
        if all(f is not None for f in firsts):
            break
        time.sleep(0.05)
    firsts = [consumer.first_fresh(n.node_id, back_wall) for n in nodes]
    heals = [f - back_wall for f in firsts if f is not None]
    return heals, sum(f is None for f in firsts)


def run(args: argparse.Namespace) -> tuple[list[Sample], dict[str, str]]:
    samples: list[Sample] = []
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgewise-heal-")))
        state = work / "broker-state"
        state.mkdir()
        broker = MosquittoProcess(
            work / "broker",
            extra_config=f"persistence true\npersistence_location {state}/\nautosave_interval 1",
        )
        info = broker.start()
        proxies = [TcpProxy(info.host, info.port) for _ in range(args.nodes)]
        for p in proxies:
            p.__enter__()
        env_extra = dict(OLD_SCHEDULE) if args.schedule == "old" else {}
        nodes = []
        for i, proxy in enumerate(proxies):
            env = {
                "EDGEWISE_UPLINK__HOST": proxy.host,
                "EDGEWISE_UPLINK__PORT": str(proxy.port),
                "EDGEWISE_LOG_LEVEL": "INFO",
                **env_extra,
            }
            node_id = f"heal-{i}-{uuid.uuid4().hex[:4]}"
            (work / node_id).mkdir()
            nodes.append(NodeProcess(node_id, info.host, info.port, work / node_id, env))
        consumer = Consumer(info.host, info.port)
        consumer.start()
        sensor = Sensor(info.host, info.port, 1.0 / args.rate)
        try:
            for n in nodes:
                n.start()
            _wait(lambda: len(consumer.online) >= len(nodes), 60, "every node online")
            log(f"{len(nodes)} nodes online ({args.schedule} schedule)")
            for rnd in range(args.rounds):
                for kind in args.kinds:
                    for outage in args.outages:
                        # Healthy for a while first: a connection up for less than
                        # mqtt.reconnect_reset_after_s (10 s) would go on with the schedule of
                        # the outage before it (ADR 0077), as a flapping one should.
                        time.sleep(args.settle_s)
                        start = time.time()
                        _wait(
                            lambda t=start: all(consumer.first_fresh(n.node_id, t) for n in nodes),
                            60,
                            "results from every node before the outage",
                        )
                        if kind == "broker":
                            broker.kill()
                            time.sleep(outage)
                            back_wall = time.time()
                            broker.start()
                        else:
                            for p in proxies:
                                p.cut()
                            time.sleep(outage)
                            back_wall = time.time()
                            for p in proxies:
                                p.restore()
                        heals, missing = _heals(consumer, nodes, back_wall, args.give_up_s)
                        samples.append(Sample(kind, outage, heals, missing))
                        log(
                            f"round {rnd + 1}/{args.rounds} {kind} {outage:g} s: heal "
                            + ", ".join(f"{h:.2f}" for h in sorted(heals))
                            + (f" ({missing} not within {args.give_up_s:g} s)" if missing else "")
                        )
        finally:
            sensor.close()
            consumer.close()
            for n in nodes:
                log(f"{n.node_id}: {n.stop()}")
            for p in proxies:
                p.__exit__(None, None, None)
            broker.stop()
    return samples, machine_info()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def table(samples: list[Sample]) -> list[str]:
    rows = [
        "| outage | length | samples | heal p50 (s) | heal p95 (s) | max (s) | not healed |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    keys = sorted({(s.kind, s.outage_s) for s in samples})
    for kind, outage in keys:
        heals = [h for s in samples if (s.kind, s.outage_s) == (kind, outage) for h in s.heals_s]
        missing = sum(s.missing for s in samples if (s.kind, s.outage_s) == (kind, outage))
        what = "broker kill -9, restart" if kind == "broker" else "uplink cut (proxy)"
        rows.append(
            f"| {what} | {outage:g} s | {len(heals)} | {_pct(heals, 50):.2f} |"
            f" {_pct(heals, 95):.2f} | {max(heals, default=float('nan')):.2f} | {missing} |"
        )
    return rows


def markdown(
    args: argparse.Namespace,
    samples: list[Sample],
    machine: dict[str, str],
    load_before: str,
    load_after: str,
) -> str:
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "bench.heal", *sys.argv[1:]])
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Measured {when} with `{command}` ({args.nodes} nodes, {args.rounds} rounds,"
        f" {args.schedule} schedule, sensor {args.rate:g} frames/s); code {machine['code']},"
        f" {machine['cpu']}, {machine['nproc']} cores, Mosquitto {machine['mosquitto']}; load"
        f" average {load_before} before, {load_after} after.",
        "",
        *table(samples),
        "",
    ]
    return "\n".join(lines)


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.heal", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--outages", type=float, nargs="+", default=[3.0, 60.0])
    p.add_argument("--kinds", nargs="+", choices=["broker", "uplink"], default=["broker", "uplink"])
    p.add_argument("--rate", type=float, default=20.0, help="sensor frames per second")
    p.add_argument("--schedule", choices=["default", "old"], default="default")
    p.add_argument("--give-up-s", type=float, default=60.0)
    p.add_argument(
        "--settle-s", type=float, default=15.0, help="normal operation before each outage"
    )
    p.add_argument("--write", type=Path, help="write the block into this markdown file")
    p.add_argument("--workdir", type=Path, help="keep the nodes' logs and state here")
    p.add_argument("--label", default="", help="block label (default: the schedule)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = _load()
    with _sigterm_as_interrupt():  # the nodes and the broker are stopped on SIGTERM too
        samples, machine = run(args)
    body = markdown(args, samples, machine, load_before, _load())
    print(body)
    if args.write is not None:
        write_markdown(args.write, body, args.label or args.schedule, marker=MARKER)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
