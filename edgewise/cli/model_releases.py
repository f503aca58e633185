"""What ``edgewise model`` commands share: their options, the publish history, a release's
signed payloads, and the last release published.

The publish history (``{keys_dir}/releases/{name}.jsonl``) records every manifest signed from
this keys directory, with the artifact it was made from (rollback and gc read it).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from edgewise.cli.connect import Broker
from edgewise.cli.retained import collect_retained
from edgewise.releases import Manifest, Rejected, decode_document, decode_envelope, encode, sign
from schemas import Topics

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


def history_path(keys_dir: Path, name: str) -> Path:
    return keys_dir / "releases" / f"{name}.jsonl"


def read_history(keys_dir: Path, name: str) -> list[dict[str, Any]]:
    path = history_path(keys_dir, name)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def record_release(keys_dir: Path, m: Manifest, artifact: Path | None) -> None:
    path = history_path(keys_dir, m.name)
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


def manifest_of(entry: dict[str, Any]) -> Manifest:
    return msgspec.msgpack.decode(base64.b64decode(entry["manifest"]), type=Manifest)


def payloads(m: Manifest, data: bytes, topics: Topics, key: Any) -> tuple[list[Any], list[str]]:
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


@dataclass(frozen=True)
class Last:
    release: int
    where: str


def last_release(
    keys_dir: Path,
    name: str,
    classes: list[str],
    topics: Topics,
    broker: Broker | None,
    settle_s: float,
) -> Last | None:
    """The highest release of ``name`` published: in the publish history of ``keys_dir`` (any
    class), and retained on the broker for ``classes`` (``broker`` None: history only)."""
    found: list[Last] = [
        Last(e["release"], f"publish history {history_path(keys_dir, name)}")
        for e in read_history(keys_dir, name)
    ]
    if broker is not None:
        wanted = [topics.fleet_model(hw, name) for hw in classes]
        for topic, payload in collect_retained(broker, wanted, settle_s).items():
            try:
                m = decode_document(decode_envelope(payload), Manifest)
            except Rejected:
                continue  # not a manifest: nothing a node holds either
            found.append(Last(m.release, f"retained on {topic} at {broker.url}"))
    return max(found, key=lambda f: f.release, default=None)
