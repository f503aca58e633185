"""The telemetry message: round trips, and hostile payloads refused with the exact reason."""

from __future__ import annotations

import contextlib
import sys
import tracemalloc
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.telemetry import LatencySketch
from schemas import (
    ContractError,
    Limits,
    Telemetry,
    decode_any,
    decode_telemetry,
    encode_telemetry,
    new_id,
)
from schemas.errors import ReasonCode
from schemas.fields import EPOCH_MAX
from schemas.telemetry import COUNTER_KEYS_MAX

levels = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/+#$"),
    min_size=1,
    max_size=40,
)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
counters = st.integers(0, 2**63 - 1)
seconds = st.floats(0, sys.float_info.max, allow_nan=False, allow_infinity=False)
counter_keys = st.from_regex(r"\A[a-z][a-z0-9_]{0,20}\Z")
counter_maps = st.dictionaries(counter_keys, counters, max_size=8)


@st.composite
def sketches(draw: st.DrawFn) -> LatencySketch:
    s = LatencySketch()
    for v in draw(st.lists(st.floats(0, 1e6, allow_nan=False), max_size=50)):
        s.add(v)
    return s


@st.composite
def windows(draw: st.DrawFn) -> Telemetry:
    sketch = draw(sketches())
    return Telemetry(
        node=draw(levels),
        id=draw(st.just(new_id()) | names),
        boot_id=draw(names),
        seq=draw(counters),
        ts=draw(st.floats(0, EPOCH_MAX)),
        window_s=draw(seconds),
        state=draw(st.sampled_from(["online", "offline", "degraded"])),
        reasons=draw(st.lists(names, max_size=5)),
        model=draw(st.none() | levels),
        release=draw(st.none() | counters),
        runtime=draw(st.none() | names),
        provider=draw(st.none() | names),
        hardware_class=draw(st.none() | levels),
        counts=draw(counter_maps),
        rejects=draw(counter_maps),
        evictions=draw(counter_maps),
        outbox_rows=draw(counters),
        outbox_bytes=draw(counters),
        latency=sketch.to_bytes(),
        latency_count=sketch.count,
        rss_bytes=draw(st.none() | counters),
        cpu_temp_c=draw(st.none() | st.floats(-273.15, 1000.0)),
        uptime_s=draw(seconds),
    )


@settings(max_examples=200)
@given(windows())
def test_telemetry_round_trip(window: Telemetry) -> None:
    assert decode_telemetry(encode_telemetry(window)) == window


def good(**change: Any) -> dict[str, Any]:
    s = LatencySketch()
    for v in (0.5, 1.0, 2.0):
        s.add(v)
    message: dict[str, Any] = {
        "v": 1, "node": "gw-1", "id": new_id(), "boot_id": "b-1", "seq": 3, "ts": 1766400000.0,
        "window_s": 10.0, "state": "online", "counts": {"frames": 3, "escalations": 1},
        "rejects": {"malformed": 2}, "evictions": {"telemetry": 4}, "outbox_rows": 1,
        "outbox_bytes": 100, "latency": s.to_bytes(), "latency_count": 3, "uptime_s": 5.0,
    }  # fmt: skip
    message.update(change)
    return {k: v for k, v in message.items() if v is not ...}


def payload(**change: Any) -> bytes:
    return msgspec.msgpack.encode(good(**change))


def reason(data: bytes, limits: Limits | None = None) -> ReasonCode:
    with pytest.raises(ContractError) as excinfo:
        decode_telemetry(data) if limits is None else decode_telemetry(data, limits)
    return excinfo.value.reason


def test_minimal_window_decodes_with_defaults() -> None:
    t = decode_telemetry(payload())
    assert t.counts == {"frames": 3, "escalations": 1}
    assert t.model is None and t.cpu_temp_c is None and t.rss_bytes is None
    assert LatencySketch.from_bytes(t.latency).count == 3


def test_unknown_fields_ignored() -> None:
    assert decode_telemetry(payload(later={"a": [1, 2]})).seq == 3


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"v": 2}, "bad_version"),
        ({"node": "a/b"}, "bad_schema"),
        ({"node": "x" * 129}, "bad_schema"),
        ({"id": ...}, "bad_schema"),
        ({"seq": -1}, "bad_schema"),
        ({"ts": float("nan")}, "bad_schema"),
        ({"window_s": -1.0}, "bad_schema"),
        ({"state": "melting"}, "bad_schema"),
        ({"counts": {"Frames": 1}}, "bad_schema"),
        ({"counts": {"frames": -1}}, "bad_schema"),
        ({"counts": {"x" * 65: 1}}, "bad_schema"),
        ({"counts": {f"k{i}": 1 for i in range(COUNTER_KEYS_MAX + 1)}}, "bad_schema"),
        ({"rejects": {"": 1}}, "bad_schema"),
        ({"evictions": {"bad key": 1}}, "bad_schema"),
        ({"cpu_temp_c": -300.0}, "bad_schema"),
        ({"cpu_temp_c": float("inf")}, "bad_schema"),
        ({"latency": b"\xc1"}, "bad_schema"),
        ({"latency": b"\x00" * 40_000}, "bad_schema"),
        ({"latency": "not bytes"}, "bad_schema"),
        ({"latency_count": 4}, "bad_schema"),
        ({"reasons": ["x"] * 65}, "bad_schema"),
        ({"uptime_s": ...}, "bad_schema"),
    ],
)
def test_window_breaking_the_contract_refused(change: dict[str, Any], expected: str) -> None:
    assert reason(payload(**change)) == expected


def test_foreign_sketch_inside_a_window_refused() -> None:
    # Valid sketch layout of another accuracy: the schema accepts it, the merge refuses it.
    foreign = msgspec.msgpack.encode(
        {"v": 1, "gamma": 1.5, "offset": 1, "counts": [3], "sum": 3.0, "min": 1.0, "max": 1.0}
    )
    t = decode_telemetry(payload(latency=foreign))
    with pytest.raises(ValueError, match="incompatible"):
        LatencySketch.from_bytes(t.latency)


def test_oversized_refused_before_reading() -> None:
    data = payload(pad=b"\x00" * 2000)
    tracemalloc.start()
    try:
        assert reason(data, Limits(max_payload_bytes=1000)) == "payload_too_large"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024


def test_deep_nesting_in_an_unknown_field_refused() -> None:
    data = payload()
    head = data[:1]
    assert head == b"\xde"  # map16: 16 keys
    nested = data[:1] + (int.from_bytes(data[1:3]) + 1).to_bytes(2) + data[3:]
    nested += b"\xa1x" + b"\x91" * 100_000 + b"\xc0"
    tracemalloc.start()
    try:
        assert reason(nested) == "malformed"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_every_truncation_refused() -> None:
    data = payload()
    for end in range(len(data)):
        assert reason(data[:end]) == "malformed", end


def test_too_many_values_refused() -> None:
    data = payload(extra=list(range(5000)))
    assert reason(data) == "malformed"


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_contract_error(data: bytes) -> None:
    with contextlib.suppress(ContractError):
        decode_telemetry(data)


@settings(max_examples=100)
@given(windows())
def test_windows_are_displayable_by_watch(window: Telemetry) -> None:
    assert isinstance(decode_any(encode_telemetry(window)), dict)
