"""``edgewise model promote | rollback | status | gc``: a published release in the fleet.

Promote widens the current release (refused when too many nodes that tried it failed); rollback
republishes the previous artifact under a higher release number; status shows each node's
release and last update event; gc clears retained chunks no current manifest needs.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.table import Table

from edgewise.cli.connect import (
    DEFAULT_BROKER,
    BrokerOpt,
    PasswordFileOpt,
    TlsCaOpt,
    UsernameOpt,
    fail,
)
from edgewise.cli.keys_cmd import Keyring, KeysDirOpt, Target, out
from edgewise.cli.model_releases import (
    DAY,
    EdgeRootOpt,
    ExpiresOpt,
    FleetRootOpt,
    HwOpt,
    ModelsRootOpt,
    NameOpt,
    SettleOpt,
    last_release,
    manifest_of,
    payloads,
    read_history,
    record_release,
)
from edgewise.cli.retained import collect_retained, publish_retained, write_out
from edgewise.releases import Manifest, Rejected, decode_document, decode_envelope, decode_event
from schemas import ContractError, Topics, decode_status

FAILURE_KINDS = {"rolled_back", "rejected"}
NOT_FAILURES = {"outside_cohort", "wrong_hardware_class", "older_release", "same_release"}


def _current(got: dict[str, bytes], topic: str) -> Manifest:
    """The retained manifest on ``topic`` among the retained messages ``got``."""
    if topic not in got:
        fail(f"no retained manifest on {topic}: publish one with `edgewise model publish`")
    try:
        return decode_document(decode_envelope(got[topic]), Manifest)
    except Rejected as exc:
        fail(f"the retained manifest on {topic} does not decode: {exc}")


def _classes(keys_dir: Path, name: str, given: list[str] | None) -> list[str]:
    if given:
        return given
    history = read_history(keys_dir, name)
    if not history:
        fail(f"no release of {name} published from {keys_dir}: give --hw-class")
    return list(history[-1]["hw_classes"])


def _node_filters(edge_root: str) -> list[str]:
    return [f"{edge_root}/+/events", f"{edge_root}/+/status"]


def _node_events(got: dict[str, bytes], edge_root: str) -> dict[str, Any]:
    """Each node's last update event and status among the retained messages ``got``."""
    nodes: dict[str, Any] = {}
    for topic, payload in got.items():
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != edge_root or parts[2] not in ("events", "status"):
            continue
        entry = nodes.setdefault(parts[1], {})
        try:
            entry[parts[2]] = (
                decode_event(payload) if parts[2] == "events" else decode_status(payload)
            )
        except ContractError:
            continue
    return nodes


def promote(
    name: NameOpt,
    rollout: Annotated[
        float, typer.Option("--rollout", min=0, max=100, help="New percent of nodes.")
    ],
    hw_class: HwOpt = None,
    max_failure_rate: Annotated[
        float, typer.Option("--max-failure-rate", min=0, max=1, help="Refuse above this rate.")
    ] = 0.1,
    force: Annotated[bool, typer.Option("--force", help="Promote despite failures.")] = False,
    expires_days: ExpiresOpt = 30.0,
    settle_s: SettleOpt = 2.0,
    keys_dir: KeysDirOpt = Path("edgewise-keys"),
    broker: BrokerOpt = DEFAULT_BROKER,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Write payloads to DIR instead.")
    ] = None,
    fleet_root: FleetRootOpt = "fleet",
    models_root: ModelsRootOpt = "models",
    edge_root: EdgeRootOpt = "edge",
) -> None:
    """Widen the current release to --rollout percent (a new signed manifest, same artifact).

    Refuses when more than --max-failure-rate of the nodes that tried this release rolled back
    or rejected it, unless --force."""
    ring = Keyring.load(keys_dir)
    topics = Topics(fleet_root=fleet_root, models_root=models_root)
    classes = _classes(keys_dir, name, hw_class)
    conn = Target(broker, username, password_file, tls_ca).broker()
    topic = topics.fleet_model(classes[0], name)
    got = collect_retained(conn, [topic, *_node_filters(edge_root)], settle_s)
    m = _current(got, topic)
    nodes = _node_events(got, edge_root)
    ok = bad = 0
    for entry in nodes.values():
        e = entry.get("events")
        if e is None or e.model != name or e.release != m.release:
            continue
        if e.kind == "committed":
            ok += 1
        elif e.kind in FAILURE_KINDS and e.reason not in NOT_FAILURES:
            bad += 1
    rate = bad / (ok + bad) if ok + bad else 0.0
    out.print(f"release {m.release}: {ok} committed, {bad} failed ({rate:.0%})")
    if rate > max_failure_rate and not force:
        fail(
            f"failure rate {rate:.0%} > --max-failure-rate {max_failure_rate:.0%}: see"
            f" `edgewise model status --name {name}`, roll back, or pass --force",
            code=1,
        )
    now = time.time()
    wider = msgspec.structs.replace(
        m, rollout_percent=rollout, issued_at=now, expires_at=now + expires_days * DAY
    )
    items, names = payloads(wider, b"", topics, ring.release_key())
    manifests = [(i, n) for i, n in zip(items, names, strict=True) if n.startswith("manifest")]
    if out_dir is not None:
        write_out(out_dir, [i for i, _ in manifests], [n for _, n in manifests])
        out.print(f"wrote the promoted manifest(s) to {out_dir}")
    else:
        publish_retained(conn, [i for i, _ in manifests])
        out.print(
            f"{name} release {m.release} now reaches {rollout:g}% of {', '.join(m.hw_classes)}"
            f" (published at {conn.url})"
        )
    record_release(keys_dir, wider, None)


def rollback(
    name: NameOpt,
    expires_days: ExpiresOpt = 30.0,
    keys_dir: KeysDirOpt = Path("edgewise-keys"),
    broker: BrokerOpt = DEFAULT_BROKER,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Write payloads to DIR instead.")
    ] = None,
    fleet_root: FleetRootOpt = "fleet",
    models_root: ModelsRootOpt = "models",
    settle_s: SettleOpt = 1.0,
) -> None:
    """Make the previous artifact the newest release: a higher release number pointing at the
    old bytes, so nodes never need anti-rollback bypassed. The number is one above the highest
    of the publish history and (unless --out) the manifests retained on the broker."""
    ring = Keyring.load(keys_dir)
    history = read_history(keys_dir, name)
    if not history:
        fail(f"no release of {name} published from {keys_dir}")
    current = max(history, key=lambda e: e["release"])
    older = [
        e for e in history if e["sha256"] != current["sha256"] and e["release"] < current["release"]
    ]
    if not older:
        fail(f"{name} has no earlier artifact than release {current['release']} to roll back to")
    previous = max(older, key=lambda e: e["release"])
    topics = Topics(fleet_root=fleet_root, models_root=models_root)
    conn = None if out_dir is not None else Target(broker, username, password_file, tls_ca).broker()
    classes = list(manifest_of(previous).hw_classes)
    last = last_release(keys_dir, name, classes, topics, conn, settle_s)
    now = time.time()
    m = msgspec.structs.replace(
        manifest_of(previous),
        release=max(current["release"], last.release if last else 0) + 1,
        rollout_percent=100.0,
        issued_at=now,
        expires_at=now + expires_days * DAY,
    )
    artifact = Path(previous["artifact"]) if previous.get("artifact") else None
    data = artifact.read_bytes() if artifact and artifact.is_file() else b""
    if data and hashlib.sha256(data).hexdigest() != m.sha256:
        data = b""
    items, names = payloads(m, data, topics, ring.release_key())
    if not data:  # chunks stay retained from the earlier release (gc keeps them)
        keep = [(i, n) for i, n in zip(items, names, strict=True) if n.startswith("manifest")]
        items, names = [i for i, _ in keep], [n for _, n in keep]
    if out_dir is not None:
        write_out(out_dir, items, names)
        out.print(f"wrote the rollback payloads to {out_dir}")
    else:
        assert conn is not None
        publish_retained(conn, items, label=f"{name} rollback")
        out.print(
            f"{name} release {m.release} = the bytes of release {previous['release']}"
            f" (sha256 {m.sha256[:16]}…), published at {conn.url}"
        )
    record_release(keys_dir, m, artifact)


def status(
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Only nodes serving this model.")
    ] = None,
    broker: BrokerOpt = DEFAULT_BROKER,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    settle_s: SettleOpt = 2.0,
    edge_root: EdgeRootOpt = "edge",
) -> None:
    """Per node: the release it serves, its state, its last update event and error."""
    conn = Target(broker, username, password_file, tls_ca).broker()
    nodes = _node_events(collect_retained(conn, _node_filters(edge_root), settle_s), edge_root)
    table = Table("node", "state", "model", "release", "last update event", "reason", "detail")
    shown = 0
    for node_id in sorted(nodes):
        st = nodes[node_id].get("status")
        ev = nodes[node_id].get("events")
        model = (st.model if st else None) or (ev.model if ev else None)
        if name is not None and model != name:
            continue
        release = (
            ev.running_release
            if ev and ev.running_release is not None
            else (st.release if st else None)
        )
        table.add_row(
            node_id,
            st.state if st else "?",
            model or "?",
            str(release) if release is not None else "?",
            f"{ev.kind} (r{ev.release})"
            if ev and ev.release is not None
            else (ev.kind if ev else ""),
            (ev.reason or "") if ev else "",
            (ev.detail[:60] if ev else ""),
        )
        shown += 1
    out.print(table)
    if not shown:
        out.print(f"no nodes seen on {edge_root}/+/status or events within {settle_s:g} s")


def gc(
    keys_dir: KeysDirOpt = Path("edgewise-keys"),
    broker: BrokerOpt = DEFAULT_BROKER,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    settle_s: SettleOpt = 2.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would go.")] = False,
    fleet_root: FleetRootOpt = "fleet",
    models_root: ModelsRootOpt = "models",
) -> None:
    """Clear retained chunks no current manifest needs (keeping each model's previous artifact,
    the rollback target)."""
    conn = Target(broker, username, password_file, tls_ca).broker()
    got = collect_retained(conn, [f"{fleet_root}/+/models/+", f"{models_root}/+/+"], settle_s)
    needed: set[str] = set()
    chunk_topics: dict[str, list[str]] = {}
    for topic, payload in got.items():
        parts = topic.split("/")
        if topic.startswith(f"{models_root}/") and len(parts) == 3:
            chunk_topics.setdefault(parts[1], []).append(topic)
            continue
        try:
            m = decode_document(decode_envelope(payload), Manifest)
        except Rejected:
            continue
        needed.add(m.sha256)
        history = sorted(read_history(keys_dir, m.name), key=lambda e: e["release"])
        older = [
            e["sha256"] for e in history if e["release"] < m.release and e["sha256"] != m.sha256
        ]
        if older:
            needed.add(older[-1])
    drop = {sha: ts for sha, ts in chunk_topics.items() if sha not in needed}
    n = sum(len(ts) for ts in drop.values())
    for sha in sorted(drop):
        out.print(f"{'would clear' if dry_run else 'clearing'} {sha} ({len(drop[sha])} chunks)")
    if not dry_run and drop:
        publish_retained(conn, [(t, b"") for ts in drop.values() for t in ts])
    out.print(
        f"{len(needed)} artifacts in use; {n} chunks of {len(drop)} artifacts"
        f" {'to clear' if dry_run else 'cleared'}"
    )
