"""The signed documents on the wire: an envelope around a key set, a release manifest or a command.

Every document is MessagePack. The envelope carries the document's exact bytes (``payload``) and
one or more Ed25519 signatures over ``"edgewise/{kind}/v1\\0" + payload``, each naming its key by
id (the first 16 bytes of the SHA-256 of the raw public key, hex). The kind is part of what is
signed, so a signature over a command can never pass for one over a manifest.

Decoding is capped like every message in :mod:`schemas`: size first, then a structural pre-scan
(depth and value count), then a typed decode with length bounds on every string, list and
byte field.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, TypeVar

import msgspec
from msgspec import Meta

from edgewise.releases.errors import Rejected
from edgewise.releases.formats import ModelFormat
from edgewise.releases.reasons import Reason
from schemas import ContractError
from schemas.fields import LEVEL_PATTERN
from schemas.scan_msgpack import scan_msgpack

VERSION: Final = 1
Kind = Literal["keyset", "manifest", "command"]

MAX_ENVELOPE_BYTES: Final = 512 * 1024
"""A manifest with its golden inputs, a key set or a command: never more than this."""
MAX_DEPTH: Final = 8
MAX_ITEMS: Final = 16_384
MAX_SIGNATURES: Final = 8
MAX_KEYS: Final = 64
MAX_GOLDEN_BYTES: Final = 384 * 1024
MAX_GOLDEN: Final = 4096
MAX_ARTIFACT_BYTES: Final = 2**40
DEFAULT_CHUNK_BYTES: Final = 128 * 1024

KeyId = Annotated[str, Meta(pattern=r"\A[0-9a-f]{32}\Z")]
Sha256 = Annotated[str, Meta(pattern=r"\A[0-9a-f]{64}\Z")]
Level = Annotated[str, Meta(min_length=1, max_length=128, pattern=LEVEL_PATTERN)]
Short = Annotated[str, Meta(min_length=1, max_length=128)]
Time = Annotated[float, Meta(ge=0.0, le=1e11)]
Release = Annotated[int, Meta(ge=0, le=2**53)]
Dim = Annotated[int, Meta(ge=-1, le=2**31)]
"""A tensor dimension; -1 is dynamic (the batch)."""


class Signature(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    k: KeyId
    s: Annotated[bytes, Meta(min_length=64, max_length=64)]


class Envelope(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``payload`` is the document's MessagePack; ``sigs`` sign ``kind`` + payload.

    The envelope itself is not signed, so it takes no field it does not know: a changed key
    (``v`` turned into ``w`` by one flipped bit) is a rejection, never silently a default.
    """

    kind: Kind
    payload: Annotated[bytes, Meta(max_length=MAX_ENVELOPE_BYTES)]
    sigs: Annotated[list[Signature], Meta(min_length=1, max_length=MAX_SIGNATURES)]
    v: int = VERSION


# ----------------------------------------------------------------------------- key set
class PublicKey(msgspec.Struct, frozen=True):
    id: KeyId
    key: Annotated[bytes, Meta(min_length=32, max_length=32)]
    """The raw 32-byte Ed25519 public key."""


class KeySet(msgspec.Struct, frozen=True, kw_only=True):
    """The release keys a fleet trusts, signed by the root key; ``version`` only ever grows."""

    version: Release
    issued_at: Time
    expires_at: Time
    keys: Annotated[list[PublicKey], Meta(max_length=MAX_KEYS)]
    revoked: Annotated[list[KeyId], Meta(max_length=1024)] = []
    v: int = VERSION


# ----------------------------------------------------------------------------- manifest
class TensorDecl(msgspec.Struct, frozen=True, kw_only=True):
    """A model input or output as the release declares it; -1 marks a dynamic dimension."""

    dtype: Short
    shape: Annotated[list[Dim], Meta(min_length=1, max_length=8)]
    name: Short | None = None


class Golden(msgspec.Struct, frozen=True, kw_only=True):
    """Inputs the new model must label as expected before it may serve.

    ``inputs`` is a batch ``[N, *sample]`` of ``dtype`` as raw little-endian bytes;
    ``labels`` has N entries; ``min_agreement`` is the fraction that must match.
    """

    dtype: Short
    shape: Annotated[list[Annotated[int, Meta(ge=0, le=2**31)]], Meta(min_length=1, max_length=8)]
    inputs: Annotated[bytes, Meta(max_length=MAX_GOLDEN_BYTES)]
    labels: Annotated[list[Annotated[int, Meta(ge=0, le=2**31)]], Meta(max_length=MAX_GOLDEN)]
    min_agreement: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.95


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    name: Level
    release: Release
    sha256: Sha256
    size: Annotated[int, Meta(ge=1, le=MAX_ARTIFACT_BYTES)]
    chunk_bytes: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = DEFAULT_CHUNK_BYTES
    format: ModelFormat = "onnx"
    """The artifact's file format (see :mod:`edgewise.releases.formats`); a node stores it with the
    matching suffix."""
    output_kind: Literal["probabilities", "logits"] = "probabilities"
    input: TensorDecl
    output: TensorDecl
    hw_classes: Annotated[list[Level], Meta(min_length=1, max_length=64)]
    rollout_percent: Annotated[float, Meta(ge=0.0, le=100.0)] = 100.0
    issued_at: Time
    expires_at: Time
    golden: Golden | None = None
    thresholds: Annotated[
        dict[Short, Annotated[float, Meta(ge=0.0, le=1.0)]], Meta(max_length=16)
    ] = {}
    """Optional escalation thresholds for the model (e.g. ``{"escalate_below": 0.8}``)."""
    v: int = VERSION

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk_bytes)

    def chunk_size(self, index: int) -> int:
        """Bytes chunk ``index`` must have (the last one may be shorter)."""
        if index < self.chunks - 1:
            return self.chunk_bytes
        return self.size - self.chunk_bytes * (self.chunks - 1)


# ----------------------------------------------------------------------------- command
CommandName = Literal[
    "set_threshold", "publish_telemetry", "recycle_session", "pause_inference", "resume_inference"
]
COMMAND_MAX_LIFETIME_S: Final = 7 * 24 * 3600.0


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """Exactly one of ``node`` and ``hw_class``."""

    node: Level | None = None
    hw_class: Level | None = None


class Command(msgspec.Struct, frozen=True, kw_only=True):
    id: Annotated[str, Meta(min_length=8, max_length=64)]
    name: CommandName
    args: Annotated[dict[Short, Short], Meta(max_length=16)] = {}
    issued_at: Time
    expires_at: Time
    target: Target
    v: int = VERSION


D = TypeVar("D", KeySet, Manifest, Command)
T = TypeVar("T", KeySet, Manifest, Command, Envelope)

_ENVELOPE: Final = msgspec.msgpack.Decoder(Envelope)
_DECODERS: Final = {
    "keyset": msgspec.msgpack.Decoder(KeySet),
    "manifest": msgspec.msgpack.Decoder(Manifest),
    "command": msgspec.msgpack.Decoder(Command),
}
_ENCODER: Final = msgspec.msgpack.Encoder()


def encode(doc: KeySet | Manifest | Command | Envelope) -> bytes:
    return _ENCODER.encode(doc)


def _decode(decoder: msgspec.msgpack.Decoder[T], data: bytes, what: str) -> T:
    try:
        scan_msgpack(data, max_depth=MAX_DEPTH, max_items=MAX_ITEMS)
    except ContractError as exc:
        raise Rejected(Reason.MALFORMED, f"{what}: {exc.detail}") from None
    try:
        doc = decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise Rejected(Reason.MALFORMED, f"{what}: {exc}") from None
    if doc.v != VERSION:
        raise Rejected(Reason.MALFORMED, f"{what}: version {doc.v}, this node speaks {VERSION}")
    return doc


def decode_envelope(data: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Size cap, then capped decode of the envelope. Raises :class:`Rejected` only."""
    if len(data) > max_bytes:
        raise Rejected(Reason.TOO_LARGE, f"{len(data)} bytes > {max_bytes}")
    return _decode(_ENVELOPE, bytes(data), "envelope")


def decode_document(envelope: Envelope, cls: type[D]) -> D:
    """The typed document inside an envelope whose kind matches ``cls``."""
    kind = _KIND[cls]
    if envelope.kind != kind:
        raise Rejected(Reason.MALFORMED, f"a {envelope.kind} where a {kind} was expected")
    decoder: msgspec.msgpack.Decoder[D] = _DECODERS[kind]  # type: ignore[assignment]
    return _decode(decoder, envelope.payload, kind)


_KIND: Final[dict[type, Kind]] = {KeySet: "keyset", Manifest: "manifest", Command: "command"}


def kind_of(doc: KeySet | Manifest | Command) -> Kind:
    return _KIND[type(doc)]
