"""Verification: bytes in, verdict out. No clock, no files, no sockets: ``now`` and the node's
trusted state are parameters, and the caller persists whatever a verdict changes.

Order for a manifest (the first failing step names the reason):

1. size cap (``too_large``)                         5. cohort (``outside_cohort``)
2. decode, depth and length capped (``malformed``)  6. release above the floor
3. signature by a release key of the trusted set       (``older_release``, ``same_release``)
   (``no_key_set``, ``key_set_expired``,            7. validity window (``not_yet_valid``,
   ``unknown_key``, ``revoked_key``,                   ``expired``)
   ``bad_signature``)
4. hardware class (``wrong_hardware_class``)

The trusted set itself is checked by :func:`verify_key_set`: size, decode, signature by the root
key (``key_set_bad_signature``), version not below the one held (``key_set_rollback``), not
expired (``key_set_expired``). Commands follow the manifest order with target
(``wrong_target``) in place of class and cohort, and replay (``replayed``) in place of release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgewise.releases.cohort import in_cohort
from edgewise.releases.errors import Rejected
from edgewise.releases.reasons import Reason
from edgewise.releases.signing import key_id, signature_valid
from edgewise.releases.wire import (
    COMMAND_MAX_LIFETIME_S,
    Command,
    Envelope,
    KeySet,
    Manifest,
    decode_document,
    decode_envelope,
)

CLOCK_SKEW_S = 300.0
"""How far in the future ``issued_at`` may be before a document is ``not_yet_valid``."""


@dataclass(frozen=True, slots=True)
class KeySetVerdict:
    key_set: KeySet
    status: Literal["newer", "same"]
    """``same``: the version held already (a retained copy seen again): nothing to do."""


@dataclass(frozen=True, slots=True)
class ManifestVerdict:
    manifest: Manifest
    key_id: str
    status: Literal["install", "current"]
    """``current``: this release with these bytes is what the node runs: nothing to do."""


def verify_key_set(
    data: bytes, *, root_public: bytes, held: KeySet | None, now: float
) -> KeySetVerdict:
    """Verify a signed trusted-key set against the root key and the set held now."""
    envelope = decode_envelope(data)
    key_set = decode_document(envelope, KeySet)
    root_id = key_id(root_public)
    if not any(
        sig.k == root_id and signature_valid(root_public, sig.s, envelope.kind, envelope.payload)
        for sig in envelope.sigs
    ):
        raise Rejected(Reason.KEY_SET_BAD_SIGNATURE, f"no valid signature by root key {root_id}")
    status: Literal["newer", "same"] = "newer"
    if held is not None:
        if key_set.version < held.version:
            raise Rejected(
                Reason.KEY_SET_ROLLBACK, f"version {key_set.version} < held {held.version}"
            )
        if key_set.version == held.version:
            if key_set != held:
                raise Rejected(
                    Reason.KEY_SET_ROLLBACK,
                    f"version {key_set.version} is held with other contents",
                )
            status = "same"
    if key_set.expires_at <= now:
        raise Rejected(Reason.KEY_SET_EXPIRED, f"expired at {key_set.expires_at:.0f}")
    return KeySetVerdict(key_set, status)


def _check_signature(envelope: Envelope, keys: KeySet | None, now: float) -> str:
    """The id of a trusted release key with a valid signature; else raise the first reason."""
    if keys is None:
        raise Rejected(Reason.NO_KEY_SET, "this node holds no trusted key set yet")
    if keys.expires_at <= now:
        raise Rejected(
            Reason.KEY_SET_EXPIRED,
            f"trusted key set v{keys.version} expired at {keys.expires_at:.0f}",
        )
    trusted = {k.id: k.key for k in keys.keys if k.id not in keys.revoked}
    revoked = set(keys.revoked)
    reason = Reason.UNKNOWN_KEY
    named: list[str] = []
    for sig in envelope.sigs:
        named.append(sig.k)
        public = trusted.get(sig.k)
        if public is None:
            if sig.k in revoked:
                reason = Reason.REVOKED_KEY
            continue
        if signature_valid(public, sig.s, envelope.kind, envelope.payload):
            return sig.k
        reason = Reason.BAD_SIGNATURE
    raise Rejected(reason, f"no valid signature by a trusted release key (signed by {named})")


def _check_window(issued_at: float, expires_at: float, now: float) -> None:
    if issued_at > now + CLOCK_SKEW_S:
        raise Rejected(Reason.NOT_YET_VALID, f"issued at {issued_at:.0f}, now {now:.0f}")
    if expires_at <= now:
        raise Rejected(Reason.EXPIRED, f"expired at {expires_at:.0f}, now {now:.0f}")


def verify_manifest(
    data: bytes,
    *,
    keys: KeySet | None,
    node_id: str,
    hw_class: str,
    floor: int,
    installed_sha256: str | None,
    now: float,
) -> ManifestVerdict:
    """Verify a signed release manifest for this node.

    ``floor`` is the highest release this node has ever activated for the model (persisted);
    ``installed_sha256`` the artifact it serves at that release, so the retained manifest of the
    running release is recognised (``current``) instead of rejected.
    """
    envelope = decode_envelope(data)
    manifest = decode_document(envelope, Manifest)
    signer = _check_signature(envelope, keys, now)
    if hw_class not in manifest.hw_classes:
        raise Rejected(
            Reason.WRONG_HARDWARE_CLASS, f"for {manifest.hw_classes}, this node is {hw_class!r}"
        )
    if not in_cohort(node_id, manifest.name, manifest.release, manifest.rollout_percent):
        raise Rejected(
            Reason.OUTSIDE_COHORT, f"rollout {manifest.rollout_percent}% does not reach this node"
        )
    if manifest.release < floor:
        raise Rejected(Reason.OLDER_RELEASE, f"release {manifest.release} < installed {floor}")
    status: Literal["install", "current"] = "install"
    if manifest.release == floor:
        if manifest.sha256 != installed_sha256:
            raise Rejected(
                Reason.SAME_RELEASE,
                f"release {manifest.release} is installed with other bytes",
            )
        status = "current"
    _check_window(manifest.issued_at, manifest.expires_at, now)
    return ManifestVerdict(manifest, signer, status)


def verify_command(
    data: bytes,
    *,
    keys: KeySet | None,
    node_id: str,
    hw_class: str,
    seen_ids: frozenset[str] | set[str],
    now: float,
) -> Command:
    """Verify a signed operator command for this node; ``seen_ids`` are the ids it has run."""
    envelope = decode_envelope(data)
    command = decode_document(envelope, Command)
    _check_signature(envelope, keys, now)
    target = command.target
    if (target.node is None) == (target.hw_class is None):
        raise Rejected(Reason.MALFORMED, "a command targets exactly one node or hardware class")
    if target.node not in (None, node_id) or target.hw_class not in (None, hw_class):
        raise Rejected(Reason.WRONG_TARGET, f"for {target}, this node is {node_id}/{hw_class}")
    if command.id in seen_ids:
        raise Rejected(Reason.REPLAYED, f"command {command.id} has run already")
    if command.expires_at - command.issued_at > COMMAND_MAX_LIFETIME_S:
        raise Rejected(Reason.MALFORMED, "a command may live at most 7 days")
    _check_window(command.issued_at, command.expires_at, now)
    return command
