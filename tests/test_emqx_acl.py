"""compose/emqx (the compose stack's cloud broker when it is EMQX) checked without EMQX: its
acl.conf evaluated cell by cell against the cloud rows of the rights table (tests/broker_rights.py,
the table of docs/security.md that the Mosquitto tests check against a real broker), the
filters the services really subscribe to, and the connection-identity setting of emqx.conf.
The evaluator (tests/emqx_acl.py) models EMQX's rule matching; its own behaviour is pinned by
the first tests here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from broker_bridge import BridgeConfig
from schemas import Topics
from tests import broker_rights
from tests.broker_rights import Right
from tests.emqx_acl import Acl, Action, Client, Unsupported, parse_terms, topic_match

REPO = Path(__file__).resolve().parents[1]
EMQX = REPO / "compose" / "emqx"


@pytest.fixture(scope="module")
def acl() -> Acl:
    return Acl.load(EMQX / "acl.conf", no_match="deny")


# -- the evaluator itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "filter", "matches"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/+", True),
        ("a/b/c", "a/+", False),
        ("a", "a/#", True),
        ("a/b/c", "a/#", True),
        ("a/+", "a/+", True),  # a subscription filter against a rule's filter
        ("a/#", "a/+", True),  # EMQX's quirk: '#' is one word, '+' takes any word
        ("a/+", "a/b", False),
        ("$SYS/x", "#", False),
        ("$SYS/x", "+/x", False),
        ("b/x", "a/#", False),
    ],
)
def test_topic_match_is_emqx_topic_match(name: str, filter: str, matches: bool) -> None:
    assert topic_match(name, filter) is matches


def test_first_matching_rule_wins_and_shared_subscriptions_are_checked_on_the_real_topic() -> None:
    text = """%% a comment
    {deny, {username, "u"}, subscribe, [{eq, "t/#"}]}.
    {allow, {username, {re, "^u$"}}, all, ["t/#"]}.
    {allow, {'or', [{username, "v"}, {clientid, "w:1"}]}, publish, ["p/${username}"]}.
    {deny, all}.
    """
    rules = Acl(tuple(parse_terms(text)))
    u = Client("u", "u:1")
    assert rules.authorize(u, "subscribe", "t/#") == "deny"  # {eq, ...} first
    assert rules.authorize(u, "subscribe", "t/+") == "allow"
    assert rules.authorize(u, "subscribe", "$share/g/t/x") == "allow"
    assert rules.authorize(u, "publish", "t/x") == "allow"
    assert rules.authorize(Client("v", "v:1"), "publish", "p/v") == "allow"
    assert rules.authorize(Client("v", "v:1"), "publish", "p/u") == "deny"
    assert rules.authorize(Client("x", "w:1"), "publish", "p/x") == "allow"
    assert rules.authorize(Client("uu", "uu"), "publish", "t/x") == "deny"


@pytest.mark.parametrize(
    "text",
    [
        '{allow, {ipaddr, "127.0.0.1"}, all, ["#"]}.',
        '{allow, all, {publish, [{retain, true}]}, ["#"]}.',
        '{allow, all, publish, ["$share/g/t"]}.',
        '{allow, all, publish, ["t/%u"]}.',
        '{allow, all, publish, ["t"]}',
    ],
)
def test_syntax_outside_the_modelled_subset_is_refused(text: str) -> None:
    with pytest.raises(Unsupported):
        Acl(tuple(parse_terms(text))).authorize(Client("u", "u"), "publish", "t")


# -- compose/emqx/acl.conf against the rights table --------------------------------------------


@pytest.mark.parametrize("role", [r.name for r in broker_rights.ROLES["cloud"]])
def test_every_cloud_cell_of_the_rights_table_holds_in_emqx(acl: Acl, role: str) -> None:
    """Publish cells as publishes; read cells as subscriptions to the topic itself (EMQX checks a
    read once, at SUBSCRIBE)."""
    user = broker_rights.principal("cloud", role)
    wrong = []
    for row in broker_rights.ROWS["cloud"]:
        checks: tuple[tuple[Right, Action], ...] = (("publish", "publish"), ("read", "subscribe"))
        for right, action in checks:
            allowed = row.allows(role, right)
            if acl.allows(user, action, row.topic) != allowed:
                wrong.append(f"{row.topic}: {right} should be {'allowed' if allowed else 'denied'}")
    assert not wrong, f"{role} ({user}):\n" + "\n".join(wrong)


def test_every_worker_principal_has_the_workers_rights(acl: Acl) -> None:
    """The table tests worker-1; EMQX's rule names workers by a pattern: worker-2 (and a tenth
    worker) get the same decisions, a look-alike name none."""
    actions: tuple[Action, ...] = ("publish", "subscribe")
    for row in broker_rights.ROWS["cloud"]:
        for action in actions:
            want = acl.allows("worker-1", action, row.topic)
            # A worker's own presence topic carries its name: the others' decision is on theirs
            # (the tested worker's name and the other's swapped in the topic).
            for other in ("worker-2", "worker-10"):
                levels = row.topic.split("/")
                swap = {"worker-1": other, other: "worker-1"}
                topic = "/".join(swap.get(level, level) for level in levels)
                assert acl.allows(other, action, topic) is want, (other, action, topic)
            assert not acl.allows("worker-1x", action, row.topic)
    assert not acl.allows("worker-2", "publish", "cloud/workers/worker-1/status")


def _bridge() -> BridgeConfig:
    with (REPO / "compose" / "bridge" / "bridge.toml").open("rb") as f:
        return BridgeConfig.model_validate(tomllib.load(f))


def test_the_subscriptions_the_services_make_are_allowed_and_no_wider_one(acl: Acl) -> None:
    """EMQX authorizes what a client subscribes to, so each service's real filters must pass
    and anything wider must not (on Mosquitto a wider filter only gets what the ACL lets each
    message through; on EMQX it would get everything under it)."""
    bridge = _bridge()
    user = bridge.cloud_broker.username
    assert user == bridge.bridge_id == "bridge-s1"
    down = [r.filter for r in bridge.compiled("down")]
    assert down, "the compose bridge brings nothing down"
    for f in down:
        assert acl.allows(user, "subscribe", f), f"the bridge's down filter {f} is refused"
    for up in bridge.compiled("up"):
        sample = "/".join({"+": "gw-1", "#": "x"}.get(w, w) for w in up.filter.split("/"))
        topic = up.translate(sample)
        assert topic is not None, up
        assert acl.allows(user, "publish", topic), f"the bridge's up topic {topic} is refused"
    for own in (bridge.own_topic(bridge.status_topic), bridge.own_topic(bridge.telemetry_topic)):
        assert acl.allows(user, "publish", own), own
    worker = Topics().escalations_filter("workers")
    for w in ("worker-1", "worker-2"):
        assert acl.allows(w, "subscribe", worker), worker
    for user_, wider in (
        (user, "#"),
        (user, "fleet/#"),
        (user, "models/#"),
        (user, "sites/#"),
        (user, "sites/+/edge/+/cmd"),
        (user, "sites/s2/edge/+/cmd"),
        (user, "edge/#"),
        ("worker-1", "#"),
        ("worker-1", "cloud/#"),
        ("worker-1", "$share/workers/#"),
        ("worker-1", "sites/#"),
    ):
        assert not acl.allows(user_, "subscribe", wider), (user_, wider)


def test_emqx_and_mosquitto_name_the_same_cloud_principals() -> None:
    acl_users = set(
        re.findall(r"^user (\S+)$", (REPO / "compose/mosquitto/cloud/acl").read_text(), re.M)
    )
    script = (REPO / "compose" / "make-secrets.sh").read_text()
    m = re.search(r"^CLOUD_USERS=\(([^)]*)\)$", script, re.M)
    assert m is not None
    cloud_users = set(m.group(1).split())
    assert cloud_users == acl_users == {"bridge-s1", "worker-1", "worker-2", "operator"}
    acl_text = (EMQX / "acl.conf").read_text()
    for user in cloud_users - {"worker-1", "worker-2"}:
        assert f'{{username, "{user}"}}' in acl_text, user
    assert acl_text.rstrip().endswith("{deny, all}.")


# -- connection identity on EMQX ---------------------------------------------------------------


def _override(username: str, clientid: str) -> str:
    """What compose/emqx/emqx.conf's mqtt.clientid_override renders (see the next test)."""
    return f"{username}:{clientid}"


def test_emqx_keeps_every_session_id_in_its_principals_namespace() -> None:
    """emqx.conf overrides each client id with concat([username, ':', clientid]): EMQX renders it
    before authentication and session takeover (emqx_channel: enrich_client, then
    authenticate), so two principals can never reach one session id, as long as no username
    contains ':' (then "U:" is a prefix no other principal's ids can have)."""
    conf = (EMQX / "emqx.conf").read_text()
    assert re.search(
        r'^\s*clientid_override = "concat\(\[username, \':\', clientid\]\)"$', conf, re.M
    )
    assert re.search(r"^\s*no_match = deny$", conf, re.M)
    script = (REPO / "compose" / "make-secrets.sh").read_text()
    m = re.search(r"^CLOUD_USERS=\(([^)]*)\)$", script, re.M)
    assert m is not None
    users = m.group(1).split()
    assert not [u for u in users if ":" in u]
    ids = ["", "x", ":", "worker-1", "worker-1:x", "bridge-s1:worker-1:x", "operator:"]
    sessions: dict[str, str] = {}
    for user in users:
        for cid in ids + [f"{u}:{cid}" for u in users for cid in ("", "a")]:
            session = _override(user, cid)
            assert sessions.setdefault(session, user) == user, (session, user, sessions[session])
            assert session.startswith(f"{user}:")
