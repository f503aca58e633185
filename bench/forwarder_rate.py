"""The forwarder's drain-rate cap in real time: ``python -m bench.forwarder_rate [--rate R]``.

A backlog of ``--records`` records drains through a :class:`Forwarder` with
``max_rate_per_s=R`` to a Mosquitto of its own; prints the rate achieved after the first burst
(``R / 10`` records) beside the cap, and the same backlog without a cap. The test
(tests/test_bridge_forwarder_rate.py) checks the cap by counting sends against the forwarder's
own clock; this is the figure that check does not give.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from edgewise.local_broker import MosquittoProcess
from edgewise.mqtt import MqttConfig, MqttSession
from edgewise.outbox import AsyncOutbox, Forwarder, OutboxConfig, Record


async def drain_s(broker: MosquittoProcess, db: Path, records: int, rate: float | None) -> float:
    """Seconds from the first PUBACK to the last for ``records`` records stored beforehand."""
    cfg = OutboxConfig(path=db, eviction_order=("result",), synchronous="OFF")
    async with AsyncOutbox(cfg) as outbox:
        await outbox.append([Record("result", f"rate/{i % 3}", b"%d" % i) for i in range(records)])
        mqtt = MqttConfig(host=broker.info.host, port=broker.info.port)
        async with MqttSession(mqtt, client_id="bench-rate-forwarder") as session:
            forwarder = Forwarder(outbox, session, window=100, max_rate_per_s=rate)
            task = asyncio.create_task(forwarder.run())
            first: float | None = None
            while forwarder.stats.delivered < records:
                if first is None and forwarder.stats.delivered > 0:
                    first = time.monotonic()
                await asyncio.sleep(0.001)
            task.cancel()
            return time.monotonic() - (first or time.monotonic())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=300.0, help="the cap, records/s")
    parser.add_argument("--records", type=int, default=1200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rate-") as tmp:
        root = Path(tmp)
        with MosquittoProcess(root / "broker") as broker:
            capped = asyncio.run(drain_s(broker, root / "a.db", args.records, args.rate))
            free = asyncio.run(drain_s(broker, root / "b.db", args.records, None))
    after_burst = args.records - args.rate / 10
    print(f"cap {args.rate:g}/s: {after_burst / capped:.1f} records/s after the first burst")
    print(f"no cap: {args.records / free:.0f} records/s")


if __name__ == "__main__":
    main()
