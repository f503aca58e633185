"""The Forwarder against a real Mosquitto, real SQLite and a real TCP proxy that holds PUBACKs:
eviction counts exactly what is missing downstream, also for records a broker may already have
(acknowledged but not yet deleted, or in flight when the link broke; ADR 0063); and retained
records never overtake older stored ones (the last one sent is the state)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from edgewise.local_broker import MosquittoProcess, TcpProxy
from edgewise.mqtt import MqttConfig, MqttSession
from edgewise.outbox import AsyncOutbox, Forwarder, OutboxConfig, Record
from tests.bridgeharness import Client, retained_state
from tests.waiting import eventually

TOPIC = "ev/results"


def _records(start: int, stop: int) -> list[Record]:
    return [Record("result", TOPIC, b"%06d" % i + b"x" * 194) for i in range(start, stop)]


def _outbox(tmp_path: Path) -> AsyncOutbox:
    # 256 KiB: room for about 600 of these records.
    cfg = OutboxConfig(
        path=tmp_path / "q.db",
        max_bytes=256 * 1024,
        eviction_order=("event", "result"),
        synchronous="OFF",
    )
    return AsyncOutbox(cfg)


async def _missing_after_drain(
    session: MqttSession, forwarder: Forwarder, sub: Client, total: int
) -> int:
    """Wait until the forwarder has sent everything, then count what never arrived."""
    forwarder.kick()
    async with asyncio.timeout(60):
        await forwarder.wait_idle()
        await session.publish(TOPIC, b"control")  # after everything, on the same connection
    await asyncio.to_thread(sub.wait_payload, b"control", 20)
    got = {m.payload[:6] for m in sub.snapshot() if m.payload != b"control"}
    return total - len(got)


def test_records_acknowledged_but_not_yet_deleted_are_not_evicted(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    broker = fresh_mosquitto.info
    sub = Client(broker)
    sub.connect()
    sub.subscribe("ev/#")
    first, more = 200, 1500

    async def scenario() -> None:
        mqtt = MqttConfig(host=broker.host, port=broker.port)
        async with _outbox(tmp_path) as outbox, MqttSession(mqtt, client_id="ev-ack") as session:
            # Deletes wait (batched): acknowledged records stay in the outbox meanwhile.
            forwarder = Forwarder(outbox, session, window=64, delete_linger_s=3600)
            task = asyncio.create_task(forwarder.run())
            await session.wait_connected(10)
            await outbox.append(_records(0, first))
            forwarder.kick()
            await eventually(
                lambda: forwarder.stats.delivered == first, f"{first} delivered", timeout_s=20
            )
            assert outbox.stats().rows == first  # delivered, not deleted yet
            await outbox.append(_records(first, first + more))  # far past the bound
            evicted = outbox.stats().evicted_items["result"]
            assert evicted > 0, "the outbox never filled up"
            missing = await _missing_after_drain(session, forwarder, sub, first + more)
            task.cancel()
        assert missing == evicted

    try:
        asyncio.run(scenario())
    finally:
        sub.close()


def test_records_in_flight_when_the_link_broke_are_not_evicted(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    broker = fresh_mosquitto.info
    sub = Client(broker)
    sub.connect()
    sub.subscribe("ev/#")
    first, doubt, more = 100, 30, 1500

    async def scenario() -> None:
        with TcpProxy(broker.host, broker.port) as proxy:
            mqtt = MqttConfig(
                host=proxy.host, port=proxy.port, reconnect_first_s=0.1, reconnect_cap_s=0.5
            )
            async with (
                _outbox(tmp_path) as outbox,
                MqttSession(mqtt, client_id="ev-doubt") as session,
            ):
                forwarder = Forwarder(outbox, session, window=64)
                task = asyncio.create_task(forwarder.run())
                await session.wait_connected(10)
                await outbox.append(_records(0, first))
                forwarder.kick()
                await eventually(
                    lambda: forwarder.stats.delivered == first, f"{first} delivered", timeout_s=20
                )
                await forwarder.flush()
                # The broker gets the next records and delivers them; their PUBACKs are held,
                # and the link breaks: the forwarder cannot know they arrived.
                proxy.pause_replies()
                await outbox.append(_records(first, first + doubt))
                forwarder.kick()
                await asyncio.to_thread(sub.wait_count, first + doubt, 20)
                assert forwarder.in_flight == doubt
                proxy.cut()
                await session.wait_disconnected()
                await outbox.append(_records(first + doubt, first + doubt + more))
                evicted = outbox.stats().evicted_items["result"]
                assert evicted > 0, "the outbox never filled up"
                proxy.restore()
                await session.wait_connected(20)
                total = first + doubt + more
                missing = await _missing_after_drain(session, forwarder, sub, total)
                task.cancel()
        assert missing == evicted

    try:
        asyncio.run(scenario())
    finally:
        sub.close()


def test_a_retained_record_never_overtakes_an_older_stored_one(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    broker = fresh_mosquitto.info

    async def scenario() -> None:
        mqtt = MqttConfig(host=broker.host, port=broker.port)
        async with _outbox(tmp_path) as outbox, MqttSession(mqtt, client_id="ev-ret") as session:
            # A backlog (stored while the link was down), its last record a retained event.
            await outbox.append(_records(0, 100))
            await outbox.append([Record("event", "ev/state", b"old", retain=True)])
            forwarder = Forwarder(outbox, session, window=64, drain_max_per_s=100)
            task = asyncio.create_task(forwarder.run())
            await session.wait_connected(10)
            new = Record("event", "ev/state", b"new", retain=True)
            (rid,) = await outbox.append([new])
            forwarder.offer([new.stored(rid, time.time())])  # a fresh event, made live
            async with asyncio.timeout(30):
                await forwarder.wait_idle()
            task.cancel()

    asyncio.run(scenario())
    state = retained_state(broker, "ev/#", "ev/zz")
    assert state.get("ev/state") == b"new"


def test_what_the_broker_acknowledged_is_deleted_when_the_link_drops_not_at_the_next_one(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    """A crash during an outage then resends only what was in flight when it began."""
    broker = fresh_mosquitto.info

    async def scenario() -> None:
        with TcpProxy(broker.host, broker.port) as proxy:
            mqtt = MqttConfig(
                host=proxy.host, port=proxy.port, reconnect_first_s=0.1, reconnect_cap_s=0.5
            )
            async with _outbox(tmp_path) as outbox, MqttSession(mqtt, client_id="ev-cut") as s:
                # Deletes wait (batched) for an hour: only the link drop can flush them.
                forwarder = Forwarder(outbox, s, window=64, delete_linger_s=3600)
                task = asyncio.create_task(forwarder.run())
                await s.wait_connected(10)
                await outbox.append(_records(0, 200))
                forwarder.kick()
                await eventually(
                    lambda: forwarder.stats.delivered == 200, "200 delivered", timeout_s=20
                )
                assert outbox.stats().rows == 200  # acknowledged, not deleted yet
                proxy.cut()  # and it stays cut: no next connection
                await eventually(lambda: not s.connected, "the link to drop", timeout_s=20)
                await eventually(
                    lambda: outbox.stats().rows == 0, "the deletes at the drop", timeout_s=20
                )
                assert outbox.stats().deleted["result"] == 200
                task.cancel()

    asyncio.run(scenario())
