"""Escalation messages skip the generic pre-scan when they are exactly what a node encodes
(docs/adr/0033-canonical-fast-path.md). Hostile input must still be refused with a clear
ContractError, with little memory, and without the closed decoder ever walking into what it
refuses; and the fast path must accept exactly what the full pipeline accepts.

Payloads are built before measuring, so the tracemalloc peak is what decoding allocated.
"""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    CASES_MAX,
    ContractError,
    EdgeVerdict,
    EscalationBatch,
    Limits,
    ReplyBatch,
    decode_escalations,
    decode_replies,
    encode_escalations,
    encode_replies,
    make_case,
    make_escalation_batch,
)
from schemas.errors import ReasonCode
from schemas.escalation import (
    _ESC_DECODER,
    SCHEMA_DEPTH,
    TOP_MAX,
    _budget,
    _decode_scanned,
)
from schemas.escalation_checks import check_batch as _check_batch
from schemas.replies import _REPLY_DECODER, _check_reply, _decode_reply_scanned
from schemas.scan_msgpack import scan_msgpack
from tests.hostile_bytes import DEEP, HUGE_CLAIM, MILLION, mutate, with_raw_field

KiB = 1024
IMAGE = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
VERDICT = EdgeVerdict(label=3, confidence=0.5, margin=0.1, entropy=1.0)


def _case(i: int) -> dict[str, Any]:
    case = make_case(
        id=f"e{i}", release=1, device="cam-1", sensor="digits", frame_seq=i, tensor=IMAGE,
        edge=VERDICT, corr=f"c{i}", deadline=time.time() + 2,
    )  # fmt: skip
    return msgspec.structs.asdict(case) | {"edge": msgspec.structs.asdict(VERDICT)}


def _message(cases: list[Any]) -> dict[str, Any]:
    return {
        "node": "gw-1", "model": "digits", "ts": time.time(), "cases": cases,
        "reply_to": "edge/gw-1/reply", "corr": "m1", "v": 1,
    }  # fmt: skip


def refused(payload: bytes, limits: Limits | None = None) -> tuple[ReasonCode, str, int]:
    """(reason, detail, peak bytes allocated while decoding)."""
    tracemalloc.start()
    try:
        decode_escalations(payload, limits or Limits())
    except ContractError as exc:
        return exc.reason, exc.detail, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    pytest.fail(f"{payload[:40]!r}... was accepted")


def closed_decoder_refusal(payload: bytes) -> str:
    with pytest.raises(msgspec.DecodeError) as excinfo:
        _ESC_DECODER.decode(payload)
    return str(excinfo.value)


def _hostile_unknown_field(where: str, value: bytes) -> bytes:
    """A one-case message with an unknown field ``x`` = ``value`` in the message, the case
    or the case's edge verdict."""
    case = _case(0)
    edge = msgspec.msgpack.encode(case.pop("edge"))
    if where == "edge":
        edge = with_raw_field(edge, b"x", value)
    case_raw = with_raw_field(msgspec.msgpack.encode(case), b"edge", edge)
    if where == "case":
        case_raw = with_raw_field(case_raw, b"x", value)
    message = _message([])
    del message["cases"]
    raw = with_raw_field(msgspec.msgpack.encode(message), b"cases", b"\x91" + case_raw)
    if where == "message":
        raw = with_raw_field(raw, b"x", value)
    return raw


def test_the_helper_builds_valid_messages() -> None:
    for where in ("message", "case", "edge"):
        batch = decode_escalations(_hostile_unknown_field(where, b"\x01"))
        assert batch.cases[0].id == "e0"  # unknown fields of this size are ignored


@pytest.mark.parametrize("where", ["message", "case", "edge"])
@pytest.mark.parametrize(
    "value", [DEEP, HUGE_CLAIM, MILLION], ids=["deep", "claim_2_32", "million_entries"]
)
def test_unknown_field_deep_or_huge(where: str, value: bytes) -> None:
    payload = _hostile_unknown_field(where, value)
    assert len(payload) <= Limits().max_payload_bytes
    # The closed decoder stops at the unknown key, before reading a byte of its value ...
    assert "unknown field `x`" in closed_decoder_refusal(payload)
    # ... and the full pipeline then refuses it from the pre-scan, allocating next to nothing.
    reason, detail, peak = refused(payload)
    assert reason == "malformed", detail
    assert peak < 64 * KiB


@pytest.mark.parametrize("field", ["cases", "shape", "top_labels", "top_probs"])
@pytest.mark.parametrize("value", [HUGE_CLAIM, MILLION], ids=["claim_2_32", "million_entries"])
def test_known_list_far_over_its_cap(field: str, value: bytes) -> None:
    case = _case(0)
    edge = case.pop("edge")
    target = edge if field.startswith("top_") else case
    target.pop(field, None)
    edge_raw = msgspec.msgpack.encode(edge)
    if target is edge:
        edge_raw = with_raw_field(edge_raw, field.encode(), value)
    case_raw = with_raw_field(msgspec.msgpack.encode(case), b"edge", edge_raw)
    if target is case:
        case_raw = with_raw_field(case_raw, field.encode(), value)
    message = _message([])
    del message["cases"]
    cases = value if field == "cases" else b"\x91" + case_raw
    payload = with_raw_field(msgspec.msgpack.encode(message), b"cases", cases)
    assert len(payload) <= Limits().max_payload_bytes
    # Refused from the array header: no element is decoded.
    assert "of length <=" in closed_decoder_refusal(payload)
    reason, detail, peak = refused(payload)
    assert reason in ("malformed", "bad_schema"), detail
    assert peak < 64 * KiB


@pytest.mark.parametrize(
    ("key", "claim"),
    [(b"\xa4data", b"\xc6\x80\x00\x00\x00"), (b"\xa6device", b"\xdb\x80\x00\x00\x00")],
    ids=["bin32", "str32"],
)
def test_value_claiming_2_gib_in_a_known_field(key: bytes, claim: bytes) -> None:
    payload = msgspec.msgpack.encode(_message([_case(0)]))
    cut = payload.index(key) + len(key)
    hostile = payload[:cut] + claim + b"\x00" * 100
    assert "truncated" in closed_decoder_refusal(hostile)
    reason, detail, peak = refused(hostile)
    assert reason == "malformed", detail
    assert peak < 64 * KiB


def test_duplicate_keys_take_the_full_pipeline() -> None:
    # msgspec keeps the last of duplicate keys; such a payload is not canonical, so the
    # pre-scan counts every value, as before: a few duplicates pass, many are refused.
    one = msgspec.msgpack.encode(_message([_case(0)]))
    two = with_raw_field(one, b"ts", msgspec.msgpack.encode(5.0))
    assert msgspec.msgpack.encode(_ESC_DECODER.decode(two)) != two
    assert decode_escalations(two).ts == 5.0
    many = one
    full = msgspec.msgpack.encode([_case(i) for i in range(CASES_MAX)])
    for _ in range(8):
        many = with_raw_field(many, b"cases", full)
    assert len(many) <= Limits().max_payload_bytes
    assert _ESC_DECODER.decode(many)  # the closed schema alone would accept it
    reason, detail, _ = refused(many)
    assert reason == "malformed" and "values" in detail


def test_schema_depth_and_budget_are_what_the_schema_can_hold() -> None:
    widest = EdgeVerdict(
        label=1, confidence=0.5, margin=0.1, entropy=1.0,
        top_labels=[2**62] * TOP_MAX, top_probs=[0.5] * TOP_MAX,
    )  # fmt: skip
    cases = [
        make_case(
            id=f"{i:0>128}", release=2**63 - 1, device="d" * 128, sensor="s", frame_seq=1,
            tensor=np.zeros((1, 1, 1, 1), np.float32), edge=widest, corr="c" * 64, deadline=1.0,
        )
        for i in range(CASES_MAX)
    ]  # fmt: skip
    batch = make_escalation_batch(
        node="n", model="m", ts=1.0, cases=cases, reply_to="edge/n/reply", corr="m" * 64
    )
    payload = encode_escalations(batch)
    limits = Limits(max_extra_items=1)
    values = scan_msgpack(payload, max_depth=SCHEMA_DEPTH, max_items=10**7)
    assert values + 4 * CASES_MAX <= _budget(limits) - 1  # rank 8 shapes would add 4 per case
    with pytest.raises(ContractError, match="nested deeper"):
        scan_msgpack(payload, max_depth=SCHEMA_DEPTH - 1, max_items=10**7)
    assert decode_escalations(payload, limits) == batch
    # Below the schema's depth the fast path is off and the pre-scan refuses.
    assert refused(payload, Limits(max_depth=SCHEMA_DEPTH - 1))[0] == "malformed"


# The fast path and the full pipeline agree on everything.

base_payloads = st.builds(
    lambda n, extra: msgspec.msgpack.encode(_message([_case(i) | extra for i in range(n)])),
    st.integers(1, 4),
    st.sampled_from([{}, {"later": 1}, {"shape": [8, 8, 1]}, {"corr": None}]),
)
mutations = st.tuples(
    base_payloads,
    st.integers(0, 10_000),
    st.integers(0, 255),
    st.sampled_from(["flip", "insert", "delete", "truncate", "none"]),
)


def _outcome(decode: Any, payload: bytes) -> EscalationBatch | tuple[str, str]:
    try:
        result: EscalationBatch = decode(payload)
    except ContractError as exc:
        return (exc.reason, exc.detail)
    return result


def _full_pipeline(payload: bytes) -> EscalationBatch:
    batch = _decode_scanned(payload, Limits())
    _check_batch(batch, Limits())
    return batch


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(mutations.map(mutate))
def test_fast_path_accepts_exactly_what_the_full_pipeline_accepts(payload: bytes) -> None:
    fast = _outcome(decode_escalations, payload)
    full = _outcome(_full_pipeline, payload)
    if isinstance(full, tuple):
        assert isinstance(fast, tuple) and fast[0] == full[0], (fast, full)
    else:
        assert fast == full and type(fast) is EscalationBatch
        assert all(type(c).__name__ == "EscalationCase" for c in fast.cases)


# Replies (worker -> node) take the same fast path.


def _reply(n: int, **extra: Any) -> dict[str, Any]:
    verdicts = [
        {"id": f"e{i}", "corr": f"c{i}", "label": i % 10, "confidence": 0.9, "model": "m-1"} | extra
        for i in range(n)
    ]
    return {"node": "gw-1", "corr": "m1", "worker": "w", "ts": 1.5, "verdicts": verdicts, "v": 1}


def _reply_bytes(where: str, value: bytes) -> bytes:
    message = _reply(1)
    verdict = msgspec.msgpack.encode(message.pop("verdicts")[0])
    if where == "verdict":
        verdict = with_raw_field(verdict, b"x", value)
    raw = with_raw_field(msgspec.msgpack.encode(message), b"verdicts", b"\x91" + verdict)
    if where == "message":
        raw = with_raw_field(raw, b"x", value)
    return raw


def reply_refused(payload: bytes) -> tuple[ReasonCode, str, int]:
    tracemalloc.start()
    try:
        decode_replies(payload)
    except ContractError as exc:
        return exc.reason, exc.detail, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    pytest.fail(f"{payload[:40]!r}... was accepted")


def test_the_reply_helper_builds_valid_replies() -> None:
    for where in ("message", "verdict"):
        assert decode_replies(_reply_bytes(where, b"\x01")).verdicts[0].id == "e0"


@pytest.mark.parametrize("where", ["message", "verdict"])
@pytest.mark.parametrize(
    "value", [DEEP, HUGE_CLAIM, MILLION], ids=["deep", "claim_2_32", "million_entries"]
)
def test_reply_unknown_field_deep_or_huge(where: str, value: bytes) -> None:
    payload = _reply_bytes(where, value)
    with pytest.raises(msgspec.DecodeError, match="unknown field `x`"):
        _REPLY_DECODER.decode(payload)
    reason, detail, peak = reply_refused(payload)
    assert reason == "malformed", detail
    assert peak < 64 * KiB


@pytest.mark.parametrize("value", [HUGE_CLAIM, MILLION], ids=["claim_2_32", "million_entries"])
def test_reply_verdicts_far_over_the_cap(value: bytes) -> None:
    message = _reply(1)
    del message["verdicts"]
    payload = with_raw_field(msgspec.msgpack.encode(message), b"verdicts", value)
    with pytest.raises(msgspec.DecodeError, match="of length <="):
        _REPLY_DECODER.decode(payload)
    reason, detail, peak = reply_refused(payload)
    assert reason in ("malformed", "bad_schema"), detail
    assert peak < 64 * KiB


reply_mutations = st.tuples(
    st.builds(
        lambda n, extra: (
            encode_replies(msgspec.convert(_reply(n), ReplyBatch))
            if not extra
            else msgspec.msgpack.encode(_reply(n, **extra))
        ),
        st.integers(1, 4),
        st.sampled_from([{}, {"later": [1]}, {"confidence": 2.0}]),
    ),
    st.integers(0, 10_000),
    st.integers(0, 255),
    st.sampled_from(["flip", "insert", "delete", "truncate", "none"]),
)


def _full_reply_pipeline(payload: bytes) -> ReplyBatch:
    reply = _decode_reply_scanned(payload, Limits())
    _check_reply(reply, Limits())
    return reply


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(reply_mutations.map(mutate))
def test_reply_fast_path_accepts_exactly_what_the_full_pipeline_accepts(payload: bytes) -> None:
    fast = _outcome(decode_replies, payload)
    full = _outcome(_full_reply_pipeline, payload)
    if isinstance(full, tuple):
        assert isinstance(fast, tuple) and fast[0] == full[0], (fast, full)
    else:
        assert fast == full and type(fast) is ReplyBatch
