"""The drain-rate cap the bridge added to :class:`edgewise.outbox.Forwarder` (``max_rate_per_s``),
against
a real Mosquitto: a backlog drains no faster than the cap, and without a cap as before."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edgewise.local_broker import MosquittoProcess
from edgewise.mqtt import MqttConfig, MqttSession
from edgewise.outbox import AsyncOutbox, Forwarder, OutboxConfig, Record
from tests.bridgeharness import Client


def drain(broker: MosquittoProcess, tmp_path: Path, n: int, rate: float | None) -> list[float]:
    """Append ``n`` records, forward them, return the subscriber's arrival times."""
    sub = Client(broker.info)
    sub.connect()
    sub.subscribe("rate/#")

    async def scenario() -> None:
        cfg = OutboxConfig(path=tmp_path / "q.db", eviction_order=("result",), synchronous="OFF")
        async with AsyncOutbox(cfg) as outbox:
            await outbox.append([Record("result", f"rate/{i % 3}", b"%d" % i) for i in range(n)])
            mqtt = MqttConfig(host=broker.info.host, port=broker.info.port)
            async with MqttSession(mqtt, client_id="rate-forwarder") as session:
                forwarder = Forwarder(outbox, session, window=100, max_rate_per_s=rate)
                task = asyncio.create_task(forwarder.run())
                async with asyncio.timeout(30):
                    await asyncio.to_thread(sub.wait_count, n, 30)
                    await forwarder.wait_idle()
                task.cancel()
                assert forwarder.stats.delivered == n

    try:
        asyncio.run(scenario())
    finally:
        sub.close()
    return [m.at for m in sub.snapshot()]


def test_a_backlog_drains_no_faster_than_the_cap(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    rate, n = 300.0, 600
    arrivals = drain(fresh_mosquitto, tmp_path, n, rate)
    # A lower bound on the time (an upper bound on the rate): only a broken cap fails it.
    assert arrivals[-1] - arrivals[0] >= (n - rate / 10 - 1) / rate * 0.95


def test_without_a_cap_the_backlog_goes_in_windows(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    arrivals = drain(fresh_mosquitto, tmp_path, 600, None)
    assert len(arrivals) == 600


def test_a_cap_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="max_rate_per_s"):
        Forwarder(None, None, max_rate_per_s=0)  # type: ignore[arg-type]
