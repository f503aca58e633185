"""The edgewise wire contract: every message, tensor and topic name that crosses MQTT.

Pure: no sockets, files, threads or clocks (except :func:`new_id`, whose ids embed the
time). Everything else in edgewise speaks to the network through these types.

Encoding
    MessagePack maps with short string keys and ``v``, the schema version (currently 1).
    Sensor frames may also be JSON (first non-whitespace byte ``{``) so the simplest sensors
    and ``mosquitto_pub`` can publish them; results batches may be JSON for consumers with
    only plain tools (``encode_results(..., as_json=True)``). Unknown keys are ignored
    (forward compatible); ``v`` is required and checked first. Names that become topic
    levels (node, device, sensor, model) must be valid levels (see Topics).

Messages
    :class:`Frame` (``decode_frame``/``encode_frame``; a message may also hold a batch of
    frames, ``decode_frames``/``encode_frames``), :class:`ResultBatch` of
    :class:`Result` (``decode_results``/``encode_results``), :class:`Status`,
    :class:`DeadLetter`, :class:`EscalationBatch` of :class:`EscalationCase` (seen by workers
    as :class:`Escalation`) and its :class:`ReplyBatch` of :class:`CaseVerdict`
    (``decode_escalations``/``decode_replies``), :class:`Telemetry`
    (``decode_telemetry``/``encode_telemetry``) with its latency sketch :class:`SketchWire`
    (``decode_sketch``/``encode_sketch``), a worker's :class:`WorkerTelemetry`
    (``decode_worker_telemetry``/``encode_worker_telemetry``), :class:`ResultAcks` (``decode_acks``/
    ``encode_acks``: a consumer's confirmations in end-to-end mode, naming results messages by
    ``message_id``), and ``decode_any`` for displaying payloads of unknown shape.
    Tensors are ``{dtype, shape, data}`` with ``data`` raw little-endian bytes (viewed,
    not copied) or, in JSON, a flat list of numbers; see :mod:`schemas.tensor`.

Decoding untrusted bytes
    1. size: more than ``limits.max_payload_bytes`` is refused before anything is read;
    2. structure: an iterative pre-scan (no recursion, no objects built) refuses
       malformed input, nesting deeper than ``limits.max_depth`` and more values than the
       schema can need plus ``limits.max_extra_items`` (``limits.max_items`` in all for
       ``decode_any``). No payload recurses deeply; typed decoding allocates a small
       multiple of the payload size, and ``decode_any`` at most ``max_items`` Python
       objects (a few MiB at the defaults), whatever the payload;
    3. version, then schema (types and ranges, via msgspec), then the tensor.
    Frames, escalations and replies exactly as our encoders write them skip step 2: a closed
    schema caps depth and lengths while decoding, and re-encoding proves them canonical
    (docs/adr/0033-canonical-fast-path.md, 0066-canonical-frames.md).
    Decoders raise :class:`ContractError` and nothing else, whatever the bytes.
    Encoders of msgspec structs do not validate; ``encode_frame`` refuses tensors and
    fields no decoder would accept.

Errors
    :class:`ContractError` (a ``ValueError``) has a stable ``reason`` and a human
    ``detail``; ``str(e)`` is ``"reason: detail"``. Reasons:

    ``payload_too_large``  more bytes than ``max_payload_bytes``; nothing decoded
    ``malformed``          not one valid MessagePack/JSON value: syntax, truncation,
                           trailing bytes, invalid UTF-8, ext types, non-string map keys,
                           nesting beyond ``max_depth``, more values than allowed
    ``bad_schema``         valid encoding, wrong message: missing field, wrong type, value
                           out of range, string longer than ``max_str_len``, too many results
    ``bad_version``        ``v`` is not 1
    ``bad_dtype``          tensor dtype not in :data:`DTYPES`
    ``bad_shape``          rank not in 1..``max_rank``, a dim < 1, or data length not
                           matching the shape
    ``too_many_elements``  shape holds more than ``max_tensor_elements`` elements
    ``non_finite``         NaN or infinity in float tensor data (JSON numbers beyond the
                           float range included)
    ``bad_topic``          a topic, level or filter that is unsafe (see :mod:`schemas.topics`)

Topics
    :class:`Topics` builds every topic from configurable roots and refuses names that
    are not safe topic levels; ``validate_level``/``validate_topic``/``validate_filter``
    check names, topics and subscription filters.
"""

from .acks import ACK_IDS_MAX, ACK_MAX_BYTES, ResultAcks, decode_acks, encode_acks, message_id
from .anydecode import decode_any
from .deadletter import DeadLetter, decode_deadletter, encode_deadletter
from .errors import (
    DEADLETTER_REASONS,
    REASON_CODES,
    ContractError,
    DeadLetterReason,
    NodeRejectReason,
    ReasonCode,
)
from .escalation import (
    CASES_MAX,
    EdgeVerdict,
    Escalation,
    EscalationBatch,
    EscalationCase,
    decode_escalations,
    encode_escalations,
    make_case,
    make_escalation_batch,
)
from .frame import Frame, decode_frame, encode_frame
from .frames import decode_frames, encode_frames
from .ids import new_id, new_ids
from .limits import DEFAULT_LIMITS, Limits
from .logtext import log_text
from .replies import CaseVerdict, ReplyBatch, decode_replies, encode_replies
from .results import Result, ResultBatch, Source, decode_results, encode_results
from .sketch import SKETCH_BINS_MAX, SKETCH_MAX_BYTES, SketchWire, decode_sketch, encode_sketch
from .status import State, Status, decode_status, encode_status
from .telemetry import COUNT_NAMES, Telemetry, decode_telemetry, encode_telemetry
from .tensor import DTYPES, tensor_from_wire, tensor_to_wire
from .topics import Topics, validate_filter, validate_level, validate_topic
from .wire import VERSION
from .worker_telemetry import (
    WORKER_COUNT_NAMES,
    WorkerTelemetry,
    decode_worker_telemetry,
    encode_worker_telemetry,
)

__all__ = [
    "ACK_IDS_MAX",
    "ACK_MAX_BYTES",
    "CASES_MAX",
    "COUNT_NAMES",
    "DEADLETTER_REASONS",
    "DEFAULT_LIMITS",
    "DTYPES",
    "REASON_CODES",
    "SKETCH_BINS_MAX",
    "SKETCH_MAX_BYTES",
    "VERSION",
    "WORKER_COUNT_NAMES",
    "CaseVerdict",
    "ContractError",
    "DeadLetter",
    "DeadLetterReason",
    "EdgeVerdict",
    "Escalation",
    "EscalationBatch",
    "EscalationCase",
    "Frame",
    "Limits",
    "NodeRejectReason",
    "ReasonCode",
    "ReplyBatch",
    "Result",
    "ResultAcks",
    "ResultBatch",
    "SketchWire",
    "Source",
    "State",
    "Status",
    "Telemetry",
    "Topics",
    "WorkerTelemetry",
    "decode_acks",
    "decode_any",
    "decode_deadletter",
    "decode_escalations",
    "decode_frame",
    "decode_frames",
    "decode_replies",
    "decode_results",
    "decode_sketch",
    "decode_status",
    "decode_telemetry",
    "decode_worker_telemetry",
    "encode_acks",
    "encode_deadletter",
    "encode_escalations",
    "encode_frame",
    "encode_frames",
    "encode_replies",
    "encode_results",
    "encode_sketch",
    "encode_status",
    "encode_telemetry",
    "encode_worker_telemetry",
    "log_text",
    "make_case",
    "make_escalation_batch",
    "message_id",
    "new_id",
    "new_ids",
    "tensor_from_wire",
    "tensor_to_wire",
    "validate_filter",
    "validate_level",
    "validate_topic",
]
