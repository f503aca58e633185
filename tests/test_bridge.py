"""The bridge in-process against two real Mosquitto brokers: rules, retained convergence, no
echoes, bounds, Receive Maximum, drain-rate cap, status and telemetry.

Every scenario runs in ``asyncio.run`` under an ``asyncio.timeout``; waits block on events
(a message arriving, a counter reaching a value), never on a bare sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from broker_bridge import Bridge, BridgeConfig, decode_telemetry
from edgewise.local_broker import MosquittoProcess
from schemas import decode_status
from tests.bridgeharness import Client, Rule, retained_state, write_bridge_config
from tests.conftest import BrokerFactory
from tests.waiting import eventually

T = TypeVar("T")

UP_RESULTS = Rule("up", "edge/+/results", "sites/{site}/edge/+/results")
UP_STATUS = Rule("up", "edge/+/status", "sites/{site}/edge/+/status")
DOWN_FLEET = Rule("down", "fleet/#")
DOWN_CMD = Rule("down", "sites/{site}/edge/+/cmd", "edge/+/cmd")


def config(
    tmp_path: Path,
    site: MosquittoProcess,
    cloud: MosquittoProcess,
    rules: Sequence[Rule],
    **kwargs: object,
) -> BridgeConfig:
    path = write_bridge_config(tmp_path / "bridge.toml", site.info, cloud.info, rules, **kwargs)  # type: ignore[arg-type]
    return BridgeConfig.load(path)


def run(scenario: Callable[[], Awaitable[T]], timeout_s: float = 50.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout_s):
            return await scenario()

    return asyncio.run(bounded())


def connected(broker: MosquittoProcess, **kwargs: object) -> Client:
    c = Client(broker.info, **kwargs)  # type: ignore[arg-type]
    c.connect()
    return c


# -- rules ------------------------------------------------------------------------------------


def test_rules_map_topics_up_and_down_with_templates(
    tmp_path: Path, fresh_mosquitto: MosquittoProcess, cloud_mosquitto: MosquittoProcess
) -> None:
    cfg = config(tmp_path, fresh_mosquitto, cloud_mosquitto, [UP_RESULTS, DOWN_FLEET, DOWN_CMD])

    async def scenario() -> None:
        cloud_sub = connected(cloud_mosquitto)
        cloud_sub.subscribe("#")
        site_sub = connected(fresh_mosquitto)
        site_sub.subscribe("fleet/#")
        site_sub.subscribe("edge/+/cmd")
        site_pub, cloud_pub = connected(fresh_mosquitto), connected(cloud_mosquitto)
        async with Bridge(cfg) as bridge:
            await bridge.wait_ready(10)
            site_pub.publish("edge/gw-1/results", b"r1")
            site_pub.publish("edge/gw-1/telemetry", b"not bridged")
            cloud_pub.publish("fleet/cam/models/digits", b"m1")
            cloud_pub.publish("fleet", b"bare")  # '#' also matches the parent level
            cloud_pub.publish("sites/s1/edge/gw-2/cmd", b"c1")
            cloud_pub.publish("sites/s2/edge/gw-2/cmd", b"other site")
            got = await asyncio.to_thread(cloud_sub.wait_payload, b"r1", 10)
            assert got.topic == "sites/s1/edge/gw-1/results"
            for payload, topic in (
                (b"m1", "fleet/cam/models/digits"),
                (b"bare", "fleet"),
                (b"c1", "edge/gw-2/cmd"),
            ):
                got = await asyncio.to_thread(site_sub.wait_payload, payload, 10)
                assert got.topic == topic
            # Positive controls sent after the messages that must not cross.
            site_pub.publish("edge/gw-9/results", b"control-up")
            cloud_pub.publish("sites/s1/edge/gw-9/cmd", b"control-down")
            await asyncio.to_thread(cloud_sub.wait_payload, b"control-up", 10)
            await asyncio.to_thread(site_sub.wait_payload, b"control-down", 10)
            assert b"not bridged" not in {
                m.payload for m in cloud_sub.snapshot() if "sites/" in m.topic
            }
            assert b"other site" not in {m.payload for m in site_sub.snapshot()}
        for c in (cloud_sub, site_sub, site_pub, cloud_pub):
            c.close()

    run(scenario)


# -- retained convergence ---------------------------------------------------------------------


def test_retained_state_converges_up_including_a_clear_made_while_cloud_was_down(
    tmp_path: Path,
    fresh_mosquitto: MosquittoProcess,
    persistent_cloud_mosquitto: MosquittoProcess,
) -> None:
    site, cloud = fresh_mosquitto, persistent_cloud_mosquitto
    cfg = config(tmp_path, site, cloud, [UP_STATUS])

    async def scenario() -> None:
        pub = connected(site)
        async with Bridge(cfg) as bridge:
            await bridge.wait_ready(10)
            pub.publish("edge/n1/status", b"n1-online", retain=True)
            pub.publish("edge/n2/status", b"n2-online", retain=True)
            await eventually(
                lambda: bridge.up.forwarder.stats.delivered >= 2,  # type: ignore[union-attr]
                "2 delivered",
                timeout_s=10,
            )
            state = await asyncio.to_thread(
                retained_state, cloud.info, "sites/s1/edge/+/status", "sites/s1/edge/zz/status"
            )
            assert state == {
                "sites/s1/edge/n1/status": b"n1-online",
                "sites/s1/edge/n2/status": b"n2-online",
            }
            await asyncio.to_thread(cloud.stop)
            await bridge.cloud.wait_disconnected()
            pub.publish("edge/n1/status", b"", retain=True)  # the clear
            pub.publish("edge/n2/status", b"n2-degraded", retain=True)
            pub.publish("edge/n3/status", b"n3-online", retain=True)
            await eventually(lambda: bridge.up.stats.queued >= 5, "5 queued", timeout_s=10)
            await asyncio.to_thread(cloud.start)
            await bridge.cloud.wait_connected(20)
            await eventually(
                lambda: bridge.up.forwarder.stats.delivered >= 5,  # type: ignore[union-attr]
                "5 delivered",
                timeout_s=20,
            )
            site_state = await asyncio.to_thread(
                retained_state, site.info, "edge/+/status", "edge/zz/status"
            )
            cloud_state = await asyncio.to_thread(
                retained_state, cloud.info, "sites/s1/edge/+/status", "sites/s1/edge/zz/status"
            )
        pub.close()
        assert site_state == {"edge/n2/status": b"n2-degraded", "edge/n3/status": b"n3-online"}
        assert cloud_state == {
            "sites/s1/" + topic: payload for topic, payload in site_state.items()
        }

    run(scenario)


def test_retained_state_converges_down_including_a_clear_made_while_site_was_down(
    tmp_path: Path,
    persistent_mosquitto: MosquittoProcess,
    cloud_mosquitto: MosquittoProcess,
) -> None:
    site, cloud = persistent_mosquitto, cloud_mosquitto
    cfg = config(tmp_path, site, cloud, [DOWN_FLEET])

    async def scenario() -> None:
        op = connected(cloud)
        async with Bridge(cfg) as bridge:
            await bridge.wait_ready(10)
            op.publish("fleet/cam/models/digits", b"manifest-3", retain=True)
            op.publish("fleet/cam/models/old", b"manifest-1", retain=True)
            await eventually(
                lambda: bridge.down.forwarder.stats.delivered >= 2,  # type: ignore[union-attr]
                "2 delivered",
                timeout_s=10,
            )
            await asyncio.to_thread(site.stop)
            await bridge.site.wait_disconnected()
            op.publish("fleet/cam/models/old", b"", retain=True)  # retire a model: a clear
            op.publish("fleet/cam/models/digits", b"manifest-4", retain=True)
            await eventually(lambda: bridge.down.stats.queued >= 4, "4 queued", timeout_s=10)
            await asyncio.to_thread(site.start)
            await bridge.site.wait_connected(20)
            await eventually(
                lambda: bridge.down.forwarder.stats.delivered >= 4,  # type: ignore[union-attr]
                "4 delivered",
                timeout_s=20,
            )
            cloud_state = await asyncio.to_thread(retained_state, cloud.info, "fleet/#", "fleet/zz")
            site_state = await asyncio.to_thread(retained_state, site.info, "fleet/#", "fleet/zz")
        op.close()
        assert cloud_state == {"fleet/cam/models/digits": b"manifest-4"}
        assert site_state == cloud_state

    run(scenario)


# -- no echoes --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_10000_messages_over_bidirectional_overlapping_rules_make_no_echo(
    tmp_path: Path,
    fresh_mosquitto: MosquittoProcess,
    cloud_mosquitto: MosquittoProcess,
    protocol: str,
) -> None:
    site, cloud = fresh_mosquitto, cloud_mosquitto
    rules = [Rule("up", "shared/#"), Rule("down", "shared/#")]
    cfg = config(tmp_path, site, cloud, rules, protocol=protocol)
    half = 5000
    v = MQTTProtocolVersion.MQTTv5 if protocol == "5" else MQTTProtocolVersion.MQTTv311

    async def scenario() -> None:
        site_sub, cloud_sub = connected(site, protocol=v), connected(cloud, protocol=v)
        site_sub.subscribe("shared/#")
        cloud_sub.subscribe("shared/#")
        site_pub, cloud_pub = connected(site, protocol=v), connected(cloud, protocol=v)
        async with Bridge(cfg) as bridge:
            await bridge.wait_ready(10)
            assert bridge.site.protocol == protocol
            for i in range(half):
                site_pub.publish(f"shared/site/{i % 10}", b"s%d" % i, wait=False)
                cloud_pub.publish(f"shared/cloud/{i % 10}", b"c%d" % i, wait=False)
            await asyncio.to_thread(site_sub.wait_count, 2 * half, 45)
            await asyncio.to_thread(cloud_sub.wait_count, 2 * half, 45)
            # Controls through both directions: anything echoed earlier is queued before them.
            site_pub.publish("shared/site/end", b"end-up")
            await asyncio.to_thread(cloud_sub.wait_payload, b"end-up", 10)
            cloud_pub.publish("shared/cloud/end", b"end-down")
            await asyncio.to_thread(site_sub.wait_payload, b"end-down", 10)
            await asyncio.to_thread(site_sub.wait_payload, b"end-up", 10)
            await asyncio.to_thread(cloud_sub.wait_payload, b"end-down", 10)
            telemetry = bridge.telemetry()
        for side in (site_sub, cloud_sub):
            payloads = [m.payload for m in side.snapshot()]
            assert len(payloads) == 2 * half + 2, f"{len(payloads) - 2 * half - 2} echoes"
            assert len(set(payloads)) == len(payloads)
        assert telemetry.up.delivered == half + 1
        assert telemetry.down.delivered == half + 1
        if protocol == "3.1.1":
            assert telemetry.up.echoes_dropped == half + 1  # what the broker sent back
            assert telemetry.down.echoes_dropped == half + 1
        else:
            assert telemetry.up.echoes_dropped == telemetry.down.echoes_dropped == 0  # No Local
        for c in (site_sub, cloud_sub, site_pub, cloud_pub):
            c.close()

    run(scenario, 58)


# -- bounds and flow control ------------------------------------------------------------------


def test_queue_bound_evicts_and_counts_exactly_what_is_missing_downstream(
    tmp_path: Path, fresh_mosquitto: MosquittoProcess, persistent_cloud_mosquitto: MosquittoProcess
) -> None:
    site, cloud = fresh_mosquitto, persistent_cloud_mosquitto
    cfg = config(tmp_path, site, cloud, [UP_RESULTS], queue="up_max_bytes = 131072")
    n = 3000

    async def scenario() -> None:
        sub = Client(cloud.info, clean=False, client_id="bound-sub")
        sub.connect()
        sub.subscribe("sites/#")
        pub = connected(site)
        async with Bridge(cfg) as bridge:
            await bridge.wait_ready(10)
            await asyncio.to_thread(cloud.stop)
            await bridge.cloud.wait_disconnected()
            for i in range(n):
                pub.publish("edge/gw-1/results", b"%06d" % i + b"x" * 194, wait=False)
            await eventually(lambda: bridge.up.stats.queued >= n, f"{n} queued", timeout_s=30)
            stats = bridge.up.outbox.stats()
            assert stats.evicted_total > 0
            assert stats.file_bytes <= 131072
            await asyncio.to_thread(cloud.start)
            await eventually(
                lambda: bridge.up.outbox.stats().rows == 0 and bridge.up.forwarder.in_flight == 0,  # type: ignore[union-attr]
                "queue drained",
                timeout_s=30,
            )
            # Control: one more after the backlog, so the subscriber has seen everything.
            pub.publish("edge/gw-1/results", b"control")
            await asyncio.to_thread(sub.wait_payload, b"control", 20)
            telemetry = bridge.telemetry()
        got = {m.payload[:6] for m in sub.snapshot() if m.payload != b"control"}
        missing = n - len(got)
        assert telemetry.up.evicted == missing > 0
        # Oldest evicted first: what arrived is the newest contiguous tail.
        assert got == {b"%06d" % i for i in range(missing, n)}
        sub.close()
        pub.close()

    run(scenario)


def test_eviction_says_degraded_evicting_logs_counts_per_rule_and_clears_below_the_bound(
    tmp_path: Path,
    fresh_mosquitto: MosquittoProcess,
    persistent_cloud_mosquitto: MosquittoProcess,
    caplog: pytest.LogCaptureFixture,
) -> None:
    site, cloud = fresh_mosquitto, persistent_cloud_mosquitto
    up_fleet = Rule("up", "fleet/#")
    cfg = config(tmp_path, site, cloud, [UP_RESULTS, up_fleet], queue="up_max_bytes = 131072")
    results_label = "edge/+/results -> sites/s1/edge/+/results"
    n = 1500  # of each: ~600 KB against a 128 KiB queue

    def last_status(watcher: Client) -> tuple[str, list[str]] | None:
        for m in reversed(watcher.snapshot()):
            if m.topic.endswith("/status"):
                s = decode_status(m.payload)
                return s.state, list(s.reasons)
        return None

    async def scenario() -> None:
        caplog.set_level("INFO", logger="broker_bridge")
        sub = Client(cloud.info, clean=False, client_id="evicting-sub")
        sub.connect()
        sub.subscribe("sites/#")
        sub.subscribe("fleet/#")
        watcher = connected(site)
        watcher.subscribe("bridges/br-test/status")
        pub = connected(site)
        async with Bridge(cfg) as bridge:
            await bridge.wait_ready(10)
            await asyncio.to_thread(cloud.stop)
            await bridge.cloud.wait_disconnected()
            for i in range(n):
                pub.publish("edge/gw-1/results", b"r%05d" % i + b"x" * 194, wait=False)
                pub.publish("fleet/a", b"f%05d" % i + b"x" * 194, wait=False)
            await eventually(
                lambda: bridge.up.stats.queued >= 2 * n, f"{2 * n} queued", timeout_s=30
            )
            await asyncio.to_thread(
                watcher.wait,
                lambda: (last_status(watcher) or ("", []))[1] == ["evicting", "uplink_down"],
                10,
                "degraded: evicting",
            )
            evicted = bridge.up.outbox.stats().evicted_total
            assert evicted > 0
            assert bridge.up.evicted_by_rule.total() == evicted
            assert set(bridge.up.evicted_by_rule) == {results_label, "fleet/#"}
            started = [r.getMessage() for r in caplog.records if "queue full" in r.getMessage()]
            assert started, "no log line about the evictions"
            assert results_label in started[0] and "fleet/#: " in started[0]
            assert len(started) <= 2  # rate-limited: one line, then at most one per 10 s

            await asyncio.to_thread(cloud.start)  # the queue drains below its bound
            await eventually(
                lambda: bridge.up.outbox.stats().rows == 0, "queue drained", timeout_s=30
            )
            await asyncio.to_thread(
                watcher.wait, lambda: last_status(watcher) == ("online", []), 15, "online again"
            )
            assert not bridge.up.evicting
            pub.publish("edge/gw-1/results", b"control")
            await asyncio.to_thread(sub.wait_payload, b"control", 20)
        cleared = [r.getMessage() for r in caplog.records if "below its bound" in r.getMessage()]
        assert len(cleared) == 1 and f"after evicting {evicted} (" in cleared[0]
        # What each rule's count says is missing is exactly what never arrived.
        got = {m.payload[:6] for m in sub.snapshot()}
        missing_results = n - sum(1 for i in range(n) if b"r%05d" % i in got)
        missing_fleet = n - sum(1 for i in range(n) if b"f%05d" % i in got)
        assert bridge.up.evicted_by_rule == {
            results_label: missing_results,
            "fleet/#": missing_fleet,
        }
        for c in (sub, watcher, pub):
            c.close()

    run(scenario, 90)


def test_remote_receive_maximum_is_honoured(
    tmp_path: Path, fresh_mosquitto: MosquittoProcess, start_mosquitto: BrokerFactory
) -> None:
    cloud = start_mosquitto("rm-cloud", extra_config="max_inflight_messages 5\n")
    cfg = config(tmp_path, fresh_mosquitto, cloud, [UP_RESULTS], forward="window = 500")
    n = 2000

    async def scenario() -> None:
        sub = connected(cloud)
        sub.subscribe("sites/#")
        pub = connected(fresh_mosquitto)
        async with Bridge(cfg) as bridge:
            await bridge.wait_ready(10)
            assert bridge.cloud.broker_receive_maximum == 5
            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, bridge.up.forwarder.in_flight)  # type: ignore[union-attr]
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch())
            for i in range(n):
                pub.publish("edge/gw-1/results", b"%d" % i, wait=False)
            await asyncio.to_thread(sub.wait_count, n, 40)
            watcher.cancel()
            assert 1 <= peak <= 5
            assert bridge.cloud.stats.connects == 1  # never disconnected for exceeding it
        sub.close()
        pub.close()

    try:
        run(scenario)
    finally:
        cloud.kill()
    assert "Receive Maximum" not in cloud.log_text() and "exceeded" not in cloud.log_text()


def test_drain_rate_is_capped(
    tmp_path: Path, fresh_mosquitto: MosquittoProcess, persistent_cloud_mosquitto: MosquittoProcess
) -> None:
    site, cloud = fresh_mosquitto, persistent_cloud_mosquitto
    rate = 200.0
    cfg = config(tmp_path, site, cloud, [UP_RESULTS], forward=f"max_rate_per_s = {rate}")
    n = 600

    async def scenario() -> None:
        sub = connected(cloud)
        sub.subscribe("sites/#")
        pub = connected(site)
        async with Bridge(cfg) as bridge:
            await bridge.wait_ready(10)
            for i in range(n):
                pub.publish("edge/gw-1/results", b"%d" % i, wait=False)
            await asyncio.to_thread(sub.wait_count, n, 30)
        sub.close()
        pub.close()
        arrivals = [m.at for m in sub.snapshot()]
        # A lower bound on the time taken, i.e. an upper bound on throughput: it can only fail
        # if the cap is broken, never because the machine is slow. The bucket holds rate/10.
        burst = rate / 10
        assert arrivals[-1] - arrivals[0] >= (n - burst - 1) / rate * 0.95

    run(scenario)


# -- status and telemetry ---------------------------------------------------------------------


def test_status_says_uplink_down_on_the_site_and_telemetry_counts(
    tmp_path: Path, fresh_mosquitto: MosquittoProcess, cloud_mosquitto: MosquittoProcess
) -> None:
    site, cloud = fresh_mosquitto, cloud_mosquitto
    cfg = config(tmp_path, site, cloud, [UP_RESULTS])

    async def scenario() -> None:
        watcher = connected(site)
        watcher.subscribe("bridges/br-test/#")
        pub = connected(site)
        async with Bridge(cfg) as bridge:
            await bridge.wait_ready(10)

            def status_with(state: str, reason: str | None) -> Callable[[], bool]:
                def ok() -> bool:
                    for m in reversed(watcher.snapshot()):
                        if m.topic.endswith("/status"):
                            s = decode_status(m.payload)
                            return s.state == state and (reason is None or reason in s.reasons)
                    return False

                return ok

            await asyncio.to_thread(watcher.wait, status_with("online", None), 10, "online")
            await asyncio.to_thread(cloud.kill)
            await asyncio.to_thread(
                watcher.wait, status_with("degraded", "uplink_down"), 10, "uplink_down"
            )
            pub.publish("edge/gw-1/results", b"held")
            await eventually(lambda: bridge.up.stats.queued >= 1, "queued", timeout_s=10)
            await asyncio.to_thread(
                watcher.wait,
                lambda: any(
                    m.topic.endswith("/telemetry")
                    and decode_telemetry(m.payload).up.queue_rows == 1
                    for m in watcher.snapshot()
                ),
                10,
                "telemetry with the queued message",
            )
            await asyncio.to_thread(cloud.start)
            await asyncio.to_thread(watcher.wait, status_with("online", None), 15, "online again")
        # A clean stop says offline (the will is not needed).
        await asyncio.to_thread(watcher.wait, status_with("offline", None), 10, "offline")
        watcher.close()
        pub.close()

    run(scenario)


def test_a_rule_added_between_runs_takes_effect_on_a_kept_session(
    tmp_path: Path, fresh_mosquitto: MosquittoProcess, cloud_mosquitto: MosquittoProcess
) -> None:
    """The brokers keep the bridge's sessions (and their old subscriptions) across its
    restart; the new run subscribes again (MqttSession(resubscribe=True))."""
    site, cloud = fresh_mosquitto, cloud_mosquitto
    first = config(tmp_path, site, cloud, [UP_RESULTS])
    second = config(tmp_path, site, cloud, [UP_RESULTS, UP_STATUS])

    async def scenario() -> None:
        async with Bridge(first) as bridge:
            await bridge.wait_ready(10)
        sub = connected(cloud)
        sub.subscribe("sites/#")
        pub = connected(site)
        async with Bridge(second) as bridge:
            await bridge.wait_ready(10)
            pub.publish("edge/gw-1/status", b"new-rule")
            await asyncio.to_thread(sub.wait_payload, b"new-rule", 10)
        sub.close()
        pub.close()

    run(scenario)
