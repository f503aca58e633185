"""Inference results, always published as a batch of one or more, each naming its frame.

MessagePack by default; JSON (``encode_results(..., as_json=True)``) for consumers with only
plain tools. :func:`decode_results` accepts either (JSON: first non-whitespace byte ``{``).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from .errors import ContractError
from .fields import Epoch, Fraction, Int64, Level, Name, Seconds, Seq, check_names
from .limits import DEFAULT_LIMITS, Limits
from .wire import check_size, decode_json, decode_msgpack, is_json_object

Source = Literal["edge", "cloud", "cloud_cached", "edge_fallback", "edge_offline"]
"""Who produced the verdict: the edge model; the cloud worker (fresh or cached); the edge
model because the cloud was slow or failed (``edge_fallback``) or unreachable
(``edge_offline``)."""


class Result(msgspec.Struct, frozen=True, kw_only=True):
    id: Name
    """Unique, time-ordered (:func:`schemas.ids.new_id`); consumers deduplicate on it."""
    seq: Seq
    """Per-node counter of results."""
    device: Level
    sensor: Level
    frame_seq: Seq
    frame_ts: Epoch | None = None
    model: Level
    release: Seq
    label: Int64
    confidence: Fraction
    source: Source
    latency_ms: Seconds


class ResultBatch(msgspec.Struct, frozen=True, kw_only=True):
    node: Level
    results: Annotated[list[Result], Meta(min_length=1)]
    v: int = 1


_MSGPACK: Final = msgspec.msgpack.Decoder(ResultBatch)
_JSON: Final = msgspec.json.Decoder(ResultBatch)
_BATCH_FIELDS: Final = 3
_RESULT_FIELDS: Final = 12


def encode_results(batch: ResultBatch, *, as_json: bool = False) -> bytes:
    """MessagePack (or JSON) of ``batch``. Encoding does not validate; decoding does."""
    return msgspec.json.encode(batch) if as_json else msgspec.msgpack.encode(batch)


def decode_results(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> ResultBatch:
    """Decode and validate a results batch; raises only :class:`~schemas.errors.ContractError`."""
    per_result = 1 + 2 * _RESULT_FIELDS
    budget = 1 + 2 * _BATCH_FIELDS + per_result * limits.max_results_per_batch
    budget += limits.max_extra_items
    payload = check_size(payload, limits)
    if is_json_object(payload):
        batch = decode_json(payload, _JSON.decode, what="results", limits=limits, budget=budget)
    else:
        batch = decode_msgpack(
            payload, _MSGPACK.decode, what="results", limits=limits, budget=budget
        )
    if len(batch.results) > limits.max_results_per_batch:
        raise ContractError(
            "bad_schema",
            f"results: {len(batch.results)} results > {limits.max_results_per_batch} per batch",
        )
    check_names(limits, "results", [batch.node])
    for r in batch.results:
        check_names(limits, "result", (r.id, r.device, r.sensor, r.model))
    return batch
