"""Broker security, proven against real Mosquitto brokers started from the shipped configs
(compose/mosquitto/{site,cloud}: mosquitto.conf + acl, with the edgewise_clientid plugin built
from compose/mosquitto/plugin): no anonymous access, per-principal credentials, connection
identity (a principal's client ids are U or U:<name>), rights per role (the table of
tests/broker_rights.py, cell by cell), TLS with certificates made here.

How a denial is proven: Mosquitto 2.0.11 answers an ACL-denied QoS 1 publish from an MQTT
3.1.1 client with a PUBACK and drops it, so the PUBACK proves nothing. An operator (full rights)
subscribed to ``#`` must not receive the forbidden message: the attacker then publishes an
allowed control message on the same connection, and once the operator has that control (same
connection, so ordered after the attack) the forbidden one can no longer arrive. Retained state
is checked unchanged afterwards with a fresh subscription. A denied read is proven the same way
from the other end: the operator publishes (each PUBACK comes after the broker queued the
message to every subscriber allowed to read it), then the reader subscribes once more, and its
SUBACK, queued behind anything already queued to it, is the barrier: what has not arrived by
then was withheld. The allowed cells of the same run show the barrier holds.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from edgewise.local_broker.probe import unique_client_id
from edgewise.mqtt import MqttConfig, MqttSession, PublishRejected
from tests import broker_rights
from tests.bridgeharness import REPO, Client, one_crosses
from tests.securebroker import Pki, SecureBroker, make_ca, make_pki

SITE_USERS = (
    "cam-1", "cam-2", "gw-1", "gw-2", "gw-1-esc", "gw-2-esc", "bridge-s1", "monitor", "operator",
)  # fmt: skip
CLOUD_USERS = ("bridge-s1", "worker-1", "worker-2", "operator")
TAKEOVER = "already connected, closing old connection"


class Brokers:
    def __init__(self, root: Path) -> None:
        self.pki: Pki = make_pki(root / "pki")
        self.site_pw = {u: secrets.token_urlsafe(12) for u in SITE_USERS}
        self.cloud_pw = {u: secrets.token_urlsafe(12) for u in CLOUD_USERS}
        self.site = SecureBroker("site", root / "site", self.site_pw, self.pki)
        self.cloud = SecureBroker("cloud", root / "cloud", self.cloud_pw, self.pki)

    def broker(self, side: str) -> SecureBroker:
        return self.site if side == "site" else self.cloud

    def client(self, side: str, user: str | None, *, tls: bool = False, **kw: object) -> Client:
        """A client of ``user``; its client id, unless given, is ``{user}:<unique>``."""
        broker = self.broker(side)
        pw = self.site_pw if side == "site" else self.cloud_pw
        if "client_id" not in kw:
            kw["client_id"] = f"{user}:{unique_client_id('t')}" if user else unique_client_id("t")
        c = Client(
            broker.tls if tls else broker.plain,
            username=user,
            password=pw.get(user or "", None) if user else None,
            tls_ca=self.pki.ca_cert if tls else None,
            protocol=kw.pop("protocol", MQTTProtocolVersion.MQTTv311),  # type: ignore[arg-type]
            **kw,  # type: ignore[arg-type]
        )
        return c

    def connected(self, side: str, user: str, **kw: object) -> Client:
        c = self.client(side, user, **kw)
        c.connect()
        return c


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Brokers]:
    b = Brokers(tmp_path_factory.mktemp("secure"))
    b.site.start()
    b.cloud.start()
    try:
        yield b
    finally:
        b.site.stop()
        b.cloud.stop()


def assert_denied(
    brokers: Brokers,
    side: str,
    attacker: str,
    topic: str,
    control_topic: str,
    *,
    retain: bool = False,
) -> None:
    """``attacker`` publishes to ``topic``: the operator must not get it (see module doc)."""
    observer = brokers.connected(side, "operator")
    observer.subscribe("#")
    attack = brokers.connected(side, attacker)
    try:
        forbidden = b"forbidden-" + secrets.token_hex(6).encode()
        control = b"control-" + secrets.token_hex(6).encode()
        attack.publish(topic, forbidden, retain=retain)
        attack.publish(control_topic, control)
        observer.wait_payload(control, 10)
        assert forbidden not in observer.payloads, f"{attacker} could publish to {topic}"
    finally:
        attack.close()
        observer.close()


def retained_under(
    brokers: Brokers, side: str, topic_filter: str, end_topic: str
) -> dict[str, bytes]:
    c = brokers.connected(side, "operator")
    try:
        c.subscribe(topic_filter)
        end = b"end-" + secrets.token_hex(4).encode()
        c.publish(end_topic, end)
        c.wait_payload(end, 10)
        out: dict[str, bytes] = {}
        for m in c.snapshot():
            if m.payload == end:
                break
            if m.retain:
                out[m.topic] = m.payload
        return out
    finally:
        c.close()


# -- who may connect --------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["site", "cloud"])
@pytest.mark.parametrize("tls", [False, True])
def test_anonymous_client_refused(brokers: Brokers, side: str, tls: bool) -> None:
    c = brokers.client(side, None, tls=tls)
    try:
        rc = c.connect(expect_ok=False)
        assert rc is not None and rc.is_failure, rc
        assert "Not authorized" in str(rc) or "not authorised" in str(rc).lower() or rc.value == 5
    finally:
        c.close()


def test_wrong_password_refused(brokers: Brokers) -> None:
    c = Client(brokers.site.plain, username="gw-1", password="not-the-password")
    try:
        rc = c.connect(expect_ok=False)
        assert rc is not None and rc.is_failure, rc
    finally:
        c.close()


# -- connection identity: a principal's client ids are U or U:<name> ---------------------------


def connack(
    brokers: Brokers,
    side: str,
    user: str,
    client_id: str,
    *,
    password: str | None = None,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
) -> Any:
    """Connect as ``user`` (with its password, or ``password``) and ``client_id``; the CONNACK's
    reason code. The client is closed at once (paho would otherwise retry a refused connect)."""
    if password is None:
        c = brokers.client(side, user, client_id=client_id, protocol=protocol)
    else:
        c = Client(
            brokers.broker(side).plain,
            client_id=client_id,
            username=user,
            password=password,
            protocol=protocol,
        )
    try:
        return c.connect(expect_ok=False)
    finally:
        c.close()


def not_authorised(rc: Any) -> bool:
    """Whether a CONNACK refused as "not authorised" (paho reports 3.1.1's 5 as 5.0's 135)."""
    return rc is not None and rc.is_failure and str(rc) == "Not authorized"


def refusal_line(client_id: str, user: str) -> str:
    """What the edgewise_clientid plugin logs when it refuses a connection."""
    return f"edgewise_clientid: refused client id '{client_id}' for username '{user}'"


def still_connected(brokers: Brokers, side: str, conns: dict[str, Client], topic: str) -> None:
    """Each of ``conns`` (client id -> client) publishes on ``topic`` now and the operator gets
    it: none was disconnected; and none was taken over according to the broker's log."""
    observer = brokers.connected(side, "operator")
    try:
        observer.subscribe(topic)
        for cid, c in conns.items():
            payload = f"alive {cid} {secrets.token_hex(4)}".encode()
            c.publish(topic, payload)
            observer.wait_payload(payload, 10)
    finally:
        observer.close()
    log = brokers.broker(side).log_text()
    for cid, c in conns.items():
        assert c.disconnects == [], f"{cid} was disconnected: {c.disconnects}"
        assert f"Client {cid} {TAKEOVER}" not in log, f"{cid} was taken over"


@pytest.mark.parametrize("protocol", [MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5])
def test_a_principal_holds_several_connections_without_taking_them_over(
    brokers: Brokers, protocol: MQTTProtocolVersion
) -> None:
    """A node's connections (main, updater, downloader) under one principal: U, U:a, U:b all
    stay connected together, each with its own session."""
    tag = secrets.token_hex(3)
    ids = [f"gw-2:main-{tag}", f"gw-2:updates-{tag}", f"gw-2:download-{tag}"]
    if protocol == MQTTProtocolVersion.MQTTv311:
        ids[0] = "gw-2"  # the bare username is a valid id too
    conns = {cid: brokers.connected("site", "gw-2", client_id=cid, protocol=protocol)
             for cid in ids}  # fmt: skip
    try:
        still_connected(brokers, "site", conns, "edge/gw-2/events")
        still_connected(brokers, "site", conns, "edge/gw-2/telemetry")  # and once more, all up
    finally:
        for c in conns.values():
            c.close()


def test_one_client_id_twice_is_a_takeover_and_the_log_shows_it(brokers: Brokers) -> None:
    """The control of the test above: its log check sees a takeover when there is one. (Two
    processes of one principal with one client id take each other over; noticing that is the
    services' job, issue 15 point 7.)"""
    cid = f"gw-2:dup-{secrets.token_hex(3)}"
    first = brokers.connected("site", "gw-2", client_id=cid)
    second = brokers.connected("site", "gw-2", client_id=cid)
    try:
        first.wait(lambda: bool(first.disconnects), 10, "the first connection taken over")
    finally:
        first.close()
        second.close()
    assert f"Client {cid} {TAKEOVER}" in brokers.site.log_text()


@pytest.mark.parametrize("protocol", [MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5])
def test_client_id_cannot_take_over_another_principals_session(
    brokers: Brokers, protocol: MQTTProtocolVersion
) -> None:
    """A sensor's credentials (and another node's) cannot take over a node's sessions: the
    CONNECT is refused (not authorised), the node's connections stay, nothing is taken over."""
    tag = secrets.token_hex(3)
    ids = ("gw-1", f"gw-1:{tag}")
    victims = {cid: brokers.connected("site", "gw-1", client_id=cid) for cid in ids}
    try:
        for cid in victims:
            for intruder in ("cam-1", "gw-2", "gw-1-esc", "operator"):
                rc = connack(brokers, "site", intruder, cid, protocol=protocol)
                assert not_authorised(rc), (intruder, cid, rc)
                assert refusal_line(cid, intruder) in brokers.site.log_text()
        still_connected(brokers, "site", victims, "edge/gw-1/status")
    finally:
        for c in victims.values():
            c.close()


@pytest.mark.parametrize(
    "client_id",
    [
        "gw-1-esc",  # another principal's bare name, of which "gw-1" is a prefix
        "gw-1-esc:edgewise-node-gw-1-escalation",  # another principal's U:<name> id
        "gw-1x",
        "gw-2:gw-1",
        ":gw-1",
        "GW-1",
        "gw-1 ",
        "edgewise-node-gw-1",  # a base id without its principal
        "",  # no id: the broker assigns auto-<uuid>, which is not the principal's
    ],
)
def test_an_id_outside_the_principals_namespace_is_refused(
    brokers: Brokers, client_id: str
) -> None:
    uplink = brokers.connected(
        "site", "gw-1-esc", client_id="gw-1-esc:edgewise-node-gw-1-escalation"
    )
    try:
        rc = connack(brokers, "site", "gw-1", client_id)
        assert not_authorised(rc), rc
        if client_id:
            assert refusal_line(client_id, "gw-1") in brokers.site.log_text()
        still_connected(
            brokers,
            "site",
            {"gw-1-esc:edgewise-node-gw-1-escalation": uplink},
            "cloud/escalations/x",
        )
    finally:
        uplink.close()


def test_the_plugin_decides_before_the_password_file(brokers: Brokers) -> None:
    """Mosquitto 2.0.11 runs the plugin's check first: a foreign id is refused by the plugin
    even with a wrong password (its line is logged); an own id with a wrong password is refused
    by the password file (no plugin line); an own id with the right password is accepted (the
    plugin defers to the password file, it never accepts by itself)."""
    tag = secrets.token_hex(3)
    rc = connack(brokers, "site", "gw-1", f"gw-2:{tag}", password="wrong")
    assert not_authorised(rc) and refusal_line(f"gw-2:{tag}", "gw-1") in brokers.site.log_text()
    rc = connack(brokers, "site", "gw-1", f"gw-1:{tag}", password="wrong")
    assert not_authorised(rc)
    assert refusal_line(f"gw-1:{tag}", "gw-1") not in brokers.site.log_text()
    rc = connack(brokers, "site", f"nobody-{tag}", f"nobody-{tag}", password="x")
    assert not_authorised(rc)
    assert refusal_line(f"nobody-{tag}", f"nobody-{tag}") not in brokers.site.log_text()
    rc = connack(brokers, "site", "gw-1", f"gw-1:{tag}", password=brokers.site_pw["gw-1"])
    assert not rc.is_failure, rc


def test_the_cloud_broker_enforces_the_same_identity_rule(brokers: Brokers) -> None:
    v5 = MQTTProtocolVersion.MQTTv5
    workers = {
        cid: brokers.connected("cloud", "worker-1", client_id=cid, protocol=v5)
        for cid in ("worker-1:a", "worker-1:b")
    }
    try:
        for intruder, cid in (("worker-2", "worker-1:a"), ("bridge-s1", "worker-1:b")):
            rc = connack(brokers, "cloud", intruder, cid)
            assert not_authorised(rc) and refusal_line(cid, intruder) in brokers.cloud.log_text()
        still_connected(brokers, "cloud", workers, "edge/gw-1/reply")
    finally:
        for c in workers.values():
            c.close()


# -- rights per role: every cell of the table (tests/broker_rights.py, docs/security.md) --------

ROLES = [(side, role.name) for side in ("site", "cloud") for role in broker_rights.ROLES[side]]


def _mismatches(
    rows: dict[bytes, broker_rights.Row], got: set[bytes], role: str, right: broker_rights.Right
) -> list[str]:
    out = []
    for payload, row in rows.items():
        allowed = row.allows(role, right)
        if (payload in got) != allowed:
            out.append(
                f"{row.topic}: {right} {'allowed' if allowed else 'denied'} by the table, "
                f"but {'delivered' if payload in got else 'not delivered'}"
            )
    return out


@pytest.mark.parametrize(("side", "role"), ROLES)
def test_every_publish_cell_of_the_rights_table(brokers: Brokers, side: str, role: str) -> None:
    """The role's principal publishes to every topic of the table; the operator, subscribed to
    ``#``, receives exactly those the table allows (denial proven by delivery: module doc)."""
    side_ = cast(broker_rights.Side, side)
    user = broker_rights.principal(side_, role)
    observer = brokers.connected(side, "operator")
    attacker = brokers.connected(side, user)
    tag = secrets.token_hex(4)
    sent: dict[bytes, broker_rights.Row] = {}
    try:
        observer.subscribe("#")
        for i, row in enumerate(broker_rights.ROWS[side_]):
            payload = f"pub-{tag}-{i}".encode()
            attacker.publish(row.topic, payload)
            sent[payload] = row
        control = f"control-{tag}".encode()
        allowed = [r for r in broker_rights.ROWS[side_] if r.allows(role, "publish")]
        if allowed:
            attacker.publish(allowed[0].topic, control)
        else:  # a read-only role: each PUBACK above came after the broker routed (or refused)
            # that publish, so a control the observer sends itself now arrives after them all
            observer.publish(broker_rights.ROWS[side_][0].topic, control)
        observer.wait_payload(control, 10)
        got = {m.payload for m in observer.snapshot()}
    finally:
        attacker.close()
        observer.close()
    wrong = _mismatches(sent, got, role, "publish")
    assert not wrong, f"{side} broker, {role} ({user}):\n" + "\n".join(wrong)


@pytest.mark.parametrize(("side", "role"), ROLES)
def test_every_read_cell_of_the_rights_table(brokers: Brokers, side: str, role: str) -> None:
    """The role's principal subscribes to ``#``; the operator publishes to every topic of the
    table; the principal receives exactly those the table lets it read (the SUBACK of a later
    subscription is the barrier: module doc)."""
    side_ = cast(broker_rights.Side, side)
    user = broker_rights.principal(side_, role)
    reader = brokers.connected(side, user)
    op = brokers.connected(side, "operator")
    tag = secrets.token_hex(4)
    sent: dict[bytes, broker_rights.Row] = {}
    try:
        assert reader.subscribe("#") < 0x80
        for i, row in enumerate(broker_rights.ROWS[side_]):
            payload = f"read-{tag}-{i}".encode()
            op.publish(row.topic, payload)  # QoS 1: returns at the PUBACK
            sent[payload] = row
        assert reader.subscribe(f"barrier/{tag}") < 0x80
        got = {m.payload for m in reader.snapshot()}
    finally:
        reader.close()
        op.close()
    wrong = _mismatches(sent, got, role, "read")
    assert not wrong, f"{side} broker, {role} ({user}):\n" + "\n".join(wrong)


@pytest.mark.parametrize("side", ["site", "cloud"])
def test_docs_show_the_rights_table_the_tests_check(side: str) -> None:
    doc = (REPO / "docs" / "security.md").read_text(encoding="utf-8")
    start = f"<!-- rights table: {side} (tests/broker_rights.py) -->"
    assert start in doc, f"docs/security.md lacks the marker {start}"
    shown = doc.split(start, 1)[1].split("<!-- end of rights table -->", 1)[0].strip()
    want = broker_rights.markdown(cast(broker_rights.Side, side))
    assert shown == want, f"docs/security.md's {side} table should read:\n{want}"


def _acl_blocks(side: str) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    user = None
    for line in (REPO / "compose" / "mosquitto" / side / "acl").read_text().splitlines():
        line = line.strip()
        if line.startswith("user "):
            user = line.split(None, 1)[1]
            blocks[user] = []
        elif line and not line.startswith("#"):
            assert user is not None and not line.startswith("pattern"), line
            blocks[user].append(line)
    return blocks


def test_principals_of_one_role_have_the_same_rights_with_their_own_names() -> None:
    """The table tests one principal per role; the others' ACL blocks must be the same block
    with their own names (so cam-2, gw-2, gw-2-esc and worker-2 get what the table proves)."""
    site, cloud = _acl_blocks("site"), _acl_blocks("cloud")
    assert set(site) == set(SITE_USERS) and set(cloud) == set(CLOUD_USERS)
    for blocks, tested, other, name, its in (
        (site, "cam-1", "cam-2", "cam-1", "cam-2"),
        (site, "gw-1", "gw-2", "gw-1", "gw-2"),
        (site, "gw-1-esc", "gw-2-esc", "gw-1", "gw-2"),
        (cloud, "worker-1", "worker-2", "worker-1", "worker-2"),
    ):
        renamed = [line.replace(f"/{name}/", f"/{its}/") for line in blocks[tested]]
        assert renamed == blocks[other], (tested, other)


# -- sensors ----------------------------------------------------------------------------------


def test_sensor_publishing_a_model_manifest_denied(brokers: Brokers) -> None:
    before = retained_under(brokers, "site", "fleet/#", "fleet/zz-end")
    assert_denied(
        brokers, "site", "cam-1", "fleet/cam/models/digits", "sensors/cam-1/digits", retain=True
    )
    assert_denied(brokers, "site", "cam-1", "models/" + "0" * 64 + "/0", "sensors/cam-1/digits")
    assert retained_under(brokers, "site", "fleet/#", "fleet/zz-end") == before


def test_sensor_impersonating_another_sensor_denied(brokers: Brokers) -> None:
    assert_denied(brokers, "site", "cam-1", "sensors/cam-2/digits", "sensors/cam-1/digits")


def test_sensor_impersonating_a_node_denied(brokers: Brokers) -> None:
    assert_denied(brokers, "site", "cam-1", "edge/cam-1/results", "sensors/cam-1/digits")
    assert_denied(brokers, "site", "cam-1", "edge/gw-1/results", "sensors/cam-1/digits")


def assert_not_delivered(
    brokers: Brokers, side: str, reader: str, topic: str, control_topic: str | None
) -> None:
    """``reader`` subscribed to ``topic`` must not receive what the operator publishes there.

    Mosquitto 2.0.11 grants the SUBSCRIBE and enforces read rights per message, so the proof is
    delivery: the operator publishes to ``topic``, then to ``control_topic`` (which ``reader``
    may read); once the control arrives, the earlier message can no longer arrive. A reader
    that may read nothing (a sensor) has no control topic: the SUBACK of a later subscription
    is the barrier instead (module doc).
    """
    c = brokers.connected(side, reader)
    op = brokers.connected(side, "operator")
    try:
        c.subscribe(topic)
        forbidden = b"secret-" + secrets.token_hex(6).encode()
        control = b"control-" + secrets.token_hex(6).encode()
        if control_topic is None:
            op.publish(topic, forbidden)
            c.subscribe(f"barrier/{control.decode()}")
        else:
            c.subscribe(control_topic)
            op.publish(topic, forbidden)
            op.publish(control_topic, control)
            c.wait_payload(control, 10)
        assert forbidden not in c.payloads, f"{reader} could read {topic}"
    finally:
        c.close()
        op.close()


def test_sensor_reading_fleet_commands_denied(brokers: Brokers) -> None:
    for topic in ("fleet/cam/cmd", "sensors/cam-2/digits", "sensors/cam-1/digits"):
        assert_not_delivered(brokers, "site", "cam-1", topic, None)


# -- nodes ------------------------------------------------------------------------------------


def test_node_impersonating_another_node_denied(brokers: Brokers) -> None:
    for topic in ("edge/gw-2/results", "edge/gw-2/status", "edge/gw-2/cmd"):
        assert_denied(brokers, "site", "gw-1", topic, "edge/gw-1/results")


def test_node_publishing_fleet_or_models_denied(brokers: Brokers) -> None:
    assert_denied(
        brokers, "site", "gw-1", "fleet/cam/models/digits", "edge/gw-1/events", retain=True
    )
    assert_denied(brokers, "site", "gw-1", "fleet/cam/cmd", "edge/gw-1/events")
    assert_denied(brokers, "site", "gw-1", "models/abc/0", "edge/gw-1/events", retain=True)


def test_node_posing_as_a_sensor_denied(brokers: Brokers) -> None:
    assert_denied(brokers, "site", "gw-1", "sensors/gw-1/digits", "edge/gw-1/results")


def test_node_reads_its_sensors_commands_and_fleet(brokers: Brokers) -> None:
    node = brokers.connected("site", "gw-1")
    op = brokers.connected("site", "operator")
    try:
        for f in ("sensors/+/+", "edge/gw-1/cmd", "edge/gw-1/reply", "fleet/#", "models/#"):
            assert node.subscribe(f) < 0x80, f
        sensor = brokers.connected("site", "cam-1")
        sensor.publish("sensors/cam-1/digits", b"frame")
        sensor.close()
        op.publish("edge/gw-1/cmd", b"cmd")
        op.publish("fleet/cam/models/digits", b"manifest", retain=True)
        for p in (b"frame", b"cmd", b"manifest"):
            node.wait_payload(p, 10)
        op.publish("fleet/cam/models/digits", b"", retain=True)
    finally:
        node.close()
        op.close()


def test_node_reading_another_nodes_commands_denied(brokers: Brokers) -> None:
    assert_not_delivered(brokers, "site", "gw-1", "edge/gw-2/cmd", "edge/gw-1/cmd")
    assert_not_delivered(brokers, "site", "gw-1", "edge/gw-2/reply", "edge/gw-1/cmd")


def test_a_nodes_escalation_principal_only_escalates_and_reads_its_replies(
    brokers: Brokers,
) -> None:
    for topic in ("edge/gw-1/results", "edge/gw-1/status", "sensors/gw-1-esc/x", "fleet/cam/cmd"):
        assert_denied(brokers, "site", "gw-1-esc", topic, "cloud/escalations/ctl")
    assert_not_delivered(brokers, "site", "gw-1-esc", "edge/gw-2/reply", "edge/gw-1/reply")
    assert_not_delivered(brokers, "site", "gw-1-esc", "edge/gw-1/cmd", "edge/gw-1/reply")


# -- workers, bridge, operator on the cloud broker --------------------------------------------


def test_worker_publishing_anything_but_replies_denied(brokers: Brokers) -> None:
    for topic in (
        "fleet/cam/models/digits",
        "models/abc/0",
        "sites/s1/edge/gw-1/results",
        "cloud/escalations/digits",
        "bridges/bridge-s1/status",
        "sites/s1/edge/gw-1/cmd",
    ):
        assert_denied(brokers, "cloud", "worker-1", topic, "edge/gw-1/reply")


def test_worker_takes_escalations_by_shared_subscription(brokers: Brokers) -> None:
    w = brokers.connected("cloud", "worker-1", protocol=MQTTProtocolVersion.MQTTv5)
    br = brokers.connected("cloud", "bridge-s1")
    try:
        assert w.subscribe("$share/workers/cloud/escalations/+") < 0x80
        br.publish("cloud/escalations/digits", b"case")
        w.wait_payload(b"case", 10)
    finally:
        w.close()
        br.close()


def test_worker_reading_site_results_denied(brokers: Brokers) -> None:
    assert_not_delivered(
        brokers, "cloud", "worker-1", "sites/s1/edge/gw-1/results", "cloud/escalations/digits"
    )


def test_only_the_operator_publishes_fleet_and_models_on_the_cloud(brokers: Brokers) -> None:
    for topic in ("fleet/cam/models/digits", "fleet/keys", "models/abc/0"):
        control = "sites/s1/edge/gw-1/results"
        assert_denied(brokers, "cloud", "bridge-s1", topic, control, retain=True)
    op = brokers.connected("cloud", "operator")
    try:
        op.publish("fleet/cam/models/digits", b"signed-manifest", retain=True)
        state = retained_under(brokers, "cloud", "fleet/#", "fleet/zz-end")
        assert state == {"fleet/cam/models/digits": b"signed-manifest"}
        op.publish("fleet/cam/models/digits", b"", retain=True)
    finally:
        op.close()


def test_a_site_bridge_cannot_command_nodes_or_write_another_sites_topics(
    brokers: Brokers,
) -> None:
    """A compromised site (its bridge's credentials) can write only its own site's up-topics:
    not the commands it carries down, not another site's results or (retained) status, not a
    fleet command, key set, manifest or chunk; the cloud's retained state is unchanged."""
    before = retained_under(brokers, "cloud", "#", "zz/end")
    for topic, retain in (
        ("sites/s1/edge/gw-1/cmd", False),
        ("sites/s2/edge/gw-9/cmd", False),
        ("sites/s2/edge/gw-9/results", False),
        ("sites/s2/edge/gw-9/status", True),
        ("fleet/cpu/cmd", False),
        ("fleet/keys", True),
        ("fleet/cpu/models/digits", True),
        ("models/abc/0", True),
        ("bridges/bridge-s2/status", True),
    ):
        control = "sites/s1/edge/gw-1/status"
        assert_denied(brokers, "cloud", "bridge-s1", topic, control, retain=retain)
    assert retained_under(brokers, "cloud", "#", "zz/end") == before


# -- TLS --------------------------------------------------------------------------------------


def test_tls_client_verifying_the_broker_connects(brokers: Brokers) -> None:
    c = brokers.connected("site", "gw-1", tls=True)
    try:
        c.publish("edge/gw-1/results", b"over tls")
    finally:
        c.close()


def test_broker_with_a_certificate_from_another_ca_rejected(
    brokers: Brokers, tmp_path: Path
) -> None:
    _, _, rogue_ca = make_ca(tmp_path, "rogue-ca")
    c = Client(brokers.site.tls, username="gw-1", password=brokers.site_pw["gw-1"], tls_ca=rogue_ca)
    with pytest.raises(ssl.SSLCertVerificationError):
        c.connect()
    c.close()


def test_mqtt_session_over_tls_with_password_file(brokers: Brokers, tmp_path: Path) -> None:
    pw = tmp_path / "gw-1.password"
    pw.write_text(brokers.site_pw["gw-1"] + "\n")
    cfg = MqttConfig(
        host="localhost",
        port=brokers.site.tls_port,
        username="gw-1",
        password_file=pw,
        tls_ca_file=brokers.pki.ca_cert,
        protocol="5",
    )

    async def scenario() -> None:
        async with MqttSession(cfg, client_id="gw-1") as s:
            await s.wait_connected(10)
            await s.publish("edge/gw-1/results", b"session over tls")

    observer = brokers.connected("site", "operator")
    observer.subscribe("edge/#")
    try:
        asyncio.run(scenario())
        observer.wait_payload(b"session over tls", 10)
    finally:
        observer.close()


# -- the bridge with its credentials ----------------------------------------------------------


#: Client ids given explicitly to the bridge these tests start (an explicit ``client_id`` is
#: used as given), inside its principal's namespace as the identity rule requires.
BRIDGE_IDS = {"site_broker": "bridge-s1:site", "cloud_broker": "bridge-s1:cloud"}


def bridge_toml(brokers: Brokers, tmp_path: Path) -> Path:
    site_pw = tmp_path / "site.password"
    site_pw.write_text(brokers.site_pw["bridge-s1"])
    os.chmod(site_pw, 0o600)
    path = tmp_path / "bridge.toml"
    path.write_text(
        f"""bridge_id = "bridge-s1"
site = "s1"
[site_broker]
host = "localhost"
port = {brokers.site.tls_port}
username = "bridge-s1"
client_id = "{BRIDGE_IDS["site_broker"]}"
password_file = "{site_pw}"
tls_ca_file = "{brokers.pki.ca_cert}"
[cloud_broker]
host = "localhost"
port = {brokers.cloud.tls_port}
username = "bridge-s1"
client_id = "{BRIDGE_IDS["cloud_broker"]}"
tls_ca_file = "{brokers.pki.ca_cert}"
[queue]
dir = "{tmp_path / "queues"}"
[[rules]]
direction = "up"
filter = "edge/+/results"
template = "sites/{{site}}/edge/+/results"
[[rules]]
direction = "down"
filter = "fleet/#"
"""
    )
    return path


def test_bridge_forwards_over_tls_with_credentials_from_file_and_env_never_logged(
    brokers: Brokers, tmp_path: Path
) -> None:
    path = bridge_toml(brokers, tmp_path)
    secret = brokers.cloud_pw["bridge-s1"]
    log = tmp_path / "bridge.log"
    env = {**os.environ, "EDGEWISE_CLOUD_BROKER__PASSWORD": secret, "EDGEWISE_LOG_LEVEL": "DEBUG"}
    cloud_obs = brokers.connected("cloud", "operator")
    cloud_obs.subscribe("sites/#")
    site_obs = brokers.connected("site", "operator")
    site_obs.subscribe("fleet/#")
    node = brokers.connected("site", "gw-1")
    op = brokers.connected("cloud", "operator")  # a second connection of the operator
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgewise.cli.app", "bridge", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
    try:
        if not one_crosses(node, cloud_obs, "edge/gw-1/results", b"r", attempts=60):
            raise AssertionError("nothing crossed\n" + log.read_text())
        op.publish("fleet/cam/cmd", b"signed-cmd")
        site_obs.wait_payload(b"signed-cmd", 10)
        proc.terminate()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        for c in (cloud_obs, site_obs, node, op):
            c.close()
    text = log.read_text()
    assert secret not in text and brokers.site_pw["bridge-s1"] not in text
    assert secret not in " ".join(proc.args)  # type: ignore[arg-type]


def test_bridge_config_error_never_echoes_a_password(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text('[[rules]]\ndirection = "up"\nfilter = "a/#"\n[cloud_broker]\npassword = 5\n')
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", "bridge", "--config", str(path)],
        capture_output=True,
        cwd=REPO,
        env={**os.environ, "EDGEWISE_SITE_BROKER__PORT": "x"},
    )
    assert done.returncode == 2
    err = done.stderr.decode()
    assert "cloud_broker.password" in err and "site_broker.port" in err
    assert "(got 5)" not in err


# -- the compose topology, as processes from the same configs ---------------------------------


def test_compose_bridge_rules_fit_the_broker_acls_end_to_end(
    brokers: Brokers, tmp_path: Path
) -> None:
    """compose/bridge/bridge.toml between brokers started from compose/mosquitto: results and
    escalations go up; the key set, fleet commands, manifests, chunks, node commands and replies
    come down, each principal with only its own rights (no message refused either way)."""
    import tomllib

    from broker_bridge import Bridge, BridgeConfig

    with (REPO / "compose" / "bridge" / "bridge.toml").open("rb") as f:
        data = tomllib.load(f)
    for side, broker, pw in (
        ("site_broker", brokers.site, brokers.site_pw),
        ("cloud_broker", brokers.cloud, brokers.cloud_pw),
    ):
        secret = tmp_path / f"{side}.password"
        secret.write_text(pw["bridge-s1"])
        data[side].update(
            client_id=BRIDGE_IDS[side],
            host="localhost",
            port=broker.tls_port,
            password_file=str(secret),
            tls_ca_file=str(brokers.pki.ca_cert),
            reconnect_first_s=0.2,
        )
    data["queue"]["dir"] = str(tmp_path / "queues")
    cfg = BridgeConfig.model_validate(data)

    node = brokers.connected("site", "gw-1")
    site_op = brokers.connected("site", "operator")
    cloud_op = brokers.connected("cloud", "operator")
    worker = brokers.connected("cloud", "worker-1", protocol=MQTTProtocolVersion.MQTTv5)
    for f in ("edge/gw-1/reply", "fleet/#", "models/#", "edge/gw-1/cmd"):
        node.subscribe(f)
    cloud_op.subscribe("sites/#")
    worker.subscribe("$share/workers/cloud/escalations/+")

    async def scenario() -> None:
        async with Bridge(cfg) as bridge:
            await bridge.wait_ready(20)
            await asyncio.to_thread(node.publish, "edge/gw-1/results", b"result-1")
            await asyncio.to_thread(node.publish, "cloud/escalations/digits", b"hard-case")
            await asyncio.to_thread(cloud_op.wait_payload, b"result-1", 10)
            await asyncio.to_thread(worker.wait_payload, b"hard-case", 10)
            await asyncio.to_thread(worker.publish, "edge/gw-1/reply", b"verdict")
            down = {
                ("fleet/cam/models/digits", True): b"manifest",
                ("fleet/keys", True): b"key-set",
                (f"models/{broker_rights.SHA}/0", True): b"chunk",
                ("fleet/cam/cmd", False): b"fleet-cmd",
                ("sites/s1/edge/gw-1/cmd", False): b"reboot",
            }
            for (topic, retain), payload in down.items():
                await asyncio.to_thread(cloud_op.publish, topic, payload, retain=retain)
            for payload in (b"verdict", *down.values()):
                await asyncio.to_thread(node.wait_payload, payload, 10)
            for (topic, retain), _ in down.items():
                if retain:
                    await asyncio.to_thread(cloud_op.publish, topic, b"", retain=True)
            telemetry = bridge.telemetry()
            assert telemetry.up.refused == telemetry.down.refused == 0

    try:
        asyncio.run(scenario())
    finally:
        for c in (node, site_op, cloud_op, worker):
            c.close()
    got = next(m for m in cloud_op.snapshot() if m.payload == b"result-1")
    assert got.topic == "sites/s1/edge/gw-1/results"


def test_sensor_simulate_takes_its_credentials_from_the_environment(
    brokers: Brokers, tmp_path: Path
) -> None:
    secret = tmp_path / "cam-1.password"
    secret.write_text(brokers.site_pw["cam-1"])
    observer = brokers.connected("site", "operator")
    observer.subscribe("sensors/#")
    env = {
        **os.environ,
        "EDGEWISE_MQTT__USERNAME": "cam-1",
        "EDGEWISE_MQTT__PASSWORD_FILE": str(secret),
    }
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgewise.cli.app",
                "sensor",
                "simulate",
                "--broker",
                f"mqtt://127.0.0.1:{brokers.site.plain_port}",
                "--device",
                "cam-1",
                "--count",
                "3",
                "--rate",
                "50",
            ],
            capture_output=True,
            cwd=REPO,
            env=env,
            timeout=60,
        )
        assert brokers.site_pw["cam-1"] not in done.stdout.decode() + done.stderr.decode()
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        observer.wait_count(3, 10)
    finally:
        observer.close()
    assert {m.topic.split("/")[1] for m in observer.snapshot()} == {"cam-1"}


def _operator_env(brokers: Brokers, side: str, tmp_path: Path) -> dict[str, str]:
    secret = tmp_path / f"operator-{side}.password"
    secret.write_text((brokers.site_pw if side == "site" else brokers.cloud_pw)["operator"])
    return {
        **os.environ,
        "EDGEWISE_MQTT__USERNAME": "operator",
        "EDGEWISE_MQTT__PASSWORD_FILE": str(secret),
    }


def _edgewise(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", *args],
        capture_output=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )


def test_operator_publishes_a_model_with_credentials_from_the_environment(
    brokers: Brokers, tmp_path: Path
) -> None:
    """The one principal allowed to publish fleet/# and models/# on the cloud can do so with
    the operator's own tool: `edgewise model publish` reads its credentials like the services."""
    from edgewise.releases import Manifest, decode_document, decode_envelope
    from tests.updatekit import EDGE_MODEL

    env = _operator_env(brokers, "cloud", tmp_path)
    keys = tmp_path / "keys"
    made = _edgewise("keys", "init", "--out-dir", str(keys), env=env)
    assert made.returncode == 0, made.stderr.decode()[-2000:]
    model = tmp_path / "digits.onnx"
    model.write_bytes(EDGE_MODEL)
    published = _edgewise(
        "model", "publish", str(model), "--name", "digits", "--release", "2",
        "--hw-class", "generic-cpu", "-k", str(keys),
        "--broker", f"mqtt://127.0.0.1:{brokers.cloud.plain_port}",
        env=env,
    )  # fmt: skip
    output = published.stdout.decode() + published.stderr.decode()
    assert brokers.cloud_pw["operator"] not in output
    assert published.returncode == 0, output[-2000:]
    state = retained_under(brokers, "cloud", "fleet/#", "fleet/zz/end")
    manifest = decode_document(decode_envelope(state["fleet/generic-cpu/models/digits"]), Manifest)
    assert (manifest.name, manifest.release) == ("digits", 2)


def test_fleet_status_reads_a_secured_broker_with_credentials_from_the_environment(
    brokers: Brokers, tmp_path: Path
) -> None:
    status = _edgewise(
        "fleet", "status", "--broker", f"mqtt://127.0.0.1:{brokers.site.plain_port}",
        "--duration", "1", "--json",
        env=_operator_env(brokers, "site", tmp_path),
    )  # fmt: skip
    output = status.stdout.decode() + status.stderr.decode()
    assert brokers.site_pw["operator"] not in output
    assert status.returncode == 0, output[-2000:]  # 1: the broker refused the connection
    assert "nodes" in json.loads(status.stdout)


@pytest.mark.parametrize(
    ("command", "env"),
    [
        (["node"], {"EDGEWISE_NODE_ID": "gw-1", "EDGEWISE_MQTT": '{"password": ["s3cret-pw"]}'}),
        (["node"], {"EDGEWISE_NODE_ID": "gw-1", "EDGEWISE_MQTT__PASWORD": "s3cret-pw"}),
        (["node"], {"EDGEWISE_NODE_ID": "gw-1", "EDGEWISE_UPLINK__PASSWD": "s3cret-pw"}),
        (["worker"], {"EDGEWISE_WORKER_MQTT": '{"password": {"v": "s3cret-pw"}}'}),
        (["worker"], {"EDGEWISE_WORKER_MQTT__PASSWRD": "s3cret-pw"}),
        (["bridge"], {"EDGEWISE_CLOUD_BROKER__PASSWROD": "s3cret-pw"}),
    ],
)
def test_a_config_error_never_echoes_a_password_even_a_mistyped_one(
    tmp_path: Path, command: list[str], env: dict[str, str]
) -> None:
    args = list(command)
    if command == ["bridge"]:
        path = tmp_path / "bridge.toml"
        path.write_text('[[rules]]\ndirection = "up"\nfilter = "a/#"\n')
        args += ["--config", str(path)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", *args],
        capture_output=True,
        cwd=tmp_path,
        env={**clean, **env},
        timeout=60,
    )
    err = done.stderr.decode()
    assert done.returncode == 2, err[-2000:]
    assert "invalid" in err and "configuration" in err
    assert "s3cret-pw" not in err + done.stdout.decode()


def test_mqtt5_publish_refused_by_the_acl_fails_with_the_brokers_reason(
    brokers: Brokers, tmp_path: Path
) -> None:
    """An MQTT 5 PUBACK carrying a refusal (longer than the two bytes of a success, so paho
    decodes it, edgewise/mqtt/client.py) fails that publish only."""
    pw = tmp_path / "gw-1.password"
    pw.write_text(brokers.site_pw["gw-1"] + "\n")
    cfg = MqttConfig(
        host="localhost", port=brokers.site.tls_port, username="gw-1", password_file=pw,
        tls_ca_file=brokers.pki.ca_cert, protocol="5",
    )  # fmt: skip

    async def scenario() -> BaseException | None:
        async with MqttSession(cfg, client_id="gw-1") as s:
            await s.wait_connected(10)
            refused = s.publish_nowait("fleet/cam/models/digits", b"not mine", qos=1)
            allowed = s.publish_nowait("edge/gw-1/results", b"mine", qos=1)
            outcomes = await asyncio.gather(refused, allowed, return_exceptions=True)
            assert outcomes[1] is None
            return outcomes[0]

    error = asyncio.run(scenario())
    assert isinstance(error, PublishRejected)
    assert error.reason_code == 135  # Not authorized
