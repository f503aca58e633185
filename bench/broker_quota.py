"""Does the broker honour a subscriber's MQTT 5 Receive Maximum once the subscriber acks?

The edge node relies on it: it acknowledges a frame only once its result is safe, and counts on
the Receive Maximum it declares (``mqtt.receive_maximum``, 1000) to bound the QoS 1 frames it
holds. Mosquitto before 2.0.13 mismanages the in-flight quota ("Various fixes around inflight
quota management", mosquitto issue #2306): this check declares Receive Maximum 10, receives,
then acknowledges one message at a time and reports the most messages it held unacknowledged.
A broker that honours the limit never exceeds 10.

``--per-puback`` shows how: with 2,000 messages queued, a subscriber holds its first window,
then sends PUBACKs in groups and reports how many it holds unacknowledged after each group
(docs/adr/0076-intake-bounds.md). A broker that honours the limit stays at the window.

    .venv/bin/python -m bench.broker_quota      # against a fresh Mosquitto with the project tuning
    .venv/bin/python -m bench.broker_quota --per-puback
    .venv/bin/python -m bench.broker_quota --per-puback --broker-option "max_inflight_bytes 10000"
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.workers import connect, subscribe
from edgewise.local_broker import MosquittoProcess


def _pump(clients: list[mqtt.Client], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for c in clients:
            c.loop(0.005)


def _settle(sub: mqtt.Client, got: list[int], quiet_s: float = 0.3, max_s: float = 10.0) -> None:
    """Read until nothing more has come for ``quiet_s`` (paho reads one packet per call)."""
    end = time.monotonic() + max_s
    last, quiet_since = len(got), time.monotonic()
    while time.monotonic() < end:
        sub.loop(0.001)
        if len(got) != last:
            last, quiet_since = len(got), time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return


def _subscriber(
    host: str, port: int, tag: str, topic: str, receive_maximum: int
) -> tuple[mqtt.Client, list[int]]:
    """A connected MQTT 5 subscriber that acknowledges by hand; the mids it received."""
    sub = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-quota-sub-{tag}",
        protocol=mqtt.MQTTv5,
        manual_ack=True,
    )
    got: list[int] = []

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        got.append(msg.mid)

    sub.on_message = on_message
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.ReceiveMaximum = receive_maximum
    connected: list[bool] = []
    sub.on_connect = lambda *a: connected.append(True)
    sub.connect(host, port, clean_start=True, properties=props)
    deadline = time.monotonic() + 10
    while not connected and time.monotonic() < deadline:
        sub.loop(0.05)
    subscribe(sub, topic)
    return sub, got


def max_unacked(host: str, port: int, *, receive_maximum: int = 10, acks: int = 5) -> int:
    """Most QoS 1 messages held unacknowledged by a subscriber declaring ``receive_maximum``
    while it acknowledges ``acks`` of them one by one (200 are queued for it)."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    topic = f"bench/quota/{tag}"
    sub, got = _subscriber(host, port, tag, topic, receive_maximum)
    pub, _ = connect(host, port, f"bench-quota-pub-{tag}", max_inflight=1000)
    try:
        for _ in range(200):
            pub.publish(topic, b"x", qos=1)
        _pump([pub, sub], 0.3)
        worst = len(got)
        for i in range(acks):
            sub.ack(got[i], 1)
            _pump([pub, sub], 0.15)
            worst = max(worst, len(got) - (i + 1))
        return worst
    finally:
        for c in (sub, pub):
            c.disconnect()
            c.loop(0.05)


def unacked_after_pubacks(
    host: str, port: int, *, receive_maximum: int, groups: tuple[int, ...], queued: int = 2000
) -> list[int]:
    """Messages a subscriber declaring ``receive_maximum`` holds unacknowledged: first with
    ``queued`` waiting for it, then after each group of PUBACKs (sent at once, 0.5 s apart)."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    topic = f"bench/quota/{tag}"
    sub, got = _subscriber(host, port, tag, topic, receive_maximum)
    pub, _ = connect(host, port, f"bench-quota-pub-{tag}", max_inflight=1000)
    try:
        for _ in range(queued):
            pub.publish(topic, b"x", qos=1)
        _pump([pub], 2.0)  # the broker has them all before the subscriber reads
        _settle(sub, got)
        held = [len(got)]
        acked = 0
        for n in groups:
            for mid in got[acked : acked + n]:
                sub.ack(mid, 1)
            acked = min(acked + n, len(got))
            _settle(sub, got)
            held.append(len(got) - acked)
        return held
    finally:
        for c in (sub, pub):
            c.disconnect()
            c.loop(0.05)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.broker_quota", description=__doc__)
    p.add_argument("--per-puback", action="store_true", help="what each PUBACK releases")
    p.add_argument(
        "--broker-option",
        action="append",
        default=[],
        help='a mosquitto.conf line added after the tuning, e.g. "max_inflight_messages 10"',
    )
    args = p.parse_args()
    per_puback = args.per_puback
    with tempfile.TemporaryDirectory(prefix="edgewise-quota-") as tmp:
        broker = MosquittoProcess(Path(tmp), extra_config="\n".join(args.broker_option))
        broker.start()
        try:
            worst = max_unacked(broker.info.host, broker.info.port)
            if per_puback:
                for rm, groups in ((10, (1, 5, 5, 10)), (100, (1, 50)), (1000, (1, 1))):
                    held = unacked_after_pubacks(
                        broker.info.host, broker.info.port, receive_maximum=rm, groups=groups
                    )
                    steps = ", ".join(
                        f"{n} PUBACK(s): {h}" for n, h in zip(groups, held[1:], strict=True)
                    )
                    print(f"Receive Maximum {rm}: {held[0]} held at first; then {steps}")
        finally:
            broker.stop()
    verdict = "honoured" if worst <= 10 else "NOT honoured"
    print(f"Receive Maximum 10: the broker had up to {worst} messages unacknowledged ({verdict})")
    return 0 if worst <= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
