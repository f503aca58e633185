"""The drain-rate cap the bridge added to :class:`edgewise.outbox.Forwarder` (``max_rate_per_s``),
against a real Mosquitto: a backlog drains no faster than the cap (sends counted against the
forwarder's own clock, which the test moves), and without a cap as before."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from edgewise.local_broker import MosquittoProcess
from edgewise.mqtt import MqttConfig, MqttSession
from edgewise.outbox import AsyncOutbox, Forwarder, OutboxConfig, Record
from edgewise.outbox import drain as drain_module
from edgewise.outbox import forwarder as forwarder_module
from edgewise.outbox import rate as rate_module
from tests.bridgeharness import Client


@contextlib.asynccontextmanager
async def forwarding(
    broker: MosquittoProcess, tmp_path: Path, n: int, rate: float | None
) -> AsyncIterator[Forwarder]:
    """A forwarder running over a backlog of ``n`` records (on topics ``rate/#``)."""
    cfg = OutboxConfig(path=tmp_path / "q.db", eviction_order=("result",), synchronous="OFF")
    async with AsyncOutbox(cfg) as outbox:
        await outbox.append([Record("result", f"rate/{i % 3}", b"%d" % i) for i in range(n)])
        mqtt = MqttConfig(host=broker.info.host, port=broker.info.port)
        async with MqttSession(mqtt, client_id="rate-forwarder") as session:
            forwarder = Forwarder(outbox, session, window=100, max_rate_per_s=rate)
            task = asyncio.create_task(forwarder.run())
            try:
                yield forwarder
            finally:
                task.cancel()


def with_subscriber(
    broker: MosquittoProcess, scenario: Callable[[Client], Awaitable[None]]
) -> Client:
    """Run ``scenario`` with a subscriber to ``rate/#``; return the subscriber (closed)."""
    sub = Client(broker.info)
    sub.connect()
    sub.subscribe("rate/#")
    try:
        asyncio.run(scenario(sub))
    finally:
        sub.close()
    return sub


def drain(broker: MosquittoProcess, tmp_path: Path, n: int, rate: float | None) -> list[float]:
    """Append ``n`` records, forward them, return the subscriber's arrival times."""

    async def scenario(sub: Client) -> None:
        async with forwarding(broker, tmp_path, n, rate) as forwarder:
            async with asyncio.timeout(30):
                await asyncio.to_thread(sub.wait_count, n, 30)
                await forwarder.wait_idle()
            assert forwarder.stats.delivered == n

    return [m.at for m in with_subscriber(broker, scenario).snapshot()]


class StoppedClock:
    """The forwarder's clock (the ``time`` module of its rate cap, drain loop and figures),
    standing still until the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_backlog_drains_no_faster_than_the_cap(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cap is a token bucket on the forwarder's clock: ``rate`` sends a second, in bursts
    of at most ``rate / 10``. With that clock stopped and moved by the test, the sends it allows
    are counted exactly, on a loaded machine as on an idle one: a burst, then ``rate * step``
    per step, and a long pause refills one burst, no more. (The drain rate it gives in real
    time is a figure: ``python -m bench.forwarder_rate``.)"""
    clock = StoppedClock()
    for module in (rate_module, drain_module, forwarder_module):
        monkeypatch.setattr(module, "time", clock)
    rate, burst = 320.0, 32  # rate / 10
    step_s, per_step, steps = 1 / 16, 20, 8  # rate * step_s, exact in binary floating point
    n = burst + steps * per_step + burst

    async def scenario(sub: Client) -> None:
        async with forwarding(fresh_mosquitto, tmp_path, n, rate) as forwarder:

            async def sent_exactly(expected: int) -> None:
                await asyncio.to_thread(sub.wait_count, expected, 30)
                assert forwarder.stats.published == expected

            await sent_exactly(burst)
            for k in range(1, steps + 1):
                clock.now += step_s
                await sent_exactly(burst + k * per_step)
            clock.now += 10.0  # a long pause: one burst
            await sent_exactly(n)
            clock.now += 10.0  # tokens again, to read past the backlog's end: nothing left
            async with asyncio.timeout(30):
                await forwarder.wait_idle()
            assert forwarder.stats.delivered == n

    with_subscriber(fresh_mosquitto, scenario)


def test_without_a_cap_the_backlog_goes_in_windows(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    arrivals = drain(fresh_mosquitto, tmp_path, 600, None)
    assert len(arrivals) == 600


def test_a_cap_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="max_rate_per_s"):
        Forwarder(None, None, max_rate_per_s=0)  # type: ignore[arg-type]
