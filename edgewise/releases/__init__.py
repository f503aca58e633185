"""Signed model releases, trusted keys and operator commands: the pure half of model updates.

No sockets, files or clocks: bytes in, verdict out (the node's I/O lives in
:mod:`edge_node.updates`, the operator's in ``edgewise keys|model|cmd``). See
``docs/model-updates.md`` and ADR 0020 (signing and envelope) / 0021 (the node's update state
machine).

* :mod:`edgewise.releases.wire`     the envelope, key set, manifest and command types
  (msgspec, capped)
* :mod:`edgewise.releases.signing`  Ed25519 keys, key ids, :func:`sign`
* :mod:`edgewise.releases.verify`   :func:`verify_key_set`, :func:`verify_manifest`,
  :func:`verify_command`
* :mod:`edgewise.releases.cohort`   which nodes a staged rollout reaches
* :mod:`edgewise.releases.formats`  model formats (``onnx``, ``tflite``) and their file suffixes
* :mod:`edgewise.releases.reasons`  :class:`Reason`, one code per rejection
* :mod:`edgewise.releases.events`   :class:`UpdateEvent` on ``edge/{node}/events``
* :mod:`edgewise.releases.errors`   ``ReleaseError`` > ``Rejected`` | ``BadKey``
"""

from edgewise.releases.cohort import cohort_point, in_cohort
from edgewise.releases.errors import BadKey, Rejected, ReleaseError
from edgewise.releases.events import EVENT_KINDS, UpdateEvent, decode_event, encode_event
from edgewise.releases.formats import MODEL_FORMATS, ModelFormat, format_of, suffix_of
from edgewise.releases.reasons import TRUST_DEPENDENT, Reason
from edgewise.releases.signing import envelope_id, generate, key_id, public_entry, sign
from edgewise.releases.verify import (
    KeySetVerdict,
    ManifestVerdict,
    verify_command,
    verify_key_set,
    verify_manifest,
)
from edgewise.releases.wire import (
    DEFAULT_CHUNK_BYTES,
    Command,
    Envelope,
    Golden,
    KeySet,
    Manifest,
    PublicKey,
    Target,
    TensorDecl,
    decode_document,
    decode_envelope,
    encode,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "EVENT_KINDS",
    "MODEL_FORMATS",
    "TRUST_DEPENDENT",
    "BadKey",
    "Command",
    "Envelope",
    "Golden",
    "KeySet",
    "KeySetVerdict",
    "Manifest",
    "ManifestVerdict",
    "ModelFormat",
    "PublicKey",
    "Reason",
    "Rejected",
    "ReleaseError",
    "Target",
    "TensorDecl",
    "UpdateEvent",
    "cohort_point",
    "decode_document",
    "decode_envelope",
    "decode_event",
    "encode",
    "encode_event",
    "envelope_id",
    "format_of",
    "generate",
    "in_cohort",
    "key_id",
    "public_entry",
    "sign",
    "suffix_of",
    "verify_command",
    "verify_key_set",
    "verify_manifest",
]
