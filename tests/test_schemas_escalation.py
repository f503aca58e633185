"""Escalation messages (a batch of cases) and reply messages (a batch of verdicts): round trips
and refusals, before, while and after decoding."""

from __future__ import annotations

import sys
import time
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    CASES_MAX,
    CaseVerdict,
    ContractError,
    EdgeVerdict,
    EscalationBatch,
    EscalationCase,
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
from schemas.fields import EPOCH_MAX
from schemas.scan_msgpack import scan_msgpack

levels = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/+#$"),
    min_size=1,
    max_size=40,
)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
corrs = st.text(st.characters(codec="utf-8"), min_size=1, max_size=16)
counters = st.integers(0, 2**63 - 1)
seconds = st.floats(0, sys.float_info.max, allow_nan=False, allow_infinity=False)
epochs = st.floats(0, EPOCH_MAX)
fractions = st.floats(0, 1)
int64s = st.integers(-(2**63), 2**63 - 1)


@st.composite
def verdicts(draw: st.DrawFn) -> EdgeVerdict:
    n = draw(st.integers(0, 16))
    return EdgeVerdict(
        label=draw(int64s),
        confidence=draw(fractions),
        margin=draw(fractions),
        entropy=draw(st.floats(0, 1e6)),
        top_labels=draw(st.lists(int64s, min_size=n, max_size=n)),
        top_probs=draw(st.lists(fractions, min_size=n, max_size=n)),
    )


tensors = st.sampled_from(
    [
        np.zeros((8, 8), np.float32),
        np.arange(6, dtype=np.uint8).reshape(2, 3),
        np.ones((1, 4, 4, 1), np.float32),
    ]
)


@st.composite
def escalation_batches(draw: st.DrawFn) -> EscalationBatch:
    wants_reply = draw(st.booleans())
    ids = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    cases = [
        make_case(
            id=i,
            release=draw(counters),
            device=draw(levels),
            sensor=draw(levels),
            frame_seq=draw(counters),
            tensor=draw(tensors),
            edge=draw(verdicts()),
            corr=draw(corrs) if wants_reply else None,
            deadline=draw(st.none() | epochs),
        )
        for i in ids
    ]
    return make_escalation_batch(
        node=draw(levels),
        model=draw(levels),
        ts=draw(epochs),
        cases=cases,
        reply_to="edge/gw-1/reply" if wants_reply else None,
        corr=draw(corrs) if wants_reply else None,
        offline=not wants_reply and draw(st.booleans()),
    )


case_verdicts = st.builds(
    CaseVerdict, id=names, corr=corrs, label=int64s, confidence=fractions, model=names
)
reply_batches = st.builds(
    ReplyBatch,
    node=levels,
    corr=corrs,
    worker=names,
    ts=epochs,
    verdicts=st.lists(case_verdicts, min_size=1, max_size=8),
)


@settings(max_examples=200)
@given(escalation_batches())
def test_escalation_batch_round_trip(batch: EscalationBatch) -> None:
    back = decode_escalations(encode_escalations(batch))
    assert back == batch
    deadlines = [c.deadline for c in batch.cases if c.deadline is not None]
    assert back.deadline == (min(deadlines) if deadlines else None)
    for view, case in zip(back.cases_view(), batch.cases, strict=True):
        assert (view.id, view.node, view.model, view.reply_to) == (
            case.id,
            batch.node,
            batch.model,
            batch.reply_to,
        )
        assert view.deadline == (case.deadline if case.deadline is not None else batch.deadline)


@settings(max_examples=200)
@given(reply_batches)
def test_reply_batch_round_trip(reply: ReplyBatch) -> None:
    assert decode_replies(encode_replies(reply)) == reply


def reason(decode: Any, payload: bytes, limits: Limits | None = None) -> ReasonCode:
    with pytest.raises(ContractError) as excinfo:
        decode(payload) if limits is None else decode(payload, limits)
    return excinfo.value.reason


IMAGE = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
VERDICT = EdgeVerdict(label=3, confidence=0.5, margin=0.1, entropy=1.0)


def _case(i: int, **changes: Any) -> EscalationCase:
    case = make_case(
        id=f"e{i}", release=1, device="cam-1", sensor="digits", frame_seq=i, tensor=IMAGE,
        edge=VERDICT, corr=f"c{i}", deadline=time.time() + 2 + i,
    )  # fmt: skip
    return msgspec.structs.replace(case, **changes)


def _batch(some: list[Any], **fields: Any) -> bytes:
    message: dict[str, Any] = {
        "v": 1, "node": "gw-1", "model": "digits", "ts": time.time(), "cases": some,
        "reply_to": "edge/gw-1/reply", "corr": "m1",
    }  # fmt: skip
    message.update(fields)
    return msgspec.msgpack.encode({k: v for k, v in message.items() if v is not ...})


def test_earliest_deadline_is_the_messages_and_a_case_without_one_takes_it() -> None:
    a, b = _case(0, deadline=100.0), _case(1, deadline=None)
    batch = make_escalation_batch(
        node="gw-1", model="digits", ts=1.0, cases=[_case(2, deadline=50.0), a, b],
        reply_to="edge/gw-1/reply", corr="m",
    )  # fmt: skip
    assert batch.deadline == 50.0
    views = decode_escalations(encode_escalations(batch)).cases_view()
    assert [v.deadline for v in views] == [50.0, 100.0, 50.0]
    assert views[1].expired(100.5) and not views[1].expired(99.0)
    np.testing.assert_array_equal(views[0].tensor(), IMAGE)


def test_case_cap_just_over_refused_from_the_array_header() -> None:
    full = _batch([_case(i) for i in range(CASES_MAX)])
    assert len(decode_escalations(full).cases) == CASES_MAX
    over = _batch([_case(i) for i in range(CASES_MAX + 1)])
    with pytest.raises(ContractError) as err:
        decode_escalations(over)
    assert err.value.reason == "bad_schema" and f"length <= {CASES_MAX}" in err.value.detail
    assert reason(decode_escalations, _batch([])) == "bad_schema"


def test_far_over_the_case_cap_refused_by_the_prescan_before_decoding() -> None:
    """Many small cases: more values than CASES_MAX cases can hold, refused by the structural
    pre-scan (nothing decoded, no object built); within the byte cap."""
    tiny = {"id": "x", "release": 0, "device": "d", "sensor": "s", "frame_seq": 0,
            "dtype": "uint8", "shape": [1], "data": b"\x00",
            "edge": {"label": 0, "confidence": 0.5, "margin": 0.0, "entropy": 0.0}}  # fmt: skip
    payload = _batch([tiny] * 4000, reply_to=..., corr=...)
    assert len(payload) < Limits().max_payload_bytes
    assert scan_msgpack(payload, max_depth=16, max_items=10**6) > 4000
    with pytest.raises(ContractError) as err:
        decode_escalations(payload)
    assert err.value.reason == "malformed" and "values" in err.value.detail


def test_size_cap_before_anything_is_read() -> None:
    payload = _batch([_case(i) for i in range(20)])
    assert reason(decode_escalations, payload, Limits(max_payload_bytes=len(payload) - 1)) == (
        "payload_too_large"
    )
    verdict = CaseVerdict(id="e0", corr="c0", label=1, confidence=0.5, model="m")
    reply = encode_replies(
        ReplyBatch(node="gw-1", corr="m", worker="w", ts=1.0, verdicts=[verdict])
    )
    assert reason(decode_replies, reply, Limits(max_payload_bytes=len(reply) - 1)) == (
        "payload_too_large"
    )


def test_one_hostile_case_refuses_the_whole_message() -> None:
    good = [_case(i) for i in range(3)]
    assert len(decode_escalations(_batch(good)).cases) == 3
    bad_tensor = msgspec.structs.replace(good[1], data=b"\x00" * 7)
    assert reason(decode_escalations, _batch([good[0], bad_tensor, good[2]])) == "bad_shape"
    nan = msgspec.structs.replace(good[1], data=np.full((8, 8), np.nan, np.float32).tobytes())
    assert reason(decode_escalations, _batch([good[0], nan])) == "non_finite"
    bad_device = msgspec.structs.replace(good[2], device="a/b")
    assert reason(decode_escalations, _batch([good[0], bad_device])) == "bad_schema"
    for sensor in ("$SYS", "s+", "s#", "s\x00", ""):
        bad_sensor = msgspec.structs.replace(good[1], sensor=sensor)
        with pytest.raises(ContractError, match=r"sensor|length") as caught:
            decode_escalations(_batch([good[0], bad_sensor]))
        assert caught.value.reason == "bad_schema"
    twice = _batch([good[0], good[1], good[0]])
    assert reason(decode_escalations, twice) == "bad_schema"
    no_corr = msgspec.structs.replace(good[1], corr=None)
    assert reason(decode_escalations, _batch([good[0], no_corr])) == "bad_schema"
    lopsided = EdgeVerdict(
        label=1, confidence=0.5, margin=0.1, entropy=1.0, top_labels=[1], top_probs=[]
    )
    uneven = msgspec.structs.replace(good[0], edge=lopsided)
    assert reason(decode_escalations, _batch([uneven])) == "bad_schema"


@pytest.mark.parametrize(
    "fields",
    [
        {"reply_to": ...},  # corr without reply_to
        {"corr": ...},
        {"reply_to": "edge/+/reply"},
        {"node": "a/b"},
        {"model": ""},
        {"node": "n" * 129},
        {"ts": -1.0},
        {"deadline": float("nan")},
        {"cases": "e0"},
        {"offline": "yes"},
    ],
    ids=repr,
)
def test_bad_escalation_messages(fields: dict[str, Any]) -> None:
    assert reason(decode_escalations, _batch([_case(0)], **fields)) in ("bad_schema", "bad_topic")


def test_upload_has_no_reply_address_and_unknown_fields_are_ignored() -> None:
    up = _case(0, corr=None, deadline=None)
    batch = decode_escalations(
        _batch([{**msgspec.structs.asdict(up), "later": 1}], reply_to=..., corr=..., extra=[1])
    )
    assert not batch.wants_reply and batch.cases_view()[0].deadline is None
    assert reason(decode_escalations, _batch([_case(0)], v=2)) == "bad_version"


def test_reply_refusals() -> None:
    verdict = {"id": "e0", "corr": "c0", "label": 1, "confidence": 0.5, "model": "m"}

    def reply(*vs: Any, **fields: Any) -> bytes:
        message: dict[str, Any] = {"v": 1, "node": "gw-1", "corr": "m", "worker": "w", "ts": 1.0}
        message["verdicts"] = list(vs)
        message.update(fields)
        return msgspec.msgpack.encode({k: v for k, v in message.items() if v is not ...})

    assert len(decode_replies(reply(verdict, verdict)).verdicts) == 2
    assert reason(decode_replies, reply()) == "bad_schema"
    assert reason(decode_replies, reply(*[verdict] * (CASES_MAX + 1))) == "bad_schema"
    assert reason(decode_replies, reply(verdict, node="x/y")) == "bad_schema"
    assert reason(decode_replies, reply(verdict, corr=...)) == "bad_schema"
    assert reason(decode_replies, reply({**verdict, "confidence": 2.0})) == "bad_schema"
    assert reason(decode_replies, reply({**verdict, "corr": "c" * 65})) == "bad_schema"
    assert reason(decode_replies, reply({**verdict, "id": "i" * 129})) == "bad_schema"
    assert reason(decode_replies, reply(verdict, v=3)) == "bad_version"
    assert reason(decode_replies, b"\x81\xa1v\x01") == "bad_schema"
    assert reason(decode_replies, b"\xc1") == "malformed"
