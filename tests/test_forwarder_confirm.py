"""The Forwarder's end-to-end mode (docs/adr/0078-end-to-end-acks.md) against a real Mosquitto,
real SQLite and a real TCP proxy: a record of a confirmed kind stays in the outbox after the
broker's PUBACK until :meth:`Forwarder.confirm` names it; unconfirmed, it is sent again (on a
timer and on every new connection); at most ``max_unconfirmed`` are out at once; one evicted
while it waits is forgotten and counted; records of other kinds go as without the mode."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from edgewise.local_broker import MosquittoProcess, TcpProxy
from edgewise.mqtt import MqttConfig, MqttSession
from edgewise.outbox import AsyncOutbox, Confirmation, Forwarder, OutboxConfig, Record, Stored
from tests.bridgeharness import Client
from tests.waiting import eventually

TOPIC = "e2e/results"
OTHER = "e2e/telemetry"


def _key(record: Stored) -> str:
    return record.payload[:8].decode()


def _result(i: int, pad: int = 100) -> Record:
    return Record("result", TOPIC, b"r%07d" % i + b"x" * pad)


def _confirmation(**kwargs: float) -> Confirmation:
    args: dict[str, object] = {"resend_after_s": 60.0, "resend_max_s": 60.0}
    args.update(kwargs)
    return Confirmation(kinds=frozenset({"result"}), key=_key, **args)  # type: ignore[arg-type]


def _outbox(tmp_path: Path, max_bytes: int = 4 * 1024 * 1024) -> AsyncOutbox:
    return AsyncOutbox(
        OutboxConfig(
            path=tmp_path / "q.db",
            max_bytes=max_bytes,
            eviction_order=("telemetry", "result"),
            synchronous="OFF",
        )
    )


@contextlib.asynccontextmanager
async def _forwarding(
    tmp_path: Path, port: int, confirmation: Confirmation, *, max_bytes: int = 4 * 1024 * 1024
) -> AsyncIterator[tuple[AsyncOutbox, Forwarder, MqttSession]]:
    mqtt = MqttConfig(port=port, reconnect_first_s=0.1, reconnect_cap_s=0.3)
    async with (
        _outbox(tmp_path, max_bytes) as outbox,
        MqttSession(mqtt, client_id="e2e-forwarder", persistent=False) as session,
    ):
        forwarder = Forwarder(outbox, session, confirmation=confirmation)
        task = asyncio.get_running_loop().create_task(forwarder.run())
        try:
            await session.wait_connected(10)
            yield outbox, forwarder, session
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _append(outbox: AsyncOutbox, forwarder: Forwarder, records: list[Record]) -> None:
    ids = await outbox.append(records)
    forwarder.offer([r.stored(i, 0.0) for r, i in zip(records, ids, strict=True)])


def _out(sub: Client, n: int) -> bool:
    return len(_received(sub)) >= n


def _received(sub: Client, topic: str = TOPIC) -> Counter[bytes]:
    return Counter(m.payload[:8] for m in sub.snapshot() if m.topic == topic)


def test_a_record_leaves_the_outbox_at_its_confirmation_not_at_its_puback(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    sub = Client(fresh_mosquitto.info)
    sub.connect()
    sub.subscribe("e2e/#")

    async def scenario() -> None:
        async with _forwarding(tmp_path, fresh_mosquitto.info.port, _confirmation()) as (
            outbox,
            forwarder,
            _,
        ):
            await _append(outbox, forwarder, [_result(i) for i in range(5)])
            await _append(outbox, forwarder, [Record("telemetry", OTHER, b"t0000000")])
            await eventually(lambda: forwarder.stats.delivered == 6, "6 PUBACKs", timeout_s=20)
            await forwarder.flush()
            # The telemetry record (not a confirmed kind) went at its PUBACK; results wait.
            assert outbox.stats().rows_by_kind == {"telemetry": 0, "result": 5}
            assert forwarder.unconfirmed == 5
            assert forwarder.confirm(["r0000001", "r0000003", "r0000004"]) == 3
            assert forwarder.confirm(["r0000003", "nobody00"]) == 0  # again, and unknown
            await eventually(
                lambda: outbox.stats().rows_by_kind["result"] == 2, "3 deleted", timeout_s=20
            )
            assert forwarder.stats.confirmed == 3
            assert forwarder.stats.confirmations_unknown == 2
            assert forwarder.unconfirmed == 2
            pending = await outbox.pending(10)
            assert [_key(r) for r in pending] == ["r0000000", "r0000002"]

    asyncio.run(scenario())
    assert _received(sub) == {b"r%07d" % i: 1 for i in range(5)}
    sub.close()


def test_an_unconfirmed_record_is_sent_again_until_confirmed(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    sub = Client(fresh_mosquitto.info)
    sub.connect()
    sub.subscribe(TOPIC)
    confirmation = _confirmation(resend_after_s=0.1, resend_max_s=0.2)

    async def scenario() -> None:
        async with _forwarding(tmp_path, fresh_mosquitto.info.port, confirmation) as (
            outbox,
            forwarder,
            _,
        ):
            await _append(outbox, forwarder, [_result(1), _result(2)])
            await eventually(lambda: forwarder.stats.delivered >= 2, "2 PUBACKs", timeout_s=20)
            forwarder.confirm(["r0000002"])
            await eventually(
                lambda: _received(sub)[b"r0000001"] >= 4, "r1 sent 4 times", timeout_s=20
            )
            assert forwarder.stats.resent >= 3
            forwarder.confirm(["r0000001"])
            await eventually(lambda: outbox.stats().rows == 0, "both deleted", timeout_s=20)
            assert forwarder.unconfirmed == 0

    asyncio.run(scenario())
    got = _received(sub)
    assert got[b"r0000002"] == 1  # confirmed at once: never sent again
    assert got[b"r0000001"] >= 4
    sub.close()


def test_no_more_than_max_unconfirmed_records_are_out_until_confirmations_make_room(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    sub = Client(fresh_mosquitto.info)
    sub.connect()
    sub.subscribe("e2e/#")
    confirmation = _confirmation(max_unconfirmed=3)

    async def scenario() -> None:
        async with _forwarding(tmp_path, fresh_mosquitto.info.port, confirmation) as (
            outbox,
            forwarder,
            session,
        ):
            await _append(outbox, forwarder, [_result(i) for i in range(4)])
            await _append(outbox, forwarder, [_result(i) for i in range(4, 10)])
            out: list[bytes] = []
            for step in range(4):
                want = min(3 * (step + 1), 10)
                await eventually(
                    functools.partial(_out, sub, want), f"{want} records out", timeout_s=20
                )
                async with asyncio.timeout(20):
                    await forwarder.wait_idle()  # nothing more it may send now
                marker = b"mark%04d" % step
                await session.publish("e2e/mark", marker)  # after all it sent, same link
                await asyncio.to_thread(sub.wait_payload, marker, 20)
                got = _received(sub)
                assert len(got) == want, f"step {step}: {sorted(got)}"
                assert forwarder.unconfirmed <= 3
                new = sorted(set(got) - set(out))
                out += new
                forwarder.confirm([k.decode() for k in new])
            await eventually(
                lambda: outbox.stats().rows == 0, "all confirmed and deleted", timeout_s=20
            )

    asyncio.run(scenario())
    assert _received(sub) == {b"r%07d" % i: 1 for i in range(10)}  # in order, each once
    sub.close()


def test_every_unconfirmed_record_is_sent_again_on_a_new_connection(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    sub = Client(fresh_mosquitto.info)
    sub.connect()
    sub.subscribe(TOPIC)

    async def scenario() -> None:
        with TcpProxy(fresh_mosquitto.info.host, fresh_mosquitto.info.port) as proxy:
            async with _forwarding(tmp_path, proxy.port, _confirmation()) as (
                outbox,
                forwarder,
                session,
            ):
                await _append(outbox, forwarder, [_result(i) for i in range(6)])
                await eventually(lambda: forwarder.stats.delivered == 6, "6 PUBACKs", timeout_s=20)
                forwarder.confirm(["r0000000", "r0000001"])
                connection = session.connection
                proxy.cut()
                await eventually(lambda: not session.connected, "the link down", timeout_s=20)
                proxy.restore()
                await eventually(
                    lambda: session.connected and session.connection != connection,
                    "reconnect",
                    timeout_s=20,
                )
                await eventually(
                    lambda: forwarder.stats.delivered == 10, "4 sent again", timeout_s=20
                )
                assert forwarder.stats.resent == 4
                assert outbox.stats().rows == 4
                assert forwarder.unconfirmed == 4

    asyncio.run(scenario())
    got = _received(sub)
    assert got == {
        **{b"r%07d" % i: 1 for i in range(2)},
        **{b"r%07d" % i: 2 for i in range(2, 6)},
    }
    sub.close()


def test_a_record_evicted_while_it_waits_is_forgotten_and_counted(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    # A small outbox; records waiting for a confirmation are not protected from eviction (they
    # may wait long): newer results evict them, and the resend finds them gone.
    confirmation = _confirmation(resend_after_s=0.2, resend_max_s=0.2, max_unconfirmed=5)

    async def scenario() -> None:
        async with _forwarding(
            tmp_path, fresh_mosquitto.info.port, confirmation, max_bytes=256 * 1024
        ) as (outbox, forwarder, _):
            await _append(outbox, forwarder, [_result(i, pad=1000) for i in range(5)])
            await eventually(lambda: forwarder.stats.delivered >= 5, "5 PUBACKs", timeout_s=20)
            # Appended without offering: the forwarder reads them, but may not send them (5
            # are out). Enough to evict the oldest many times over.
            for start in range(5, 1005, 100):
                await outbox.append([_result(i, pad=1000) for i in range(start, start + 100)])
            forwarder.kick()
            evicted = outbox.stats().evicted["result"]
            assert evicted > 5
            await eventually(
                lambda: forwarder.stats.unconfirmed_evicted == 5, "5 forgotten", timeout_s=20
            )
            # Room again: the oldest records still stored go out (and wait in their turn).
            await eventually(lambda: forwarder.unconfirmed == 5, "5 newer ones out", timeout_s=20)
            pending = {_key(r) for r in await outbox.pending(10_000)}
            assert not {f"r{i:07d}" for i in range(5)} & pending

    asyncio.run(scenario())
