"""``edgewise model``: publish, promote, roll back, watch and clean up signed model releases."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.table import Table

from edgewise.cli.connect import (
    DEFAULT_BROKER,
    Broker,
    BrokerOpt,
    PasswordFileOpt,
    TlsCaOpt,
    UsernameOpt,
    fail,
)
from edgewise.cli.keys_cmd import (
    Keyring,
    KeysDirOpt,
    Target,
    collect_retained,
    err,
    out,
    publish_retained,
    write_out,
)
from edgewise.releases import (
    DEFAULT_CHUNK_BYTES,
    Golden,
    Manifest,
    Rejected,
    TensorDecl,
    decode_document,
    decode_envelope,
    decode_event,
    encode,
    sign,
)
from edgewise.releases.formats import MODEL_FORMATS, format_of, suffix_of
from edgewise.releases.wire import MAX_GOLDEN_BYTES
from schemas import ContractError, Topics, decode_status

model_app = typer.Typer(
    help="Signed model releases: publish, promote, rollback, status, gc; "
    "quantize and check a model before publishing it.",
    no_args_is_help=True,
)
DAY = 86400.0

NameOpt = Annotated[str, typer.Option("--name", "-n", help="Model name (a topic level).")]
HwOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--hw-class",
        "-c",
        help="Target hardware class (repeat for several): a class of the fleet's classes file.",
    ),
]
SettleOpt = Annotated[
    float, typer.Option("--settle-s", min=0.1, help="How long to collect retained messages.")
]
ExpiresOpt = Annotated[
    float, typer.Option("--expires-days", min=0.01, help="The manifest expires after N days.")
]
FleetRootOpt = Annotated[str, typer.Option("--fleet-root", help="Topic root of fleet topics.")]
ModelsRootOpt = Annotated[str, typer.Option("--models-root", help="Topic root of chunks.")]
EdgeRootOpt = Annotated[str, typer.Option("--edge-root", help="Topic root of node topics.")]
FAILURE_KINDS = {"rolled_back", "rejected"}
NOT_FAILURES = {"outside_cohort", "wrong_hardware_class", "older_release", "same_release"}


# ----------------------------------------------------------------------------- history
def _history_path(keys_dir: Path, name: str) -> Path:
    return keys_dir / "releases" / f"{name}.jsonl"


def _history(keys_dir: Path, name: str) -> list[dict[str, Any]]:
    path = _history_path(keys_dir, name)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _record(keys_dir: Path, m: Manifest, artifact: Path | None) -> None:
    path = _history_path(keys_dir, m.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "release": m.release,
        "sha256": m.sha256,
        "hw_classes": m.hw_classes,
        "rollout_percent": m.rollout_percent,
        "artifact": str(artifact.resolve()) if artifact else None,
        "manifest": base64.b64encode(encode(m)).decode(),
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def _manifest_of(entry: dict[str, Any]) -> Manifest:
    return msgspec.msgpack.decode(base64.b64decode(entry["manifest"]), type=Manifest)


# ----------------------------------------------------------------------------- building
def _decl(spec: Any) -> TensorDecl:
    return TensorDecl(
        dtype=str(spec.dtype), shape=[-1 if d is None else d for d in spec.shape], name=spec.name
    )


def _golden(path: Path, dtype: Any, min_agreement: float) -> Golden:
    import numpy as np

    try:
        with np.load(path) as data:
            key = "inputs" if "inputs" in data else "images"
            inputs = np.ascontiguousarray(data[key], dtype=dtype)
            labels = np.asarray(data["labels"], dtype=np.int64)
    except (OSError, KeyError, ValueError) as exc:
        fail(f"--golden {path}: want an .npz with 'inputs' (or 'images') and 'labels': {exc}")
    per = max(1, inputs[:1].nbytes)
    n = min(len(inputs), len(labels), MAX_GOLDEN_BYTES // per)
    if n == 0:
        fail(f"--golden {path}: no samples fit {MAX_GOLDEN_BYTES} bytes")
    return Golden(
        dtype=str(inputs.dtype),
        shape=list(inputs[:n].shape),
        inputs=inputs[:n].tobytes(),
        labels=[int(x) for x in labels[:n]],
        min_agreement=min_agreement,
    )


def _thresholds(pairs: list[str] | None) -> dict[str, float]:
    got: dict[str, float] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        try:
            got[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key or not 0.0 <= got.get(key, -1) <= 1.0:
            fail(f"--threshold {pair!r}: want NAME=VALUE with VALUE in [0, 1]")
    return got


def _items(m: Manifest, data: bytes, topics: Topics, key: Any) -> tuple[list[Any], list[str]]:
    signed = sign(m, key)
    items = [
        (topics.model_chunk(m.sha256, i), data[i * m.chunk_bytes : (i + 1) * m.chunk_bytes])
        for i in range(m.chunks)
    ]
    names = [f"chunks/{i}.bin" for i in range(m.chunks)]
    for hw in m.hw_classes:
        items.append((topics.fleet_model(hw, m.name), signed))
        names.append(f"manifest-{hw}.bin")
    return items, names


def _ship(
    m: Manifest,
    data: bytes,
    topics: Topics,
    ring: Keyring,
    broker: Broker | None,
    out_dir: Path | None,
) -> None:
    items, names = _items(m, data, topics, ring.release_key())
    if out_dir is not None:
        script = write_out(out_dir, items, names)
        out.print(f"wrote {len(items)} payloads to {out_dir}; publish them with {script}")
        out.print("  (chunks first, then the manifest: mosquitto_pub -r -q 1 -t TOPIC -f FILE)")
        return
    assert broker is not None
    publish_retained(broker, items, label=f"{m.name} release {m.release}")
    for hw in m.hw_classes:
        topic = topics.fleet_model(hw, m.name)
        out.print(f"published {m.name} release {m.release} on {topic} at {broker.url}")
    out.print(
        f"sha256 {m.sha256}, {m.size} bytes in {m.chunks} chunks, rollout {m.rollout_percent:g}%"
    )


@model_app.command("publish")
def publish(
    model: Annotated[
        Path,
        typer.Argument(
            help="The model file: .onnx or .tflite (the release's format is the suffix).",
            exists=True,
            dir_okay=False,
        ),
    ],
    name: NameOpt,
    release: Annotated[
        int, typer.Option("--release", "-r", min=1, help="Release number (must grow).")
    ],
    hw_class: HwOpt = None,
    rollout: Annotated[
        float, typer.Option("--rollout", min=0, max=100, help="Percent of nodes.")
    ] = 100.0,
    golden: Annotated[
        Path | None,
        typer.Option("--golden", help=".npz with inputs/images and labels to validate on."),
    ] = None,
    min_agreement: Annotated[
        float, typer.Option("--min-agreement", min=0, max=1, help="Golden labels that must match.")
    ] = 0.95,
    threshold: Annotated[
        list[str] | None, typer.Option("--threshold", help="NAME=VALUE, e.g. escalate_below=0.8.")
    ] = None,
    output_kind: Annotated[
        str, typer.Option("--output", help="probabilities or logits.")
    ] = "probabilities",
    expires_days: ExpiresOpt = 30.0,
    chunk_kib: Annotated[
        int,
        typer.Option(
            "--chunk-kib",
            min=1,
            max=1024,
            help="Chunk size; at most 1024, so a chunk fits the shipped brokers' 1 MiB + 64 KiB"
            " max_packet_size.",
        ),
    ] = DEFAULT_CHUNK_BYTES // 1024,
    keys_dir: KeysDirOpt = Path("edgewise-keys"),
    broker: BrokerOpt = DEFAULT_BROKER,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Write the signed payloads to DIR instead.")
    ] = None,
    fleet_root: FleetRootOpt = "fleet",
    models_root: ModelsRootOpt = "models",
    classes_file: Annotated[
        Path | None,
        typer.Option(
            "--hw-classes-file",
            help="The fleet's hardware_classes.toml: every --hw-class must be a class in it."
            " Default: the file shipped with edgewise (what nodes read with"
            " hardware_classes_file unset).",
            envvar="EDGEWISE_HARDWARE_CLASSES_FILE",
        ),
    ] = None,
    settle_s: SettleOpt = 1.0,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Publish even if --release is not above the last release of this model, or a"
            " --hw-class is not in the classes file.",
        ),
    ] = False,
) -> None:
    """Sign a release manifest for MODEL and publish it retained on `fleet/{class}/models/{name}`,
    with the artifact as retained chunks on `models/{sha256}/{i}`.

    Refuses, unless --force: a --release not above the last one of this model (in the publish
    history of --keys-dir, and in the retained manifests on the broker for these classes: the
    nodes would refuse it as `older_release`), and a --hw-class that is not a class of
    --hw-classes-file (no node has it)."""
    from edgewise.serving.runtime import RuntimeLoadError, load_runtime

    fmt = format_of(model)
    if fmt is None:
        fail(
            f"{model}: the release format is taken from the file suffix; rename it to end in"
            f" {' or '.join(suffix_of(f) for f in MODEL_FORMATS)}"
        )
    if output_kind not in ("probabilities", "logits"):
        fail("--output must be probabilities or logits")
    if not hw_class:
        fail("give at least one --hw-class (the nodes' hardware_class setting)")
    classes = list(dict.fromkeys(hw_class))
    _check_classes(classes, classes_file, force)
    ring = Keyring.load(keys_dir)
    topics = Topics(fleet_root=fleet_root, models_root=models_root)
    conn = None if out_dir is not None else Target(broker, username, password_file, tls_ca).broker()
    last = _last_release(keys_dir, name, classes, topics, conn, settle_s)
    if last is not None and release <= last.release:
        if not force:
            fail(
                f"release {release} of {name} is not above release {last.release}, the last"
                f" published ({last.where}): nodes that have it refuse an older or equal"
                f" release (older_release, same_release). Publish --release"
                f" {last.release + 1}, or pass --force"
            )
        err.print(
            f"note: --force: publishing release {release} of {name} at or below release"
            f" {last.release} ({last.where})",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    data = model.read_bytes()
    try:
        rt = load_runtime(model)
    except RuntimeLoadError as exc:
        fail(f"{model} is not a model a node can load: {exc}")
    input_decl, output_decl, dtype = (
        _decl(rt.input_spec),
        _decl(rt.output_spec),
        rt.input_spec.dtype,
    )
    rt.close()
    now = time.time()
    m = Manifest(
        name=name,
        release=release,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        chunk_bytes=chunk_kib * 1024,
        format=fmt,
        output_kind=output_kind,  # type: ignore[arg-type]
        input=input_decl,
        output=output_decl,
        hw_classes=classes,
        rollout_percent=rollout,
        issued_at=now,
        expires_at=now + expires_days * DAY,
        golden=_golden(golden, dtype, min_agreement) if golden else None,
        thresholds=_thresholds(threshold),
    )
    _ship(m, data, topics, ring, conn, out_dir)
    _record(keys_dir, m, model)


# ----------------------------------------------------------------------------- guards
def _check_classes(classes: list[str], classes_file: Path | None, force: bool) -> None:
    """Refuse (unless ``force``) a class the fleet's classes file does not define: a mistyped
    class publishes to a topic no node subscribes to, and nothing would say so."""
    from edge_node.errors import ConfigError
    from edge_node.hardware import load_classes, shipped_classes_file

    path = classes_file or shipped_classes_file()
    try:
        known = load_classes(path)
    except ConfigError as exc:
        fail(f"--hw-classes-file: {exc}")
    unknown = [c for c in classes if c not in known]
    if not unknown:
        return
    which = "the shipped classes file" if classes_file is None else str(path)
    message = (
        f"--hw-class {', '.join(unknown)}: not a class of {which} (classes: {', '.join(known)})"
    )
    if not force:
        fail(f"{message}; no node would take this release. Give --hw-classes-file, or --force")
    err.print(f"note: --force: {message}", markup=False, highlight=False, soft_wrap=True)


@dataclass(frozen=True)
class _Last:
    release: int
    where: str


def _last_release(
    keys_dir: Path,
    name: str,
    classes: list[str],
    topics: Topics,
    broker: Broker | None,
    settle_s: float,
) -> _Last | None:
    """The highest release of ``name`` published: in the publish history of ``keys_dir`` (any
    class), and retained on the broker for ``classes`` (``broker`` None: history only)."""
    found: list[_Last] = [
        _Last(e["release"], f"publish history {_history_path(keys_dir, name)}")
        for e in _history(keys_dir, name)
    ]
    if broker is not None:
        wanted = [topics.fleet_model(hw, name) for hw in classes]
        for topic, payload in collect_retained(broker, wanted, settle_s).items():
            try:
                m = decode_document(decode_envelope(payload), Manifest)
            except Rejected:
                continue  # not a manifest: nothing a node holds either
            found.append(_Last(m.release, f"retained on {topic} at {broker.url}"))
    return max(found, key=lambda f: f.release, default=None)


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
    history = _history(keys_dir, name)
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


@model_app.command("promote")
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
    items, names = _items(wider, b"", topics, ring.release_key())
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
    _record(keys_dir, wider, None)


@model_app.command("rollback")
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
    history = _history(keys_dir, name)
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
    classes = list(_manifest_of(previous).hw_classes)
    last = _last_release(keys_dir, name, classes, topics, conn, settle_s)
    now = time.time()
    m = msgspec.structs.replace(
        _manifest_of(previous),
        release=max(current["release"], last.release if last else 0) + 1,
        rollout_percent=100.0,
        issued_at=now,
        expires_at=now + expires_days * DAY,
    )
    artifact = Path(previous["artifact"]) if previous.get("artifact") else None
    data = artifact.read_bytes() if artifact and artifact.is_file() else b""
    if data and hashlib.sha256(data).hexdigest() != m.sha256:
        data = b""
    items, names = _items(m, data, topics, ring.release_key())
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
    _record(keys_dir, m, artifact)


@model_app.command("status")
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


@model_app.command("gc")
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
        history = sorted(_history(keys_dir, m.name), key=lambda e: e["release"])
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
