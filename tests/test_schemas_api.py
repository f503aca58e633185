"""The package surface: exports, errors, limits, ids and decode_any."""

from __future__ import annotations

import pickle
import time
import uuid

import msgspec
import numpy as np
import pytest

import schemas
from schemas import (
    DEFAULT_LIMITS,
    REASON_CODES,
    ContractError,
    Frame,
    Limits,
    decode_any,
    encode_frame,
    new_id,
    new_ids,
)


def test_all_names_are_exported() -> None:
    for name in schemas.__all__:
        assert hasattr(schemas, name), name
    for name in ["decode_frame", "decode_results", "Topics", "validate_filter", "DTYPES"]:
        assert name in schemas.__all__
    doc = schemas.__doc__ or ""
    for code in REASON_CODES:
        assert f"``{code}``" in doc, code
    assert "ContractError" in doc


def test_contract_error() -> None:
    exc = ContractError("bad_shape", "rank 5 not in 1..4")
    assert isinstance(exc, ValueError)
    assert (exc.reason, exc.detail) == ("bad_shape", "rank 5 not in 1..4")
    assert str(exc) == "bad_shape: rank 5 not in 1..4"
    back = pickle.loads(pickle.dumps(exc))
    assert (back.reason, back.detail, str(back)) == (exc.reason, exc.detail, str(exc))
    assert {
        "payload_too_large",
        "malformed",
        "bad_schema",
        "bad_version",
        "bad_dtype",
        "bad_shape",
        "too_many_elements",
        "non_finite",
        "bad_topic",
    } == REASON_CODES


def test_limits() -> None:
    assert Limits() == DEFAULT_LIMITS
    assert DEFAULT_LIMITS.max_payload_bytes == 1_048_576
    assert DEFAULT_LIMITS.max_tensor_elements == 262_144
    assert (DEFAULT_LIMITS.max_rank, DEFAULT_LIMITS.max_str_len) == (4, 128)
    assert (DEFAULT_LIMITS.max_results_per_batch, DEFAULT_LIMITS.max_depth) == (4096, 16)
    assert hash(Limits(max_rank=3)) == hash(Limits(max_rank=3))
    with pytest.raises(AttributeError):
        DEFAULT_LIMITS.max_rank = 5  # type: ignore[misc]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_depth"):
            Limits(max_depth=bad)  # type: ignore[arg-type]


def test_new_id_is_unique_time_ordered_uuid7() -> None:
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7
    assert str(parsed) == ids[0]


def test_new_ids_batches_are_uuid7_ascending_after_every_earlier_id() -> None:
    earlier = new_id()
    batches = [new_ids(n) for n in (1, 64, 0, 3, 4096)]
    flat = [earlier] + [i for b in batches for i in b]
    assert [len(b) for b in batches] == [1, 64, 0, 3, 4096]
    assert len(set(flat)) == len(flat)
    assert flat == sorted(flat)
    for text in flat:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert str(parsed) == text
    # The embedded time is the clock's (ms), not ahead of it by the number of ids made.
    now_ms = time.time_ns() // 1_000_000
    assert 0 <= now_ms - (uuid.UUID(flat[-1]).int >> 80) < 60_000
    with pytest.raises(ValueError, match="n must be"):
        new_ids(-1)


def test_decode_any_msgpack() -> None:
    value = {"v": 1, "a": [1, -2, 2.5, None, True, "s", b"\x00\x01"], "m": {"k": {}}}
    assert decode_any(msgspec.msgpack.encode(value)) == value
    assert decode_any(b"\x05") == 5
    frame = decode_any(encode_frame(Frame(seq=1, ts=None, tensor=np.zeros(2, np.uint8))))
    assert frame == {"v": 1, "seq": 1, "dtype": "uint8", "shape": [2], "data": b"\x00\x00"}


def test_decode_any_json() -> None:
    assert decode_any(b' {"a": [1, 2.5, null, "x"]}') == {"a": [1, 2.5, None, "x"]}
    assert decode_any(b"[1, {}]") == [1, {}]


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", b"{", b"[1,]", b"[1e999]", b"[NaN]", b"\x92\x01", b'{"a":1} {}'],
    ids=repr,
)
def test_decode_any_refuses(payload: bytes) -> None:
    with pytest.raises(ContractError) as excinfo:
        decode_any(payload)
    assert excinfo.value.reason == "malformed"


def test_decode_any_size_cap() -> None:
    with pytest.raises(ContractError) as excinfo:
        decode_any(b"\x00" * 11, Limits(max_payload_bytes=10))
    assert excinfo.value.reason == "payload_too_large"
