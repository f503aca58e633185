"""The confirmations of end-to-end mode (``edge/{node}/acks``, schemas/acks.py): what a consumer
sends round-trips; whatever else comes is refused with a stable reason, within the caps."""

from __future__ import annotations

import msgspec
import pytest

from schemas import (
    ACK_IDS_MAX,
    ACK_MAX_BYTES,
    ContractError,
    Limits,
    Result,
    ResultAcks,
    ResultBatch,
    decode_acks,
    encode_acks,
    encode_results,
    message_id,
    new_ids,
)

IDS = new_ids(3)


@pytest.mark.parametrize("as_json", [False, True], ids=["msgpack", "json"])
def test_a_confirmation_round_trips(as_json: bool) -> None:
    acks = ResultAcks(ids=IDS, by="bridge-s1")
    assert decode_acks(encode_acks(acks, as_json=as_json)) == acks


def test_a_full_confirmation_fits_the_size_cap() -> None:
    full = ResultAcks(ids=new_ids(ACK_IDS_MAX), by="bridge-s1")
    for as_json in (False, True):
        payload = encode_acks(full, as_json=as_json)
        assert len(payload) <= ACK_MAX_BYTES
        assert decode_acks(payload) == full


def test_a_results_message_is_named_by_its_first_result() -> None:
    ids = new_ids(2)
    batch = ResultBatch(
        node="gw-1",
        results=[
            Result(
                id=i,
                seq=n,
                device="cam-1",
                sensor="digits",
                frame_seq=n,
                model="digits",
                release=1,
                label=3,
                confidence=0.9,
                source="edge",
                latency_ms=1.0,
            )
            for n, i in enumerate(ids)
        ],
    )
    assert message_id(batch) == ids[0]
    assert encode_results(batch)  # (the node confirms its own encoding by this id)


def _mp(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\x00"  # [[[...[0]...]]]


HOSTILE: list[tuple[str, bytes, str]] = [
    ("empty", b"", "malformed"),
    ("not msgpack", b"\xc1", "malformed"),
    ("oversized", b"\x90" + b"\x00" * ACK_MAX_BYTES, "payload_too_large"),
    ("oversized json", b"{" + b" " * ACK_MAX_BYTES + b"}", "payload_too_large"),
    ("too many ids", _mp({"ids": ["a"] * (ACK_IDS_MAX + 1), "v": 1}), "bad_schema"),
    (
        "far too many ids",
        _mp({"ids": ["a"] * (ACK_IDS_MAX + 2000), "v": 1}),
        "malformed",  # more values than the schema can hold: refused by the pre-scan
    ),
    ("no ids", _mp({"ids": [], "v": 1}), "bad_schema"),
    ("ids missing", _mp({"v": 1}), "bad_schema"),
    ("an empty id", _mp({"ids": [""], "v": 1}), "bad_schema"),
    ("an id too long", _mp({"ids": ["x" * 129], "v": 1}), "bad_schema"),
    ("ids not a list", _mp({"ids": "abc", "v": 1}), "bad_schema"),
    ("ids of numbers", b'{"ids": [1, 2], "v": 1}', "bad_schema"),
    ("a bad consumer name", _mp({"ids": ["a"], "by": "a/b", "v": 1}), "bad_schema"),
    ("another version", _mp({"ids": ["a"], "v": 2}), "bad_version"),
    ("no version", _mp({"ids": ["a"]}), "bad_schema"),
    ("a list, not a map", _mp(["a", "b"]), "bad_schema"),
    ("nested deep", _nested(10_000), "malformed"),
    ("truncated", _mp({"ids": IDS, "v": 1})[:-3], "malformed"),
    ("trailing bytes", _mp({"ids": IDS, "v": 1}) + b"\x00", "malformed"),
    ("json garbage", b"{not json", "malformed"),
]


@pytest.mark.parametrize(
    ("payload", "reason"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_a_hostile_confirmation_is_refused_with_its_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ContractError) as caught:
        decode_acks(payload)
    assert caught.value.reason == reason


def test_the_size_cap_holds_whatever_the_limits_allow() -> None:
    roomy = Limits(max_payload_bytes=16 * 1024 * 1024)
    with pytest.raises(ContractError) as caught:
        decode_acks(b"\x90" + b"\x00" * ACK_MAX_BYTES, roomy)
    assert caught.value.reason == "payload_too_large"
    tight = Limits(max_payload_bytes=100)
    with pytest.raises(ContractError) as caught:
        decode_acks(encode_acks(ResultAcks(ids=new_ids(10))), tight)
    assert caught.value.reason == "payload_too_large"
