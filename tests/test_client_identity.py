"""Connection identity: the client-id rule, and two connections with one client id (a copied
config or VM image) detected, backing off and giving way instead of fighting for ever.

The fights run against a real Mosquitto (2.0.11 closes the old connection without an MQTT 5
DISCONNECT, for both protocol versions: the suspect-streak path of edgewise.mqtt.takeover); the
MQTT 5 "Session taken over" reason code (EMQX) is checked on the guard itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import uuid

import pytest

from edgewise.local_broker import MosquittoProcess
from edgewise.mqtt import Conflict, MqttConfig, MqttSession
from edgewise.mqtt.takeover import (
    ARMED_FOR_CONFLICT,
    PAUSE_S,
    SESSION_TAKEN_OVER,
    TAKEOVERS_BEFORE_PAUSE,
    TakeoverGuard,
)

TAKEOVER_LINE = "already connected, closing old connection"


# -- the client-id rule ------------------------------------------------------------------------
def test_username_prefixes_the_base_id() -> None:
    config = MqttConfig(username="gw-1")
    assert config.client_id_for("edgewise-node-gw-1") == "gw-1:edgewise-node-gw-1"
    assert config.client_id_for("edgewise-node-gw-1-updates") == "gw-1:edgewise-node-gw-1-updates"


def test_explicit_client_id_is_used_as_given() -> None:
    config = MqttConfig(username="gw-1", client_id="my-own-id")
    assert config.client_id_for("edgewise-node-gw-1") == "my-own-id"


def test_no_username_keeps_the_base_id() -> None:
    assert MqttConfig().client_id_for("edgewise-node-gw-1") == "edgewise-node-gw-1"


def test_session_connects_with_the_rule_s_id() -> None:
    session = MqttSession(MqttConfig(username="operator"), client_id="edgewise-cli-1-abc")
    assert session.client_id == "operator:edgewise-cli-1-abc"


def test_node_connections_never_share_an_id_with_an_explicit_client_id() -> None:
    """An explicit ``mqtt.client_id`` names the node's main connection only: the updater, the
    downloader and the escalator derive theirs, so none takes over another."""
    from edge_node.config import NodeConfig
    from edge_node.node import EdgeNode
    from edgewise.assets import bundled_asset
    from tests.updatekit import Fleet

    config = NodeConfig.model_validate(
        {
            "node_id": "gw-ids",
            "mqtt": {"username": "gw-ids", "client_id": "gw-ids:main"},
            "escalation": {"enabled": True},
            "updates": {"root_key": Fleet().root_public.hex()},
            "model": {"path": str(bundled_asset("digits_edge.onnx"))},
        }
    )
    node = EdgeNode(config)
    assert node.escalator is not None and node.updates is not None
    ids = [
        node.session.client_id,
        node.uplink.client_id,
        node.escalator.uplink.client_id,
        node.updates.session.client_id,
    ]
    assert ids == [
        "gw-ids:main",
        "gw-ids:edgewise-node-gw-ids-out",
        "gw-ids:edgewise-node-gw-ids-escalation",
        "gw-ids:edgewise-node-gw-ids-updates",
    ]


def test_a_node_with_a_separate_uplink_and_escalation_has_distinct_ids() -> None:
    """Results to a separate uplink broker (``-uplink``) and the escalator's connection, which
    reuses that broker (``-escalation``), never share a client id."""
    from edge_node.config import NodeConfig
    from edge_node.node import EdgeNode

    config = NodeConfig.model_validate(
        {
            "node_id": "gw-up",
            "uplink": {"host": "cloud.example", "username": "gw-up"},
            "escalation": {"enabled": True},
        }
    )
    node = EdgeNode(config)
    assert node.escalator is not None
    assert node.uplink.client_id == "gw-up:edgewise-node-gw-up-uplink"
    assert node.escalator.uplink.client_id == "gw-up:edgewise-node-gw-up-escalation"
    assert node.escalator.uplink.config.host == "cloud.example"


# -- the guard on its own ----------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_mqtt5_session_taken_over_counts_at_once_and_backs_off() -> None:
    clock = _Clock()
    guard = TakeoverGuard("c", 1.0, Conflict(clock=clock), rng=random.Random(1))
    delays = []
    for _ in range(TAKEOVERS_BEFORE_PAUSE + 1):
        guard.connected()
        clock.now += 0.5
        delay = guard.lost(server_reason=SESSION_TAKEN_OVER, peer_closed=False)
        assert delay is not None
        delays.append(delay)
    assert guard.conflict
    assert all(b > a for a, b in itertools.pairwise(delays[:4]))  # doubling
    assert all(d >= PAUSE_S for d in delays[TAKEOVERS_BEFORE_PAUSE - 1 :])


def test_a_broker_restart_is_not_taken_for_a_takeover() -> None:
    """Closes by the broker with a failed connect attempt between them: not a streak."""
    clock = _Clock()
    guard = TakeoverGuard("c", 1.0, Conflict(clock=clock))
    for _ in range(10):
        guard.connected()
        clock.now += 1.0
        assert guard.lost(server_reason=None, peer_closed=True) is None
        guard.connect_failed()  # the broker was down for a while
    assert not guard.conflict


def test_long_lived_connections_closed_by_the_broker_are_not_suspects() -> None:
    clock = _Clock()
    guard = TakeoverGuard("c", 1.0, Conflict(clock=clock))
    for _ in range(10):
        guard.connected()
        clock.now += 120.0
        assert guard.lost(server_reason=None, peer_closed=True) is None
    assert not guard.conflict


def test_a_streak_of_quick_closes_is_a_conflict_that_clears_when_left_alone() -> None:
    clock = _Clock()
    guard = TakeoverGuard("c", 1.0, Conflict(clock=clock))
    results = []
    closes = ARMED_FOR_CONFLICT + 1  # the first close of a connection arms it
    for _ in range(closes):
        guard.connected()
        clock.now += 0.3
        results.append(guard.lost(server_reason=None, peer_closed=True))
    assert results[:-1] == [None] * (closes - 1)
    assert results[-1] is not None
    assert guard.takeovers == closes  # every close of the streak was one
    guard.connected()
    clock.now += 599.0
    assert guard.conflict
    clock.now += 2.0
    assert not guard.conflict


# -- two sessions, one client id, a real Mosquitto ---------------------------------------------
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_two_connections_with_one_client_id_stop_fighting(
    protocol: str, fresh_mosquitto: MosquittoProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Both detect the conflict; one gives way after 5 takeovers; the broker logs ≤ 10."""
    info = fresh_mosquitto.info
    client_id = f"dup-{uuid.uuid4().hex[:8]}"
    config = MqttConfig(
        host=info.host,
        port=info.port,
        protocol=protocol,
        reconnect_first_s=0.05,
        reconnect_cap_s=0.2,
        takeover_backoff_first_s=0.05,
    )
    caplog.set_level(logging.WARNING, logger="edgewise.mqtt.takeover")

    async def run() -> tuple[list[int], list[bool], list[bool]]:
        taken = asyncio.Event()
        async with (
            MqttSession(config, client_id=client_id, on_takeover=lambda c: taken.set()) as a,
            MqttSession(config, client_id=client_id, on_takeover=lambda c: taken.set()) as b,
        ):
            async with asyncio.timeout(30):
                while max(a.stats.takeovers, b.stats.takeovers) < TAKEOVERS_BEFORE_PAUSE:
                    await taken.wait()
                    taken.clear()
                winner = b if a.stats.takeovers >= TAKEOVERS_BEFORE_PAUSE else a
                await winner.wait_connected()
            return (
                [a.stats.takeovers, b.stats.takeovers],
                [a.client_id_conflict, b.client_id_conflict],
                [a.connected, b.connected],
            )

    counts, conflicts, connected = asyncio.run(run())
    fights = fresh_mosquitto.log_text().count(TAKEOVER_LINE)
    assert conflicts == [True, True]
    assert sorted(connected) == [False, True]  # the one that gave way waits its 5 minutes
    assert max(counts) == TAKEOVERS_BEFORE_PAUSE
    assert fights <= 2 * TAKEOVERS_BEFORE_PAUSE, fights
    assert sum(counts) <= fights  # each takeover a session counted, the broker logged
    stopped = [r for r in caplog.records if "stopped fighting" in r.getMessage()]
    assert len(stopped) == 1 and client_id in stopped[0].getMessage()


def test_a_duplicate_service_with_two_connections_gives_way_within_ten_takeovers(
    fresh_mosquitto: MosquittoProcess,
) -> None:
    """Two services of two connections each (a node's main and updater connections), one pair
    of client ids: each service's connections share one count, so the broker logs at most 10
    takeovers in all, not 10 per client id."""
    info = fresh_mosquitto.info
    ids = [f"dup-main-{uuid.uuid4().hex[:6]}", f"dup-updates-{uuid.uuid4().hex[:6]}"]
    config = MqttConfig(
        host=info.host,
        port=info.port,
        reconnect_first_s=0.05,
        reconnect_cap_s=0.2,
        takeover_backoff_first_s=0.05,
    )

    async def run() -> list[int]:
        taken = asyncio.Event()
        services = [Conflict(), Conflict()]

        def session(client_id: str, conflict: Conflict) -> MqttSession:
            return MqttSession(
                config, client_id=client_id, on_takeover=lambda c: taken.set(), conflict=conflict
            )

        sessions = [session(i, c) for c in services for i in ids]  # a's two, then b's two
        async with sessions[0], sessions[1], sessions[2], sessions[3]:

            def settled() -> bool:
                """One service gave way on both connections, the other holds both."""
                a, b = sessions[:2], sessions[2:]
                for loser, winner, conflict in ((a, b, services[0]), (b, a, services[1])):
                    if (
                        conflict.takeovers >= TAKEOVERS_BEFORE_PAUSE
                        and not any(s.connected for s in loser)
                        and all(s.connected for s in winner)
                    ):
                        return True
                return False

            async with asyncio.timeout(60):
                while not settled():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):  # connects are not announced
                            await taken.wait()
                    taken.clear()
            return [c.takeovers for c in services]

    counts = asyncio.run(run())
    fights = fresh_mosquitto.log_text().count(TAKEOVER_LINE)
    assert max(counts) >= TAKEOVERS_BEFORE_PAUSE
    assert fights <= 2 * TAKEOVERS_BEFORE_PAUSE, (fights, counts)
    print(f"two services of two connections: {fights} takeovers in the broker log, {counts}")
