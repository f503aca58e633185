"""Bridge throughput (QoS 1, 200 B) and loss across a cloud-broker restart: the edgewise bridge
against a bare paho subscriber-republisher and Mosquitto's built-in bridge, same run, same rules.

Three "bridges" forward ``edge/+/results`` on a site broker to ``sites/s1/edge/+/results`` on a
cloud broker (two fresh Mosquitto 2.0 processes with the project tuning, loopback):

* ``edgewise``: ``edgewise bridge --config …`` as its own process (durable SQLite queue,
  ``synchronous = FULL`` by default, acks its source only once a message is committed);
* ``paho``: the baseline, a bare paho 2.x subscriber that republishes each message at QoS 1
  from its ``on_message`` (no queue of its own: paho acks the source when the callback returns),
  in its own process, MQTT 5 on both sides like the edgewise bridge (paho's MQTT 5 property
  handling costs about a third of the CPU of each message, so a 3.1.1 baseline would measure
  the protocol, not the bridge), persistent sessions, TCP_NODELAY;
* ``mosquitto``: Mosquitto's built-in bridge in the site broker (``connection`` with
  ``topic edge/+/results out 1 "" sites/s1/``, ``cleansession false``).

Throughput: a paho publisher floods ``--count`` messages (1,000 in flight); a paho consumer on
the cloud broker measures from the first publish to the last distinct message received. The
three alternate ``--rounds`` times; the table gives medians and the ratio edgewise / paho.

Loss across a restart: the publisher sends ``--restart-count`` messages at ``--restart-rate``/s;
a third of the way in the cloud broker is stopped (SIGTERM, persistence on) and started again
``--down-s`` later. A second run does the same and, half-way through the outage, kills the
forwarder holding the backlog (kill -9; for Mosquitto's own bridge that is the site broker,
with persistence on) and starts it again at once. The consumer (persistent session) then
counts the distinct messages that arrived once no new one came for 5 s; missing = sent -
arrived.

    .venv/bin/python -m bench.bridge_throughput                 # ~2 min, prints a Markdown table
    .venv/bin/python -m bench.bridge_throughput --count 5000 --rounds 1 --restart-count 2000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgewise.local_broker import MosquittoProcess

REPO = Path(__file__).resolve().parents[1]
PAYLOAD_BYTES = 200
SITE_TOPIC = "edge/gw-1/results"
CLOUD_FILTER = "sites/s1/edge/+/results"
QUIET_S = 5.0


def _client(client_id: str, *, clean: bool = True, v5: bool = False) -> mqtt.Client:
    if v5:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    else:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.reconnect_delay_set(min_delay=1, max_delay=1)
    c.on_socket_open = _nodelay
    return c


def _nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _connect_v5(client: mqtt.Client, port: int, *, asynchronous: bool = False) -> None:
    """MQTT 5 with a session that outlives the connection (as the edgewise bridge keeps)."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    connect = client.connect_async if asynchronous else client.connect
    connect("127.0.0.1", port, clean_start=False, properties=props)


def _wait(cond: threading.Condition, ready: Callable[[], bool], timeout_s: float) -> bool:
    with cond:
        return cond.wait_for(ready, timeout=timeout_s)


class Consumer:
    """A paho consumer on the cloud broker (persistent session) counting distinct seq numbers."""

    def __init__(self, port: int, tag: str) -> None:
        self.cond = threading.Condition()
        self.seen: set[int] = set()
        self.last_at = 0.0
        self.subscribed = False
        c = _client(f"bench-consumer-{tag}", clean=False)
        c.on_message = self._on_message
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c
        assert _wait(self.cond, lambda: self.subscribed, 10), "consumer never subscribed"

    def _on_connect(self, c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        c.subscribe(CLOUD_FILTER, 1)

    def _on_subscribe(self, c: mqtt.Client, u: Any, mid: int, rc: Any, p: Any) -> None:
        with self.cond:
            self.subscribed = True
            self.cond.notify_all()

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        seq = int(msg.payload[:10])
        with self.cond:
            self.seen.add(seq)
            self.last_at = time.monotonic()
            self.cond.notify_all()

    def reset(self) -> None:
        with self.cond:
            self.seen.clear()

    def wait_for(self, n: int, timeout_s: float) -> bool:
        return _wait(self.cond, lambda: len(self.seen) >= n, timeout_s)

    def settle(self, n: int, timeout_s: float) -> int:
        """Wait for ``n`` messages or for 5 s without a new one; return how many arrived."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if _wait(
                self.cond, lambda: len(self.seen) >= n, min(QUIET_S, deadline - time.monotonic())
            ):
                break
            if time.monotonic() - self.last_at >= QUIET_S:
                break
        with self.cond:
            return len(self.seen)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def payload(seq: int) -> bytes:
    head = b"%010d" % seq
    return head + b"." * (PAYLOAD_BYTES - len(head))


class Publisher:
    def __init__(self, port: int, tag: str) -> None:
        self.cond = threading.Condition()
        self.acked = 0
        c = _client(f"bench-publisher-{tag}", clean=False)
        c.on_publish = self._on_publish
        connected = threading.Event()
        c.on_connect = lambda *a: connected.set()
        c.connect("127.0.0.1", port)
        c.loop_start()
        assert connected.wait(10)
        self.client = c

    def _on_publish(self, c: mqtt.Client, u: Any, mid: int, rc: Any, p: Any) -> None:
        with self.cond:
            self.acked += 1
            self.cond.notify_all()

    def flood(self, start: int, n: int) -> None:
        for i in range(start, start + n):
            self.client.publish(SITE_TOPIC, payload(i), qos=1)

    def paced(self, start: int, n: int, rate: float, at: Callable[[int], None]) -> None:
        t0 = time.monotonic()
        for k in range(n):
            delay = t0 + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.client.publish(SITE_TOPIC, payload(start + k), qos=1)
            at(k)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ------------------------------------------------------------------ the three contestants
def republish(site_port: int, cloud_port: int, v5: bool = True) -> None:
    """The baseline (run in its own process): subscribe on the site, republish to the cloud."""
    cloud = _client("bench-republisher-cloud", v5=v5, clean=False)
    if v5:
        _connect_v5(cloud, cloud_port, asynchronous=True)  # keeps trying while the cloud is away
    else:
        cloud.connect_async("127.0.0.1", cloud_port)
    cloud.loop_start()
    site = _client("bench-republisher-site", v5=v5, clean=False)

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        cloud.publish("sites/s1/" + msg.topic, msg.payload, qos=1, retain=msg.retain)

    site.on_message = on_message
    site.on_connect = lambda c, *a: c.subscribe("edge/+/results", 1)
    if v5:
        _connect_v5(site, site_port)
    else:
        site.connect("127.0.0.1", site_port)
    site.loop_forever()


def edgewise_config(dir: Path, site_port: int, cloud_port: int) -> Path:
    path = dir / "bridge.toml"
    path.write_text(
        f"""bridge_id = "bench"
site = "s1"
log_level = "WARNING"
[site_broker]
port = {site_port}
reconnect_first_s = 0.2
reconnect_cap_s = 1.0
[cloud_broker]
port = {cloud_port}
reconnect_first_s = 0.2
reconnect_cap_s = 1.0
[queue]
dir = "{dir / "queues"}"
[[rules]]
direction = "up"
filter = "edge/+/results"
template = "sites/{{site}}/edge/+/results"
"""
    )
    return path


MOSQUITTO_BRIDGE = """connection bench-cloud
address 127.0.0.1:{cloud_port}
topic edge/+/results out 1 "" sites/s1/
cleansession false
bridge_protocol_version mqttv311
notifications false
restart_timeout 1 2
"""


@dataclass
class Rig:
    """Two brokers and one contestant forwarding between them."""

    kind: str
    site: MosquittoProcess
    cloud: MosquittoProcess
    proc: subprocess.Popen[bytes] | None = None
    args: list[str] | None = None
    log: Any = None

    def launch(self) -> None:
        if self.args is not None:
            self.proc = subprocess.Popen(
                self.args, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO
            )

    def crash_forwarder(self) -> None:
        """kill -9 whatever forwards (for Mosquitto's own bridge: the site broker)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        else:
            self.site.kill()

    def restart_forwarder(self) -> None:
        if self.args is not None:
            self.launch()
        else:
            self.site.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.site.stop()
        self.cloud.stop()


@contextlib.contextmanager
def rig(kind: str, dir: Path) -> Iterator[Rig]:
    dir.mkdir(parents=True, exist_ok=True)
    persist = "persistence true\npersistence_location {}/\n"
    cloud = MosquittoProcess(dir / "cloud", extra_config=persist.format(dir / "cloud"))
    cloud.start()
    site_extra = persist.format(dir / "site")
    if kind == "mosquitto":
        site_extra += MOSQUITTO_BRIDGE.format(cloud_port=cloud.info.port)
    site = MosquittoProcess(dir / "site", extra_config=site_extra)
    site.start()
    log = (dir / f"{kind}.log").open("ab")
    r = Rig(kind, site, cloud, log=log)
    if kind == "edgewise":
        cfg = edgewise_config(dir, site.info.port, cloud.info.port)
        r.args = [sys.executable, "-m", "edgewise.cli.app", "bridge", "--config", str(cfg)]
    elif kind in ("paho", "paho311"):
        r.args = [sys.executable, "-m", "bench.bridge_throughput", "--republish"]
        r.args += [str(site.info.port), str(cloud.info.port), "5" if kind == "paho" else "3"]
    r.launch()
    try:
        yield r
    finally:
        r.stop()
        log.close()


def warm_up(r: Rig, consumer: Consumer, publisher: Publisher) -> None:
    """Until one message crosses: the contestant is connected and subscribed."""
    for attempt in range(100):
        seq = 9_000_000_000 + attempt
        publisher.client.publish(SITE_TOPIC, payload(seq), qos=1)
        if _wait(consumer.cond, lambda s=seq: s in consumer.seen, 0.3):  # type: ignore[misc]
            return
    raise RuntimeError(f"{r.kind}: nothing crossed the bridge")


def throughput(kind: str, dir: Path, n: int) -> float:
    with rig(kind, dir) as r:
        consumer = Consumer(r.cloud.info.port, kind)
        publisher = Publisher(r.site.info.port, kind)
        try:
            warm_up(r, consumer, publisher)
            consumer.reset()
            t0 = time.monotonic()
            publisher.flood(0, n)
            if not consumer.wait_for(n, 300):
                raise RuntimeError(f"{kind}: {len(consumer.seen)}/{n} after 300 s")
            return n / (time.monotonic() - t0)
        finally:
            publisher.close()
            consumer.close()


def restart_loss(
    kind: str, dir: Path, n: int, rate: float, down_s: float, fault: str
) -> tuple[int, int]:
    """(sent, arrived) across a fault a third of the way in: ``cloud`` (the cloud broker
    stopped, started again ``down_s`` later) or ``kill`` (the same, and half-way through the
    outage kill -9 of the forwarder holding the backlog, started again at once)."""
    with rig(kind, dir) as r:
        consumer = Consumer(r.cloud.info.port, kind)
        publisher = Publisher(r.site.info.port, kind)
        try:
            warm_up(r, consumer, publisher)
            consumer.reset()
            restart_at = n // 3
            restarter: list[threading.Thread] = []

            def cloud_down_and_up() -> None:
                # Sleeps here set the outage's length and timing, by design.
                r.cloud.stop()
                if fault == "kill":  # a backlog has built up: crash the forwarder holding it
                    time.sleep(down_s / 2)
                    r.crash_forwarder()
                    r.restart_forwarder()
                    time.sleep(down_s / 2)
                else:
                    time.sleep(down_s)
                r.cloud.start()

            def at(k: int) -> None:
                if k == restart_at:
                    t = threading.Thread(target=cloud_down_and_up)
                    t.start()
                    restarter.append(t)

            publisher.paced(0, n, rate, at)
            for t in restarter:
                t.join()
            arrived = consumer.settle(n, 120)
            return n, arrived
        finally:
            publisher.close()
            consumer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--count", type=int, default=20_000, help="messages per throughput round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--restart-count", type=int, default=6000)
    p.add_argument("--restart-rate", type=float, default=500.0)
    p.add_argument("--down-s", type=float, default=3.0)
    p.add_argument(
        "--republish",
        nargs=3,
        type=int,
        metavar=("SITE_PORT", "CLOUD_PORT", "MQTT_MAJOR"),
        help=argparse.SUPPRESS,
    )
    args = p.parse_args(argv)
    if args.republish:
        site_port, cloud_port, version = args.republish
        republish(site_port, cloud_port, v5=version == 5)
        return 0
    kinds = ("paho", "edgewise", "mosquitto")
    measured = ("paho", "paho311", "edgewise", "mosquitto")
    rates: dict[str, list[float]] = {k: [] for k in measured}
    losses: dict[str, tuple[int, int]] = {}
    kills: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
        root = Path(tmp)
        for rnd in range(args.rounds):
            for kind in measured:
                rate = throughput(kind, root / f"t{rnd}-{kind}", args.count)
                rates[kind].append(rate)
                print(f"round {rnd + 1} {kind:9s} {rate:8.0f} msg/s", file=sys.stderr, flush=True)
        for kind in kinds:
            for fault, into in (("cloud", losses), ("kill", kills)):
                into[kind] = restart_loss(
                    kind,
                    root / f"{fault}-{kind}",
                    args.restart_count,
                    args.restart_rate,
                    args.down_s,
                    fault,
                )
                sent, arrived = into[kind]
                print(
                    f"{fault:5s} {kind:9s} {sent - arrived} of {sent} missing",
                    file=sys.stderr,
                    flush=True,
                )
    med = {k: statistics.median(v) for k, v in rates.items()}
    names = {
        "paho": "bare paho subscriber-republisher, MQTT 5 (baseline)",
        "paho311": "bare paho subscriber-republisher, MQTT 3.1.1",
        "edgewise": "edgewise bridge (durable queue, FULL)",
        "mosquitto": "Mosquitto 2.0 built-in bridge",
    }
    print(f"\nedgewise / paho on MQTT 3.1.1: {med['edgewise'] / med['paho311']:.2f}")
    print(
        f"\nQoS 1, {PAYLOAD_BYTES} B, {args.count:,} messages x {args.rounds} rounds; restart:"
        f" {args.restart_count:,} at {args.restart_rate:.0f}/s, cloud broker down {args.down_s:g} s"
        f" ({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})\n"
    )
    print(
        "| forwarder | msg/s (median) | runs | vs baseline |"
        " missing after a cloud-broker restart | ... with kill -9 of the forwarder during it |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for kind in measured:
        if kind not in losses:
            runs = ", ".join(f"{r:.0f}" for r in rates[kind])
            print(
                f"| {names[kind]} | {med[kind]:,.0f} | {runs} | {med[kind] / med['paho']:.2f} |"
                " (not run) | (not run) |"
            )
            continue
        sent, arrived = losses[kind]
        ksent, karrived = kills[kind]
        runs = ", ".join(f"{r:.0f}" for r in rates[kind])
        print(
            f"| {names[kind]} | {med[kind]:,.0f} | {runs} | {med[kind] / med['paho']:.2f} |"
            f" {sent - arrived} of {sent:,} | {ksent - karrived} of {ksent:,} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
