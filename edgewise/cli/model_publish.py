"""``edgewise model publish``: sign a release of a model file and publish it retained.

Guards (refused unless ``--force``): a release not above the last one published, and a hardware
class the fleet's classes file does not define.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from edgewise.cli.connect import (
    DEFAULT_BROKER,
    Broker,
    BrokerOpt,
    PasswordFileOpt,
    TlsCaOpt,
    UsernameOpt,
    fail,
)
from edgewise.cli.keys_cmd import Keyring, KeysDirOpt, Target, err, out
from edgewise.cli.model_releases import (
    DAY,
    ExpiresOpt,
    FleetRootOpt,
    HwOpt,
    ModelsRootOpt,
    NameOpt,
    SettleOpt,
    last_release,
    payloads,
    record_release,
)
from edgewise.cli.retained import publish_retained, write_out
from edgewise.releases import DEFAULT_CHUNK_BYTES, Golden, Manifest, TensorDecl
from edgewise.releases.formats import MODEL_FORMATS, format_of, suffix_of
from edgewise.releases.wire import MAX_GOLDEN_BYTES
from schemas import Topics


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
    last = last_release(keys_dir, name, classes, topics, conn, settle_s)
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
    record_release(keys_dir, m, model)


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


def _ship(
    m: Manifest,
    data: bytes,
    topics: Topics,
    ring: Keyring,
    broker: Broker | None,
    out_dir: Path | None,
) -> None:
    items, names = payloads(m, data, topics, ring.release_key())
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
