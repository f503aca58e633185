"""Results, status and dead letters: round trips and refusals."""

from __future__ import annotations

import sys
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    ContractError,
    DeadLetter,
    Limits,
    Result,
    ResultBatch,
    Status,
    decode_deadletter,
    decode_results,
    decode_status,
    encode_deadletter,
    encode_results,
    encode_status,
    new_id,
)
from schemas.errors import ReasonCode
from schemas.fields import EPOCH_MAX

# Names that are also valid topic levels, and free text; no surrogates (not UTF-8).
levels = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/+#$"),
    min_size=1,
    max_size=40,
)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
texts = st.text(st.characters(codec="utf-8"), max_size=200)
counters = st.integers(0, 2**63 - 1)
seconds = st.floats(0, sys.float_info.max, allow_nan=False, allow_infinity=False)
epochs = st.floats(0, EPOCH_MAX)

results = st.builds(
    Result,
    id=st.just(new_id()) | names,
    seq=counters,
    device=levels,
    sensor=levels,
    frame_seq=counters,
    frame_ts=st.none() | epochs,
    model=levels,
    release=counters,
    label=st.integers(-(2**63), 2**63 - 1),
    confidence=st.floats(0, 1),
    source=st.sampled_from(["edge", "cloud", "cloud_cached", "edge_fallback", "edge_offline"]),
    latency_ms=seconds,
)
batches = st.builds(ResultBatch, node=levels, results=st.lists(results, min_size=1, max_size=8))
statuses = st.builds(
    Status,
    node=levels,
    state=st.sampled_from(["online", "offline", "degraded"]),
    ts=epochs,
    reasons=st.lists(names, max_size=5),
    model=st.none() | levels,
    release=st.none() | counters,
    runtime=st.none() | names,
    provider=st.none() | names,
    boot_id=st.none() | names,
)
letters = st.builds(
    DeadLetter,
    node=levels,
    id=names,
    seq=counters,
    ts=epochs,
    topic=texts,
    reason=names,
    detail=texts,
    payload_bytes=counters,
    payload_head=st.binary(max_size=64),
)


@settings(max_examples=200)
@given(batches)
def test_results_round_trip(batch: ResultBatch) -> None:
    assert decode_results(encode_results(batch)) == batch


@settings(max_examples=200)
@given(results)
def test_result_round_trip_alone_in_a_batch(result: Result) -> None:
    (back,) = decode_results(encode_results(ResultBatch(node="gw-1", results=[result]))).results
    assert back == result


@settings(max_examples=200)
@given(statuses)
def test_status_round_trip(status: Status) -> None:
    assert decode_status(encode_status(status)) == status


@settings(max_examples=200)
@given(letters)
def test_deadletter_round_trip(letter: DeadLetter) -> None:
    assert decode_deadletter(encode_deadletter(letter)) == letter


def reason(decode: Any, payload: bytes, limits: Limits | None = None) -> ReasonCode:
    with pytest.raises(ContractError) as excinfo:
        decode(payload) if limits is None else decode(payload, limits)
    return excinfo.value.reason


RESULT: dict[str, Any] = {
    "id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
    "seq": 7,
    "device": "cam-3",
    "sensor": "digits",
    "frame_seq": 42,
    "model": "digits",
    "release": 3,
    "label": 7,
    "confidence": 0.93,
    "source": "edge",
    "latency_ms": 0.41,
}


def batch(*results: dict[str, Any], **fields: Any) -> bytes:
    message: dict[str, Any] = {"v": 1, "node": "gw-1", "results": list(results) or [RESULT]}
    message.update(fields)
    return msgspec.msgpack.encode({k: v for k, v in message.items() if v is not ...})


def test_design_example_decodes() -> None:
    decoded = decode_results(batch())
    assert decoded.node == "gw-1"
    assert decoded.results[0].frame_ts is None
    assert decoded.results[0] == Result(**RESULT)


def test_unknown_fields_are_ignored_at_every_level() -> None:
    decoded = decode_results(batch({**RESULT, "later": [1, 2]}, extra={"a": 1}))
    assert decoded.results[0].label == 7


@pytest.mark.parametrize(
    "change",
    [
        {"source": "somewhere"},
        {"confidence": 1.5},
        {"confidence": float("nan")},
        {"latency_ms": -1.0},
        {"latency_ms": float("inf")},
        {"seq": -1},
        {"frame_seq": 2**63},
        {"release": -1},
        {"device": "a/b"},
        {"device": "+"},
        {"sensor": ""},
        {"model": "$SYS"},
        {"id": ""},
        {"id": "x" * 129},
        {"device": "d" * 129},
        {"label": "7"},
        {"frame_ts": -1.0},
        {"source": ...},
    ],
    ids=repr,
)
def test_bad_results(change: dict[str, Any]) -> None:
    result = {k: v for k, v in {**RESULT, **change}.items() if v is not ...}
    assert reason(decode_results, batch(result)) == "bad_schema"


def test_batch_size_limits() -> None:
    assert reason(decode_results, batch(results=[])) == "bad_schema"
    three = batch(RESULT, RESULT, RESULT)
    assert len(decode_results(three, Limits(max_results_per_batch=3)).results) == 3
    assert reason(decode_results, three, Limits(max_results_per_batch=2)) == "bad_schema"
    huge = batch(*[RESULT] * 200)
    assert reason(decode_results, huge, Limits(max_results_per_batch=2)) == "malformed"


def test_name_length_follows_limits() -> None:
    long_node = batch(node="n" * 200)
    assert reason(decode_results, long_node) == "bad_schema"
    assert decode_results(long_node, Limits(max_str_len=200)).node == "n" * 200


@pytest.mark.parametrize(
    ("decode", "payload"),
    [
        (decode_results, batch(v=2)),
        (decode_status, msgspec.msgpack.encode({"v": 3})),
        (decode_deadletter, msgspec.msgpack.encode({"v": 0, "node": 5})),
    ],
)
def test_other_versions(decode: Any, payload: bytes) -> None:
    assert reason(decode, payload) == "bad_version"


@pytest.mark.parametrize("decode", [decode_results, decode_status, decode_deadletter])
def test_version_is_required(decode: Any) -> None:
    assert reason(decode, batch(v=...)) == "bad_schema"
    assert reason(decode, msgspec.msgpack.encode([1])) == "bad_schema"


@settings(max_examples=100)
@given(batches)
def test_results_json_round_trip(batch: ResultBatch) -> None:
    payload = encode_results(batch, as_json=True)
    assert payload.startswith(b"{")
    assert decode_results(payload) == batch


def test_results_json_is_checked_like_msgpack() -> None:
    good = msgspec.json.encode({"v": 1, "node": "gw-1", "results": [RESULT]})
    assert decode_results(b"  " + good).results[0] == Result(**RESULT)
    assert reason(decode_results, good.replace(b'"v":1', b'"v":2')) == "bad_version"
    assert reason(decode_results, good.replace(b'"edge"', b'"moon"')) == "bad_schema"
    assert reason(decode_results, good[:-1]) == "malformed"
    deep = good[:-1] + b',"x":' + b"[" * 100_000 + b"}"
    assert reason(decode_results, deep) == "malformed"


@pytest.mark.parametrize("decode", [decode_status, decode_deadletter])
def test_status_and_deadletter_are_msgpack_only(decode: Any) -> None:
    assert reason(decode, b'{"v": 1}') == "malformed"


STATUS: dict[str, Any] = {"v": 1, "node": "gw-1", "state": "degraded", "ts": 5.0}


@pytest.mark.parametrize(
    "change",
    [
        {"state": "sleeping"},
        {"ts": -1.0},
        {"ts": ...},
        {"reasons": ["ok"] * 65},
        {"reasons": [""]},
        {"reasons": ["r" * 129]},
        {"node": "a#"},
        {"release": -3},
        {"boot_id": 5},
    ],
    ids=repr,
)
def test_bad_status(change: dict[str, Any]) -> None:
    message = {k: v for k, v in {**STATUS, **change}.items() if v is not ...}
    assert reason(decode_status, msgspec.msgpack.encode(message)) == "bad_schema"


def test_status_defaults() -> None:
    status = decode_status(msgspec.msgpack.encode(STATUS))
    assert status == Status(node="gw-1", state="degraded", ts=5.0)
    assert status.reasons == []


LETTER: dict[str, Any] = {
    "v": 1,
    "node": "gw-1",
    "id": "i",
    "seq": 1,
    "ts": 1.0,
    "topic": "sensors/a/b",
    "reason": "malformed",
    "detail": "msgpack: truncated",
    "payload_bytes": 3,
    "payload_head": b"\x91\x91\x91",
}


@pytest.mark.parametrize(
    "change",
    [
        {"payload_head": b"x" * 65},
        {"payload_head": "text"},
        {"payload_bytes": -1},
        {"detail": "d" * 1025},
        {"topic": ...},
        {"reason": ""},
    ],
    ids=repr,
)
def test_bad_deadletter(change: dict[str, Any]) -> None:
    message = {k: v for k, v in {**LETTER, **change}.items() if v is not ...}
    assert reason(decode_deadletter, msgspec.msgpack.encode(message)) == "bad_schema"


def test_deadletter_carries_the_rejected_head() -> None:
    letter = decode_deadletter(msgspec.msgpack.encode(LETTER))
    assert letter.payload_head == b"\x91\x91\x91"
    assert isinstance(letter.payload_head, bytes)


@pytest.mark.parametrize("decode", [decode_results, decode_status, decode_deadletter])
def test_size_cap(decode: Any) -> None:
    payload = encode_deadletter(DeadLetter(**{**LETTER, "detail": "x" * 1000}))
    assert reason(decode, payload, Limits(max_payload_bytes=len(payload) - 1)) == (
        "payload_too_large"
    )
