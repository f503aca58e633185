"""The node's persisted update state: one directory, every write temp + fsync + rename.

Layout (``{storage.state_dir}/{node_id}.updates/``)::

    keys.signed        the trusted key set, as received (root-signed envelope)
    state.json         active + previous artifact, release floor per model, probation marker
    pending.json       the update in progress before activation, and its step
    seen.json          rejected manifest ids (with reason); command ids run before the journal
    commands.db        the command journal: every verified command, received → done (journal.py)
    artifacts/{sha}.{format}  verified, validated artifacts: at most the active and the previous
                       one; the suffix (.onnx, .tflite) is the manifest's format, so the runtime
                       that loads it is the right one
    staged/{sha}.{format}     a downloaded artifact whose sha256 matched, awaiting validation
    partial/{sha}/{i}  downloaded chunks (kept across restarts: the download resumes)

``keys.signed``, ``state.json`` and ``artifacts/`` are the trusted state: a rejected release
leaves them byte-identical. ``state.json`` changes in exactly three places, each one atomic
rename: activation (active := new, previous := old, floor := release, probation := set),
commit (probation := none) and rollback (active := previous, probation := none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec

from edge_node.updates.errors import StateError
from edge_node.updates.files import remove
from edgewise.files import write_atomic
from edgewise.releases.formats import suffix_of

Step = Literal["downloading", "verified", "validating", "swapping"]


class Installed(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    release: int
    sha256: str
    output_kind: Literal["probabilities", "logits"]
    path: str
    manifest_id: str
    thresholds: dict[str, float] = {}
    """The manifest's escalation thresholds (they go with the model, across restarts)."""
    format: str = "onnx"
    """The manifest's format (state files written before formats existed hold ONNX)."""


class Probation(msgspec.Struct, frozen=True, kw_only=True):
    manifest_id: str
    release: int
    started_at: float


class NodeState(msgspec.Struct, frozen=True, kw_only=True):
    active: Installed | None = None
    previous: Installed | None = None
    floor: dict[str, int] = {}
    probation: Probation | None = None


class Pending(msgspec.Struct, frozen=True, kw_only=True):
    manifest_id: str
    release: int
    step: Step
    started_at: float


class Seen(msgspec.Struct, kw_only=True):
    rejected: dict[str, tuple[str, int]] = {}
    """manifest id -> (reason, key-set version when rejected)"""
    commands: dict[str, float] = {}
    """command id -> its expiry (forgotten after it: an expired command is refused anyway)"""


_MAX_REJECTED = 1000


class StateStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.artifacts = root / "artifacts"
        self.staged = root / "staged"
        self.partial = root / "partial"
        self._keys = root / "keys.signed"
        self._state = root / "state.json"
        self._pending = root / "pending.json"
        self._seen = root / "seen.json"

    def open(self) -> None:
        try:
            for d in (self.root, self.artifacts, self.staged, self.partial):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"cannot create the update state directory {self.root}: {exc}"
            ) from exc

    def _read(self, path: Path, cls: type[msgspec.Struct]) -> object | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc}") from exc
        try:
            return msgspec.json.decode(data, type=cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StateError(f"{path} is corrupt: {exc}") from exc

    def _write(self, path: Path, data: bytes) -> None:
        try:
            write_atomic(path, data)
        except OSError as exc:
            raise StateError(f"cannot write {path}: {exc}") from exc

    # keys
    def key_set_bytes(self) -> bytes | None:
        try:
            return self._keys.read_bytes()
        except FileNotFoundError:
            return None

    def save_key_set(self, data: bytes) -> None:
        self._write(self._keys, data)

    # state
    def state(self) -> NodeState:
        got = self._read(self._state, NodeState)
        return got if isinstance(got, NodeState) else NodeState()

    def save_state(self, state: NodeState) -> None:
        self._write(self._state, msgspec.json.encode(state))

    # pending
    def pending(self) -> Pending | None:
        got = self._read(self._pending, Pending)
        return got if isinstance(got, Pending) else None

    def save_pending(self, pending: Pending | None) -> None:
        if pending is None:
            remove(self._pending)
        else:
            self._write(self._pending, msgspec.json.encode(pending))

    # seen
    def seen(self) -> Seen:
        try:
            got = self._read(self._seen, Seen)
        except StateError:
            # Only memory of what was refused: losing it means re-reporting, never trusting.
            remove(self._seen)
            return Seen()
        return got if isinstance(got, Seen) else Seen()

    def save_seen(self, seen: Seen, now: float) -> None:
        seen.commands = {k: exp for k, exp in seen.commands.items() if exp > now}
        if len(seen.rejected) > _MAX_REJECTED:
            seen.rejected = dict(list(seen.rejected.items())[-_MAX_REJECTED:])
        self._write(self._seen, msgspec.json.encode(seen))

    # artifacts
    def artifact_path(self, sha256: str, fmt: str = "onnx") -> Path:
        return self.artifacts / f"{sha256}{suffix_of(fmt)}"

    def staged_path(self, sha256: str, fmt: str = "onnx") -> Path:
        return self.staged / f"{sha256}{suffix_of(fmt)}"

    def prune_artifacts(self, keep: set[str]) -> None:
        for path in list(self.artifacts.iterdir()) + list(self.staged.iterdir()):
            if path.stem not in keep or path.parent == self.staged:
                remove(path)
