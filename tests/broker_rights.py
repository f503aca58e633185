"""Who may publish and read what on the edgewise brokers: the rights table of docs/security.md
("Rights per role"), as data.

One row per topic (a concrete example of each kind the system uses, plus the neighbours an
attacker would try: another sensor's, another node's, another site's), one column per role, a
cell says whether that role's principal may publish there and whether it may read there.
Everything not allowed is denied. Checked by:

* tests/test_broker_security.py: every cell against real Mosquitto brokers started from
  compose/mosquitto/{site,cloud} (a denial proven by delivery, see docs/security.md);
* tests/test_emqx_acl.py: every cloud cell against compose/emqx/acl.conf, evaluated the way
  EMQX evaluates it;
* tests/test_broker_security.py again: docs/security.md shows exactly :func:`markdown` of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Side = Literal["site", "cloud"]
Right = Literal["publish", "read"]

SHA = "9f86d081884c7d65"  # a model's sha256, shortened (chunks: models/{sha256}/{index})
CHUNK = "a model chunk (retained; its hash is in the manifest)"


@dataclass(frozen=True)
class Role:
    name: str
    principal: str  # the username the tests connect as (the compose stack's principal)


@dataclass(frozen=True)
class Row:
    topic: str
    what: str
    publish: frozenset[str]  # names of the roles that may publish to ``topic``
    read: frozenset[str]  # names of the roles that may read ``topic``

    def allows(self, role: str, right: Right) -> bool:
        return role in (self.publish if right == "publish" else self.read)


def _row(topic: str, what: str, publish: str = "", read: str = "") -> Row:
    """A row; the operator may always do both (it is not listed in ``publish``/``read``)."""
    return Row(
        topic,
        what,
        frozenset(publish.split()) | {"operator"},
        frozenset(read.split()) | {"operator"},
    )


ROLES: dict[Side, tuple[Role, ...]] = {
    "site": (
        Role("sensor", "cam-1"),
        Role("node", "gw-1"),
        Role("node-esc", "gw-1-esc"),
        Role("bridge", "bridge-s1"),
        Role("monitor", "monitor"),
        Role("operator", "operator"),
    ),
    "cloud": (
        Role("bridge", "bridge-s1"),
        Role("worker", "worker-1"),
        Role("operator", "operator"),
    ),
}

ROWS: dict[Side, tuple[Row, ...]] = {
    "site": (
        _row("sensors/cam-1/digits", "a sensor's frames (its own)", "sensor", "node"),
        _row("sensors/cam-2/digits", "another sensor's frames", "", "node"),
        _row("edge/gw-1/results", "a node's results (its own)", "node", "bridge"),
        _row("edge/gw-1/status", "a node's status (retained)", "node", "bridge monitor"),
        _row("edge/gw-1/telemetry", "a node's telemetry", "node", "bridge monitor"),
        _row("edge/gw-1/events", "a node's events (retained)", "node", "bridge monitor"),
        _row("edge/gw-1/deadletter", "a node's dead letters", "node", "bridge"),
        _row("edge/gw-1/cmd", "a command to a node (signed)", "bridge", "node"),
        _row("edge/gw-1/reply", "a worker's verdicts for a node", "bridge", "node node-esc"),
        _row("edge/gw-1/acks", "confirmations of a node's results (end-to-end)", "bridge", "node"),
        _row("edge/gw-2/results", "another node's results", "", "bridge"),
        _row("edge/gw-2/cmd", "a command to another node", "bridge", ""),
        _row("edge/gw-2/reply", "verdicts for another node", "bridge", ""),
        _row("edge/gw-2/acks", "confirmations for another node", "bridge", ""),
        _row("cloud/escalations/digits", "escalations, hard examples", "node node-esc", "bridge"),
        _row(
            "cloud/workers/worker-1/status",
            "a worker's presence (retained)",
            "bridge",
            "node node-esc monitor",
        ),
        _row("fleet/keys", "the trusted key set (signed, retained)", "bridge", "node"),
        _row("fleet/cpu/cmd", "a fleet command (signed)", "bridge", "node"),
        _row("fleet/cpu/models/digits", "a release manifest (signed, retained)", "bridge", "node"),
        _row(
            f"models/{SHA}/0",
            CHUNK,
            "bridge",
            "node",
        ),
        _row("bridges/bridge-s1/status", "the bridge's status (retained)", "bridge", "monitor"),
        _row("bridges/bridge-s1/telemetry", "the bridge's telemetry", "bridge", "monitor"),
        _row("sites/s1/edge/gw-1/results", "a cloud topic (not used on a site)", "", ""),
    ),
    "cloud": (
        _row("sites/s1/edge/gw-1/results", "results of a node of site s1", "bridge", ""),
        _row("sites/s1/edge/gw-1/status", "status of a node of site s1 (retained)", "bridge", ""),
        _row("sites/s1/edge/gw-1/telemetry", "telemetry of a node of site s1", "bridge", ""),
        _row("sites/s1/edge/gw-1/events", "events of a node of site s1 (retained)", "bridge", ""),
        _row("sites/s1/edge/gw-1/deadletter", "dead letters of a node of site s1", "bridge", ""),
        _row("sites/s2/edge/gw-9/results", "results of another site's node", "", ""),
        _row("sites/s2/edge/gw-9/status", "status of another site's node", "", ""),
        _row("sites/s1/edge/gw-1/cmd", "a command to a node of site s1 (signed)", "", "bridge"),
        _row("sites/s2/edge/gw-9/cmd", "a command to another site's node", "", ""),
        _row(
            "sites/s1/edge/gw-1/acks",
            "a cloud sink's confirmations for a node of site s1 (end-to-end)",
            "",
            "bridge",
        ),
        _row("sites/s2/edge/gw-9/acks", "confirmations for another site's node", "", ""),
        _row("cloud/escalations/digits", "escalations, hard examples", "bridge", "worker"),
        _row("cloud/workers/worker-1/status", "a worker's presence (its own)", "worker", "bridge"),
        _row("cloud/workers/worker-2/status", "another worker's presence", "", "bridge"),
        _row("cloud/workers/worker-1/telemetry", "a worker's telemetry (its own)", "worker", ""),
        _row("cloud/workers/worker-2/telemetry", "another worker's telemetry", "", ""),
        _row("edge/gw-1/reply", "a worker's verdicts for a node", "worker", "bridge"),
        _row("edge/gw-9/reply", "verdicts for another site's node", "worker", "bridge"),
        _row("fleet/keys", "the trusted key set (signed, retained)", "", "bridge"),
        _row("fleet/cpu/cmd", "a fleet command (signed)", "", "bridge"),
        _row("fleet/cpu/models/digits", "a release manifest (signed, retained)", "", "bridge"),
        _row(f"models/{SHA}/0", CHUNK, "", "bridge"),
        _row("bridges/bridge-s1/status", "the bridge's status (retained)", "bridge", ""),
        _row("bridges/bridge-s1/telemetry", "the bridge's telemetry", "bridge", ""),
        _row("bridges/bridge-s2/status", "another site's bridge's status", "", ""),
        _row("edge/gw-1/results", "a site topic (not used on the cloud)", "", ""),
    ),
}


def principal(side: Side, role: str) -> str:
    return next(r.principal for r in ROLES[side] if r.name == role)


RIGHTS: tuple[Right, ...] = ("publish", "read")


def cell(row: Row, role: str) -> str:
    allowed = [right for right in RIGHTS if row.allows(role, right)]
    return " + ".join(allowed) if allowed else "no"


def markdown(side: Side) -> str:
    """The side's table as docs/security.md shows it."""
    roles = ROLES[side]
    head = ["topic (example)", "what"] + [f"{r.name} `{r.principal}`" for r in roles]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS[side]:
        cells = [f"`{row.topic}`", row.what] + [cell(row, r.name) for r in roles]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
