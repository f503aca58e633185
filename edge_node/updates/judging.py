"""Judging what arrives on the control topics: the pure part, no I/O and no memory.

A manifest is judged from its signed bytes alone, before any chunk is fetched: signature and
key set (:func:`edgewise.releases.verify_manifest`), then what this node needs of it: its own
model, a format, size and input its hardware class can run, within
``updates.max_artifact_bytes``. A key set is judged against the root key.
"""

from __future__ import annotations

from edge_node.hardware import NodeHardware
from edgewise.releases import (
    KeySet,
    Manifest,
    Reason,
    Rejected,
    decode_document,
    decode_envelope,
    verify_key_set,
    verify_manifest,
)


def stored_key_set(data: bytes, root: bytes) -> KeySet:
    """The key set stored before (verified then): checked again against the root (not the
    clock: expiry is judged when the keys are used). Raises :class:`Rejected`."""
    verify_key_set(data, root_public=root, held=None, now=0.0)
    return decode_document(decode_envelope(data), KeySet)


def judge_manifest(
    payload: bytes,
    *,
    keys: KeySet | None,
    node_id: str,
    hardware: NodeHardware,
    model_name: str,
    floor: int,
    installed_sha256: str | None,
    max_artifact_bytes: int,
    now: float,
) -> Manifest | None:
    """The manifest to install, or None if it names what the node runs already.
    Raises :class:`Rejected`."""
    verdict = verify_manifest(
        payload,
        keys=keys,
        node_id=node_id,
        hw_class=hardware.name,
        floor=floor,
        installed_sha256=installed_sha256,
        now=now,
    )
    if verdict.status == "current":
        return None
    m = verdict.manifest
    if m.name != model_name:
        raise Rejected(Reason.MALFORMED, f"model {m.name!r} on this topic")
    check_class(hardware, m)
    if m.size > max_artifact_bytes:
        raise Rejected(Reason.SIZE_EXCEEDED, f"{m.size} bytes > updates.max_artifact_bytes")
    return m


def check_class(hardware: NodeHardware, m: Manifest) -> None:
    """Can the node's hardware class run this release? Raises :class:`Rejected`."""
    refusal = hardware.refuse_release(
        m.format, m.size, m.input.shape, f"release {m.release} of {m.name}"
    )
    if refusal is not None:
        raise Rejected(Reason(refusal.reason), refusal.detail)
