"""Shared by the update tests: real Ed25519 keys, signed documents and ONNX models built with
the ``onnx`` helper (good, NaN, wrong input, unloadable, wrong labels, collapsed confidence)."""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from edge_node.hardware import (
    HardwareClass,
    NodeHardware,
    load_classes,
    resolve,
    shipped_classes_file,
)
from edgewise.assets import bundled_asset
from edgewise.cli.frames import load_holdout
from edgewise.releases import (
    Command,
    Golden,
    KeySet,
    Manifest,
    Target,
    TensorDecl,
    generate,
    public_entry,
    sign,
)
from edgewise.releases.signing import raw_public

HOLDOUT = load_holdout()
EDGE_MODEL = bundled_asset("digits_edge.onnx").read_bytes()
CLOUD_MODEL = bundled_asset("digits_cloud.onnx").read_bytes()
NOW = 1_800_000_000.0
DAY = 86400.0


@dataclass
class Fleet:
    """A root key, release keys and the key set that trusts them."""

    root: Ed25519PrivateKey = field(default_factory=generate)
    release: Ed25519PrivateKey = field(default_factory=generate)
    version: int = 1

    @property
    def root_public(self) -> bytes:
        return raw_public(self.root)

    def key_set(
        self,
        *keys: Ed25519PrivateKey,
        version: int | None = None,
        revoked: list[Ed25519PrivateKey] | None = None,
        expires_at: float | None = None,
        now: float = NOW,
    ) -> KeySet:
        return KeySet(
            version=self.version if version is None else version,
            issued_at=now,
            expires_at=now + 30 * DAY if expires_at is None else expires_at,
            keys=[public_entry(k) for k in (keys or (self.release,))],
            revoked=[public_entry(k).id for k in (revoked or [])],
        )

    def signed_key_set(self, *keys: Ed25519PrivateKey, **kw: Any) -> bytes:
        return sign(self.key_set(*keys, **kw), self.root)


def golden(n: int = 64, min_agreement: float = 0.9) -> Golden:
    images = HOLDOUT.images[:n]
    return Golden(
        dtype="float32",
        shape=list(images.shape),
        inputs=images.tobytes(),
        labels=[int(x) for x in HOLDOUT.labels[:n]],
        min_agreement=min_agreement,
    )


def manifest(
    artifact: bytes,
    *,
    release: int = 2,
    name: str = "digits",
    hw_classes: tuple[str, ...] = ("cpu",),
    rollout_percent: float = 100.0,
    now: float = NOW,
    expires_at: float | None = None,
    input_shape: tuple[int, ...] = (-1, 8, 8),
    chunk_bytes: int = 64 * 1024,
    with_golden: bool = True,
    **kw: Any,
) -> Manifest:
    return Manifest(
        name=name,
        release=release,
        sha256=hashlib.sha256(artifact).hexdigest(),
        size=len(artifact),
        chunk_bytes=chunk_bytes,
        input=TensorDecl(dtype="float32", shape=list(input_shape)),
        output=TensorDecl(dtype="float32", shape=[-1, 10]),
        hw_classes=list(hw_classes),
        rollout_percent=rollout_percent,
        issued_at=now,
        expires_at=now + 7 * DAY if expires_at is None else expires_at,
        golden=golden() if with_golden else None,
        **kw,
    )


def command(node_id: str, issued_at: float, name: str = "publish_telemetry", **kw: Any) -> Command:
    """An operator command for ``node_id``, issued at ``issued_at`` and good for 600 s; ``kw``
    replaces any of its fields (unsigned: sign it with ``edgewise.releases.sign``)."""
    args: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "name": name,
        "args": {},
        "issued_at": issued_at,
        "expires_at": issued_at + 600,
        "target": Target(node=node_id),
    }
    args.update(kw)
    return Command(**args)


def chunks(artifact: bytes, chunk_bytes: int = 64 * 1024) -> list[bytes]:
    return [artifact[i : i + chunk_bytes] for i in range(0, len(artifact), chunk_bytes)]


def hardware(name: str = "cpu", base: str = "generic-cpu", **changes: Any) -> NodeHardware:
    """A shipped hardware class under another name (the tests' fleet calls its class "cpu"),
    with some of its keys changed, as a node resolves it with no overrides."""
    shipped = load_classes(shipped_classes_file())[base]
    cls = HardwareClass.model_validate({**shipped.model_dump(), "name": name, **changes})
    return resolve(
        {name: cls},
        name,
        shipped_classes_file(),
        providers=None,
        intra_op_threads=None,
        inter_op_threads=None,
        latency_slo_p99_ms=None,
    )


# ----------------------------------------------------------------------------- ONNX models
def _serialize(model: onnx.ModelProto) -> bytes:
    onnx.checker.check_model(model)
    return model.SerializeToString()


def linear_model(
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    side: int = 8,
    classes: int = 10,
    doc: str = "",
) -> bytes:
    """image [N, side, side] -> Flatten -> MatMul W -> Add b -> Softmax -> probabilities [N, C]."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "linear",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", side, side])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        initializer=[
            numpy_helper.from_array(weight.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8, doc_string=doc
    )
    return _serialize(model)


def nan_model() -> bytes:
    return linear_model(np.zeros((64, 10)), np.full(10, np.nan))


def constant_model() -> bytes:
    """Always label 0 with confidence ~1: loads and runs, fails the golden set."""
    bias = np.zeros(10)
    bias[0] = 50.0
    return linear_model(np.zeros((64, 10)), bias)


def wrong_input_model() -> bytes:
    return linear_model(np.zeros((16, 10)), np.zeros(10), side=4)


def unloadable_model() -> bytes:
    return b"\x08\x07this is not an onnx model at all" * 8


def retagged(artifact: bytes, tag: str) -> bytes:
    """The same graph with another doc string: other bytes, other sha256, same behaviour."""
    model = onnx.load_from_string(artifact)
    model.doc_string = tag
    return model.SerializeToString()


def collapsed_model(temperature: float = 0.02) -> bytes:
    """The digits model with its probabilities flattened (log -> * t -> softmax): the right
    labels (it passes the golden set), confidence near 1/10 (it fails probation)."""
    model = onnx.load_from_string(EDGE_MODEL)
    graph = model.graph
    out = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{o}_raw" if o == out else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array(temperature, np.float32), "temp"))
    graph.initializer.append(numpy_helper.from_array(np.array(1e-6, np.float32), "eps"))
    graph.node.extend(
        [
            helper.make_node("Add", [f"{out}_raw", "eps"], ["p_eps"]),
            helper.make_node("Log", ["p_eps"], ["logp"]),
            helper.make_node("Mul", ["logp", "temp"], ["flat_logits"]),
            helper.make_node("Softmax", ["flat_logits"], [out], axis=1),
        ]
    )
    return _serialize(model)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def now() -> float:
    return time.time()


def run_async(fn: Any) -> Any:
    """Run an ``async def`` test with asyncio.run (pytest sees the same fixtures)."""
    import asyncio
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(fn(*args, **kwargs))

    return wrapper
