"""The paho fast path is taken only where paho's private members are what it was built on
(edgewise/mqtt/paho_guard.py, docs/adr/0079-paho-guard.md); anything else gets plain paho, with
a warning, and plain paho carries real traffic through a real Mosquitto: QoS 1 publishes
resolve at their PUBACK, and a message acknowledged after its durable commit is not delivered
again, while one not acknowledged is."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from edgewise.local_broker import BrokerInfo
from edgewise.mqtt import Inbound, MqttConfig, MqttSession, paho_guard
from edgewise.mqtt.client import DirectClient

TIMEOUT_S = 30.0


# -- the check ---------------------------------------------------------------------------------
def test_the_installed_paho_is_verified_and_takes_the_fast_path() -> None:
    assert paho_guard.paho_version() in paho_guard.VERIFIED_VERSIONS
    assert paho_guard.missing_members() == ()
    expected_fast = os.environ.get(paho_guard.ENV_VAR) != "0"
    assert paho_guard.VERDICT.fast is expected_fast


def test_a_changed_signature_a_missing_method_and_a_lost_call_are_named() -> None:
    class Changed(paho.Client):
        def _sock_recv(self, size: int) -> bytes:  # type: ignore[override]
            return b""

        def _packet_read(self) -> Any:  # no longer reads through _sock_recv
            return None

    missing = paho_guard.missing_members(Changed)
    assert missing == (
        "Client._sock_recv(self, size) (expected (self, bufsize))",
        "Client._packet_read calling _sock_recv",
    )

    class Bare:
        pass

    bare = paho_guard.missing_members(Bare)
    assert "Client._handle_publish" in bare
    assert "Client._ping_t (attribute)" in bare


def _decide(version: str, missing: tuple[str, ...], env: str | None) -> tuple[bool, list[str]]:
    said: list[str] = []
    verdict = paho_guard.decide(version, missing, env, warn=lambda fmt, *a: said.append(fmt % a))
    assert verdict.paho_version == version and verdict.missing == missing
    return verdict.fast, said


def test_anything_but_a_verified_version_with_every_member_gets_plain_paho_and_a_warning() -> None:
    verified = sorted(paho_guard.VERIFIED_VERSIONS)[0]
    assert _decide(verified, (), None) == (True, [])
    fast, said = _decide(verified, ("Client._sock_recv",), None)
    assert not fast and verified in said[0] and "Client._sock_recv" in said[0]
    fast, said = _decide("2.9.0", (), None)
    assert not fast and "2.9.0" in said[0] and "not a version" in said[0]
    fast, said = _decide(verified, (), "0")
    assert not fast and "EDGEWISE_PAHO_FAST=0" in said[0]


def test_the_environment_takes_the_fast_path_on_an_unverified_paho_only_if_it_checks_out() -> None:
    fast, said = _decide("2.9.0", (), "1")
    assert fast and "2.9.0" in said[0]
    fast, said = _decide("2.9.0", ("Client._ping_t (attribute)",), "1")
    assert not fast and "Client._ping_t" in said[0]


def test_the_environment_variable_forces_plain_paho_at_import() -> None:
    code = (
        "from edgewise.mqtt import paho_guard as g\n"
        "from edgewise.mqtt.connection import Connector\n"
        "print(g.VERDICT.fast, g.VERDICT.forced)\n"
    )
    env = {**os.environ, paho_guard.ENV_VAR: "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
    assert "EDGEWISE_PAHO_FAST=0" in out.stderr and paho_guard.paho_version() in out.stderr


# -- plain paho under real traffic -------------------------------------------------------------
def test_plain_paho_publishes_receives_and_acks_after_the_durable_commit(
    mosquitto: BrokerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        paho_guard, "VERDICT", paho_guard.Verdict(False, paho_guard.paho_version(), forced=True)
    )
    config = MqttConfig(host=mosquitto.host, port=mosquitto.port, reconnect_cap_s=0.5)
    topic = f"test/paho-guard/{uuid.uuid4().hex}"
    receiver_id = f"guard-rx-{uuid.uuid4().hex[:8]}"
    db = sqlite3.connect(tmp_path / "durable.db", isolation_level=None)
    db.execute("CREATE TABLE kept (payload BLOB)")

    async def receive(send: list[bytes], *, ack_all: bool) -> tuple[list[Inbound], list[str]]:
        """Connect as the receiver (persistent), publish ``send`` from a second session, and
        return what arrived up to the last of them; ``ack_all``: each is committed to SQLite
        first, then acknowledged; else only those committed before are."""
        got: list[Inbound] = []
        last = asyncio.Event()
        kinds: list[str] = []
        rx: MqttSession | None = None

        def on_message(msg: Inbound) -> None:
            got.append(msg)
            if ack_all or msg.payload.startswith(b"ack"):
                db.execute("INSERT INTO kept VALUES (?)", (msg.payload,))  # committed (autocommit)
                assert rx is not None
                rx.ack(msg)
            if msg.payload == send[-1]:
                last.set()

        async with asyncio.timeout(TIMEOUT_S):
            async with (
                MqttSession(config, client_id=receiver_id, on_message=on_message) as rx,
                MqttSession(config, client_id=f"guard-tx-{uuid.uuid4().hex[:8]}") as tx,
            ):
                await rx.subscribe(topic, qos=1)
                await tx.wait_connected()
                for client in (rx._client, tx._client):
                    kinds.append(type(client).__name__)
                    assert not isinstance(client, DirectClient)
                for payload in send:
                    await tx.publish(topic, payload, qos=1)  # resolves at its PUBACK
                await last.wait()
        return got, kinds

    async def scenario() -> None:
        first, kinds = await receive([b"ack-1", b"no-ack-2", b"ack-3"], ack_all=False)
        assert kinds == ["Client", "Client"]
        assert [m.payload for m in first] == [b"ack-1", b"no-ack-2", b"ack-3"]
        # Same client id: the broker redelivers what was not acknowledged, and only that.
        second, _ = await receive([b"marker"], ack_all=True)
        assert [(m.payload, m.dup) for m in second] == [(b"no-ack-2", True), (b"marker", False)]

    asyncio.run(scenario())
    rows = [r[0] for r in db.execute("SELECT payload FROM kept ORDER BY rowid")]
    assert rows == [b"ack-1", b"ack-3", b"no-ack-2", b"marker"]
