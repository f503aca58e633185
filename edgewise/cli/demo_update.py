"""The demo's model update: a throwaway fleet (root and release key), a signed release of the edge
model, published retained the way ``edgewise model publish`` does, while frames flow.

The release carries the same weights as the bundled edge model under a new doc string (other
bytes, other sha256, same answers), so the demo's accuracy figures do not move and what shows
is the update itself: verified, downloaded, validated against its golden set, swapped in with no
gap, committed after probation.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.assets import bundled_asset
from edgewise.cli.frames import LabelledFrames
from edgewise.mqtt import MqttSession
from edgewise.releases import Golden, KeySet, Manifest, TensorDecl, generate, public_entry, sign
from edgewise.releases.signing import public_pem
from edgewise.serving.runtime import TensorSpec, load_runtime
from schemas import Topics

DAY_S = 86400.0
CHUNK_BYTES = 1024  # the edge model is ~3 KB: a few chunks, as a big one would have
GOLDEN_SAMPLES = 64


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def retag_onnx(model: bytes, doc: str) -> bytes:
    """``model`` with its ``ModelProto.doc_string`` (field 6) set to ``doc``: appending a field
    to a serialised protobuf message overrides a singular one, so the graph is untouched."""
    text = doc.encode()
    return model + b"\x32" + _varint(len(text)) + text


def _decl(spec: TensorSpec) -> TensorDecl:
    return TensorDecl(
        dtype=str(spec.dtype), shape=[-1 if d is None else d for d in spec.shape], name=spec.name
    )


@dataclass
class DemoFleet:
    """Keys made for this run only; the node is enrolled with ``root``'s public key."""

    root: Ed25519PrivateKey = field(default_factory=generate)
    release_key: Ed25519PrivateKey = field(default_factory=generate)
    retained: list[str] = field(default_factory=list)
    """Topics this fleet published retained messages on (see :meth:`clear`)."""

    def enrol(self, directory: Path) -> Path:
        path = directory / "demo-root.pub"
        path.write_bytes(public_pem(self.root))
        return path

    def key_set(self, now: float) -> bytes:
        keys = KeySet(
            version=1,
            issued_at=now,
            expires_at=now + DAY_S,
            keys=[public_entry(self.release_key)],
            revoked=[],
        )
        return sign(keys, self.root)

    def release(
        self, *, name: str, release: int, hw_class: str, holdout: LabelledFrames, now: float
    ) -> tuple[Manifest, bytes]:
        """A signed-to-be manifest and the artifact: the edge model, retagged."""
        source = bundled_asset("digits_edge.onnx")
        data = retag_onnx(source.read_bytes(), f"edgewise demo: {name} release {release}")
        rt = load_runtime(source)
        try:
            input_decl, output_decl = _decl(rt.input_spec), _decl(rt.output_spec)
            dtype = rt.input_spec.dtype
        finally:
            rt.close()
        images = np.ascontiguousarray(holdout.images[:GOLDEN_SAMPLES], dtype=dtype)
        manifest = Manifest(
            name=name,
            release=release,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            chunk_bytes=CHUNK_BYTES,
            input=input_decl,
            output=output_decl,
            hw_classes=[hw_class],
            issued_at=now,
            expires_at=now + DAY_S,
            golden=Golden(
                dtype=str(images.dtype),
                shape=list(images.shape),
                inputs=images.tobytes(),
                labels=[int(x) for x in holdout.labels[:GOLDEN_SAMPLES]],
                min_agreement=0.9,
            ),
        )
        return manifest, data

    async def publish(
        self,
        session: MqttSession,
        topics: Topics,
        *,
        name: str,
        release: int,
        hw_class: str,
        holdout: LabelledFrames,
    ) -> Manifest:
        """Key set, chunks, then the manifest, all retained at QoS 1 (as `model publish`)."""
        now = time.time()
        m, data = self.release(
            name=name, release=release, hw_class=hw_class, holdout=holdout, now=now
        )
        items = [(topics.fleet_keys(), self.key_set(now))]
        items += [
            (topics.model_chunk(m.sha256, i), data[i * m.chunk_bytes : (i + 1) * m.chunk_bytes])
            for i in range(m.chunks)
        ]
        items.append((topics.fleet_model(hw_class, name), sign(m, self.release_key)))
        for topic, payload in items:
            self.retained.append(topic)
            await session.publish(topic, payload, qos=1, retain=True)
        return m

    async def clear(self, session: MqttSession) -> None:
        """Remove the retained messages :meth:`publish` left (an empty retained payload)."""
        for topic in reversed(self.retained):
            await session.publish(topic, b"", qos=1, retain=True)
        self.retained.clear()
