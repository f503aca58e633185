"""Reconnect backoff as it happens: when does a session with the default settings try again?

An ``MqttSession`` with the default ``MqttConfig`` (``reconnect_first_s`` 0.5, ``reconnect_cap_s``
30) connects to a fresh Mosquitto through a ``TcpProxy``; the proxy is then cut (every
connection reset, new ones refused) for ``--seconds``. Each refused attempt is timed at the
proxy. The table gives the time from the cut to the first retry and every gap after it, against
the promise of issue 3: first retry <= 2 s, never more than 60 s between attempts.

    .venv/bin/python -m bench.reconnect                 # ~100 s, mostly waiting
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from pathlib import Path

from local_broker import MosquittoProcess, TcpProxy
from mqtt_session import MqttConfig, MqttSession


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
    parser.add_argument("--seconds", type=float, default=100.0, help="how long the link is cut")
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
        f"defaults: reconnect_first_s {config.reconnect_first_s}, "
        f"reconnect_cap_s {config.reconnect_cap_s}; link cut for {args.seconds:g} s\n"
    )
    print("| attempt | s after the cut | gap to the previous one (s) |")
    print("|--:|--:|--:|")
    for i, t in enumerate(times):
        gap = "-" if i == 0 else f"{gaps[i - 1]:.2f}"
        print(f"| {i + 1} | {t:.2f} | {gap} |")
    if times:
        first, longest = times[0], max(gaps, default=0.0)
        print(
            f"\nfirst retry {first:.2f} s after the cut (target <= 2 s:"
            f" {'met' if first <= 2 else 'MISSED'}); longest gap {longest:.2f} s"
            f" (target <= 60 s: {'met' if longest <= 60 else 'MISSED'})"
        )


if __name__ == "__main__":
    main()
