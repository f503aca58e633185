"""Frame batches (schemas/frames.py): several frames of one sensor in one message. A message
that is a single frame must decode exactly as `decode_frame` decodes it, refusals included;
a batch is capped in entries and in tensor elements, and hostile batches are refused cheaply."""

from __future__ import annotations

import struct
import tracemalloc

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from schemas import (
    ContractError,
    Frame,
    Limits,
    decode_frame,
    decode_frames,
    encode_frame,
    encode_frames,
)
from schemas.frames import _CANONICAL_BATCH, FRAMES_MAX, _msgpack_batch
from schemas.wire import is_json_object
from tests.hostile_bytes import DEEP, HUGE_CLAIM, MILLION, mutate, outcome

KiB = 1024
IMAGES = [np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8) * k for k in (1, 2, 3)]
FRAMES = [Frame(seq=i, ts=1766400000.0 + i, tensor=img) for i, img in enumerate(IMAGES)]


def refused(payload: bytes, limits: Limits | None = None) -> tuple[str, str, int]:
    tracemalloc.start()
    try:
        decode_frames(payload, limits or Limits())
    except ContractError as exc:
        return exc.reason, exc.detail, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    pytest.fail(f"{payload[:40]!r}... was accepted")


@pytest.mark.parametrize("as_json", [False, True], ids=["msgpack", "json"])
def test_a_batch_round_trips_in_order(as_json: bool) -> None:
    assert decode_frames(encode_frames(FRAMES, as_json=as_json)) == FRAMES


def test_a_single_frame_message_is_a_batch_of_one() -> None:
    for frame in FRAMES:
        assert decode_frames(encode_frame(frame)) == [frame]
        assert decode_frames(encode_frame(frame, as_json=True)) == [frame]


def test_what_encode_frames_writes_takes_the_closed_path() -> None:
    payload = encode_frames(FRAMES)
    assert msgspec.msgpack.encode(_CANONICAL_BATCH.decode(payload)) == payload


def test_another_key_order_takes_the_full_pipeline_with_the_same_frames() -> None:
    entries = [
        {"data": f.tensor.tobytes(), "shape": [8, 8], "dtype": "float32", "ts": f.ts, "seq": f.seq}
        for f in FRAMES
    ]
    payload = msgspec.msgpack.encode({"frames": entries, "v": 1})
    assert msgspec.msgpack.encode(_CANONICAL_BATCH.decode(payload)) != payload
    assert decode_frames(payload) == FRAMES


def test_batch_caps_entries_and_elements_in_all() -> None:
    payload = encode_frames(FRAMES)
    reason, detail, _ = refused(payload, Limits(max_frames_per_message=2))
    assert (reason, detail) == ("bad_schema", "a batch holds 1..2 frames, not 3")
    reason, detail, _ = refused(payload, Limits(max_tensor_elements=150))
    assert reason == "too_many_elements" and "in all" in detail
    assert refused(msgspec.msgpack.encode({"v": 1, "frames": []}))[0] == "bad_schema"
    assert refused(b'{"v": 1, "frames": []}')[0] == "bad_schema"
    with pytest.raises(ContractError, match="at least one"):
        encode_frames([])


def test_a_bad_entry_is_named_by_its_index() -> None:
    entries = msgspec.msgpack.decode(encode_frames(FRAMES))["frames"]
    entries[1]["dtype"] = "complex64"
    reason, detail, _ = refused(msgspec.msgpack.encode({"v": 1, "frames": entries}))
    assert reason == "bad_dtype" and detail.startswith("frame 1:")
    entries[1]["dtype"] = "float32"
    entries[2]["data"] = np.full(64, np.inf, np.float32).tobytes()
    assert refused(msgspec.msgpack.encode({"v": 1, "frames": entries}))[0] == "non_finite"


def test_neither_form_gets_the_single_frames_reason() -> None:
    payload = msgspec.msgpack.encode({"v": 1, "seq": 1})
    with pytest.raises(ContractError) as single:
        decode_frame(payload)
    assert refused(payload)[:2] == (single.value.reason, single.value.detail)
    assert refused(msgspec.msgpack.encode({"v": 2, "frames": []}))[0] == "bad_version"


@pytest.mark.parametrize("value", [DEEP, HUGE_CLAIM, MILLION], ids=["deep", "claim", "1M"])
def test_hostile_entries_and_frames_lists_are_refused_cheaply(value: bytes) -> None:
    entry = msgspec.msgpack.encode(msgspec.msgpack.decode(encode_frames(FRAMES[:1]))["frames"][0])
    with_x = bytes([entry[0] + 1]) + entry[1:] + b"\xa1x" + value
    in_entry = b"\x82\xa1v\x01\xa6frames\x91" + with_x
    as_list = b"\x82\xa1v\x01\xa6frames" + value
    for payload in (in_entry, as_list):
        reason, detail, peak = refused(payload)
        assert reason == "malformed", detail
        assert peak < 64 * KiB


def test_the_closed_schema_refuses_an_over_long_list_from_its_header() -> None:
    payload = b"\x82\xa1v\x01\xa6frames\xdd" + struct.pack(">I", FRAMES_MAX + 1)
    with pytest.raises(msgspec.ValidationError, match="length"):
        _CANONICAL_BATCH.decode(payload)


# Both paths agree: single frames as decode_frame; batches, fast path as the full pipeline.

single_or_batch = st.sampled_from(
    [
        encode_frame(FRAMES[0]),
        encode_frames(FRAMES),
        encode_frames(FRAMES[:1]),
        msgspec.msgpack.encode({"v": 1, "frames": [{"seq": 1, "dtype": "uint8", "shape": [2],
                                                    "data": b"\x00\x01", "later": 3}]}),
    ]
)  # fmt: skip
mutations = st.tuples(
    single_or_batch,
    st.integers(0, 10_000),
    st.integers(0, 255),
    st.sampled_from(["flip", "insert", "delete", "truncate", "none"]),
)


def _full(payload: bytes) -> list[Frame]:
    try:
        return [decode_frame(payload)]
    except ContractError as single:
        return _msgpack_batch(payload, Limits(), single)


@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow])
@given(mutations.map(mutate))
def test_the_fast_paths_agree_with_the_full_pipeline(payload: bytes) -> None:
    assume(not is_json_object(payload))
    fast = outcome(decode_frames, payload)
    full = outcome(_full, payload)
    if isinstance(full, tuple):
        assert isinstance(fast, tuple) and fast[0] == full[0], (fast, full)
    else:
        assert fast == full


def test_over_the_limit_has_the_same_reason_whatever_the_encoding() -> None:
    limits = Limits(max_frames_per_message=2)
    canonical = encode_frames(FRAMES)
    reordered = msgspec.msgpack.encode(
        {"frames": msgspec.msgpack.decode(canonical)["frames"], "v": 1}
    )
    assert refused(canonical, limits)[0] == refused(reordered, limits)[0]
