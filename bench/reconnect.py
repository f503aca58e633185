"""Reconnect backoff as it happens: when does a session with the default settings try again?

An ``MqttSession`` with the default ``MqttConfig`` (the schedule of ADR 0077: waits of at most
``reconnect_fast_cap_s`` 2 s for the first ``reconnect_fast_for_s`` 60 s of an outage, then
between 5 and 10 s, ``reconnect_cap_s``) connects to a fresh Mosquitto through a ``TcpProxy``;
the proxy is then cut (every connection reset, new ones refused) for ``--seconds``. Each refused
connection is timed at the proxy, so an attempt that cost two TCP connections (the immediate
MQTT 3.1.1 retry before ADR 0077) would show as a 0.00 s gap. The summary holds the figures
against issue 16: a broker back within the first minute is tried within 2 s, and no minute
after the first holds more than 12 attempts.

    .venv/bin/python -m bench.reconnect                 # ~240 s, mostly waiting
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from pathlib import Path

from edgewise.local_broker import MosquittoProcess, TcpProxy
from edgewise.mqtt import MqttConfig, MqttSession


async def attempts_after_cut(proxy: TcpProxy, seconds: float) -> tuple[list[float], MqttConfig]:
    """Seconds from the cut to each refused reconnect attempt."""
    config = MqttConfig(host=proxy.host, port=proxy.port)
    async with MqttSession(config, client_id="bench-reconnect", persistent=False) as session:
        await session.wait_connected(10)
        cut_at = time.monotonic()
        proxy.cut()
        seen, times = proxy.connections_refused, []
        while time.monotonic() - cut_at < seconds:
            await asyncio.sleep(0.005)
            if proxy.connections_refused > seen:
                times.extend([time.monotonic() - cut_at] * (proxy.connections_refused - seen))
                seen = proxy.connections_refused
        return times, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="how long the link is cut")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgewise-bench-") as tmp:
        broker = MosquittoProcess(Path(tmp))
        info = broker.start()
        try:
            with TcpProxy(info.host, info.port) as proxy:
                times, config = asyncio.run(attempts_after_cut(proxy, args.seconds))
        finally:
            broker.stop()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    print(
        f"defaults: reconnect_first_s {config.reconnect_first_s}, reconnect_fast_cap_s"
        f" {config.reconnect_fast_cap_s} for {config.reconnect_fast_for_s:g} s, then"
        f" reconnect_cap_s {config.reconnect_cap_s}; link cut for {args.seconds:g} s\n"
    )
    print("| attempt | s after the cut | gap to the previous one (s) |")
    print("|--:|--:|--:|")
    for i, t in enumerate(times):
        gap = "-" if i == 0 else f"{gaps[i - 1]:.2f}"
        print(f"| {i + 1} | {t:.2f} | {gap} |")
    if times:
        fast = [g for t, g in zip(times, gaps, strict=False) if t < config.reconnect_fast_for_s]
        later = [t for t in times if t >= config.reconnect_fast_for_s]
        most = max(
            (sum(1 for u in later if t <= u < t + 60) for t in later if t + 60 <= args.seconds),
            default=0,
        )
        print(
            f"\nfirst retry {times[0]:.2f} s after the cut; longest gap in the first"
            f" {config.reconnect_fast_for_s:g} s {max([times[0], *fast]):.2f} s (target <= 2 s);"
            f" shortest gap {min(gaps, default=float('nan')):.2f} s (0.00: two TCP connections"
            f" for one attempt); attempts in the first {config.reconnect_fast_for_s:g} s"
            f" {len(times) - len(later)}; most"
            f" attempts in any later 60 s window {most} (target <= 12)"
        )


if __name__ == "__main__":
    main()
