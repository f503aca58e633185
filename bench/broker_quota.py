"""Does the broker honour a subscriber's MQTT 5 Receive Maximum once the subscriber acks?

The edge node relies on it: it acknowledges a frame only once its result is safe, and counts on
the Receive Maximum it declares (``mqtt.receive_maximum``, 1000) to bound the QoS 1 frames it
holds. Mosquitto before 2.0.13 mismanages the in-flight quota ("Various fixes around inflight
quota management", mosquitto issue #2306): this check declares Receive Maximum 10, receives,
then acknowledges one message at a time and reports the most messages it held unacknowledged.
A broker that honours the limit never exceeds 10.

    .venv/bin/python -m bench.broker_quota      # against a fresh Mosquitto with the project tuning
"""

from __future__ import annotations

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
from local_broker import MosquittoProcess


def _pump(clients: list[mqtt.Client], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for c in clients:
            c.loop(0.005)


def max_unacked(host: str, port: int, *, receive_maximum: int = 10, acks: int = 5) -> int:
    """Most QoS 1 messages held unacknowledged by a subscriber declaring ``receive_maximum``
    while it acknowledges ``acks`` of them one by one (200 are queued for it)."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    topic = f"bench/quota/{tag}"
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


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="edgewise-quota-") as tmp:
        broker = MosquittoProcess(Path(tmp))
        broker.start()
        try:
            worst = max_unacked(broker.info.host, broker.info.port)
        finally:
            broker.stop()
    verdict = "honoured" if worst <= 10 else "NOT honoured"
    print(f"Receive Maximum 10: the broker had up to {worst} messages unacknowledged ({verdict})")
    return 0 if worst <= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
