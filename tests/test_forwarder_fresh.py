"""The Forwarder against a real Mosquitto, real SQLite and a real TCP proxy: records stored after
the link was last known down (its last failed connect attempt) go out before the backlog on the
next connection, as live ones; records stored before it stay backlog, oldest first; a retained
record never jumps ahead (ADR 0007, ADR 0064)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from edgewise.local_broker import MosquittoProcess, TcpProxy
from edgewise.mqtt import MqttConfig, MqttSession
from edgewise.outbox import AsyncOutbox, Forwarder, OutboxConfig, Record
from tests.bridgeharness import Client
from tests.waiting import eventually


def _records(topic: str, start: int, stop: int) -> list[Record]:
    return [Record("result", topic, b"%06d" % i) for i in range(start, stop)]


async def _store(outbox: AsyncOutbox, forwarder: Forwarder, records: list[Record]) -> None:
    """Append and offer, as the node does with every results message."""
    ids = await outbox.append(records)
    now = time.time()
    forwarder.offer([r.stored(i, now) for r, i in zip(records, ids, strict=True)])


def _attempts_failed(session: MqttSession, n: int) -> bool:
    return session.stats.connect_failures >= n


def test_records_stored_after_the_last_failed_attempt_go_before_the_backlog(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    broker = fresh_mosquitto.info
    sub = Client(broker)
    sub.connect()
    sub.subscribe("fr/#")
    backlog, fresh = 150, 6
    sent_fresh: list[int] = []

    async def scenario() -> None:
        with TcpProxy(broker.host, broker.port) as proxy:
            # Retries 1-2 s apart: room to store the fresh records and restore the link
            # between a failed attempt and the next one.
            mqtt = MqttConfig(
                host=proxy.host, port=proxy.port, reconnect_first_s=2.0, reconnect_cap_s=2.0
            )
            cfg = OutboxConfig(path=tmp_path / "q.db", synchronous="OFF")
            async with AsyncOutbox(cfg) as outbox, MqttSession(mqtt, client_id="fr") as session:
                forwarder = Forwarder(outbox, session, window=16, drain_max_per_s=200)
                task = asyncio.create_task(forwarder.run())
                await session.wait_connected(10)
                proxy.cut()
                await session.wait_disconnected()
                # Stored during the outage, then an attempt fails: these are backlog.
                await _store(outbox, forwarder, _records("fr/r", 0, backlog))
                await _store(outbox, forwarder, [Record("event", "fr/state", b"s1", retain=True)])
                await eventually(
                    lambda: _attempts_failed(session, 1), "a failed attempt", timeout_s=20
                )
                # Stored after it (the link may be back, the next attempt not yet due).
                await _store(outbox, forwarder, _records("fr/r", backlog, backlog + fresh))
                await _store(outbox, forwarder, [Record("event", "fr/state", b"s2", retain=True)])
                failures = session.stats.connect_failures
                proxy.restore()
                await session.wait_connected(20)
                assert session.stats.connect_failures == failures, "an attempt failed meanwhile"
                async with asyncio.timeout(30):
                    await forwarder.wait_idle()
                task.cancel()
                sent_fresh.append(forwarder.stats.fresh)

    try:
        asyncio.run(scenario())
        sub.wait_payload(b"s2", 20)
        got = [m.payload for m in sub.snapshot()]
    finally:
        sub.close()
    results = [p for p in got if p not in (b"s1", b"s2")]
    want_fresh = [b"%06d" % i for i in range(backlog, backlog + fresh)]
    want_backlog = [b"%06d" % i for i in range(backlog)]
    # The fresh records first, in order, then the whole backlog, oldest first.
    assert results[:fresh] == want_fresh
    assert results[fresh:] == want_backlog
    # The retained records in id order, after the backlog stored before them.
    assert got.index(b"s1") > got.index(want_backlog[-1])
    assert got.index(b"s2") > got.index(b"s1")
    assert sent_fresh == [fresh]
