"""The latency sketch: 1 % relative accuracy against numpy, merge = sketch of the union,
bounded memory, and untrusted bytes refused with a reason."""

from __future__ import annotations

import contextlib

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.telemetry import BadSketch, LatencySketch, merged
from edgewise.telemetry.sketch import RELATIVE_ACCURACY
from schemas import SKETCH_BINS_MAX, SketchWire, encode_sketch

QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)


def sketch_of(values: np.ndarray) -> LatencySketch:
    s = LatencySketch()
    for v in values:
        s.add(float(v))
    return s


def assert_within_1_percent(s: LatencySketch, values: np.ndarray) -> None:
    # DDSketch answers the value of rank floor(q * (n - 1)): numpy's "lower" method.
    for q in QUANTILES:
        exact = float(np.quantile(values, q, method="lower"))
        got = s.quantile(q)
        assert got is not None
        assert abs(got - exact) <= RELATIVE_ACCURACY * exact + 1e-12, (q, got, exact)


@pytest.mark.parametrize(
    "draw",
    [
        lambda r: r.lognormal(1.0, 1.0, 20_000),
        lambda r: r.exponential(5.0, 20_000),
        lambda r: r.uniform(0.05, 2000.0, 20_000),
        lambda r: np.concatenate([r.normal(3.0, 0.2, 19_000).clip(0.01), r.pareto(1.5, 1000)]),
    ],
    ids=["lognormal", "exponential", "uniform", "bimodal_heavy_tail"],
)
def test_quantiles_within_1_percent_of_numpy(draw: object) -> None:
    values = draw(np.random.default_rng(7))  # type: ignore[operator]
    s = sketch_of(values)
    assert s.count == len(values)
    assert_within_1_percent(s, values)
    assert s.quantile(0.0) == values.min()
    assert s.quantile(1.0) == values.max()


def test_merge_equals_the_sketch_of_the_union() -> None:
    rng = np.random.default_rng(11)
    parts = [rng.lognormal(mu, 0.8, n) for mu, n in ((0.5, 3000), (2.0, 500), (1.0, 7000))]
    union = np.concatenate(parts)
    fleet = merged([sketch_of(p) for p in parts])
    whole = sketch_of(union)
    assert fleet.count == whole.count == len(union)
    for q in QUANTILES:
        assert fleet.quantile(q) == whole.quantile(q)
    assert fleet.to_wire().counts == whole.to_wire().counts
    assert_within_1_percent(fleet, union)


def test_merge_survives_the_wire() -> None:
    rng = np.random.default_rng(3)
    parts = [rng.exponential(2.0, 2000) for _ in range(5)]
    over_wire = merged([LatencySketch.from_bytes(sketch_of(p).to_bytes()) for p in parts])
    assert over_wire.to_bytes() == merged([sketch_of(p) for p in parts]).to_bytes()


@settings(max_examples=200)
@given(st.lists(st.floats(0, 1e12, allow_nan=False), max_size=300))
def test_bytes_round_trip(values: list[float]) -> None:
    s = LatencySketch()
    for v in values:
        s.add(v)
    back = LatencySketch.from_bytes(s.to_bytes())
    assert back.count == len(values)
    assert back.to_bytes() == s.to_bytes()
    for q in (0.0, 0.5, 0.99, 1.0):
        assert back.quantile(q) == s.quantile(q)


def test_empty_sketch() -> None:
    s = LatencySketch()
    assert s.count == 0
    assert s.quantile(0.99) is None
    assert LatencySketch.from_bytes(s.to_bytes()).count == 0


@pytest.mark.parametrize("bad", [-0.001, float("nan"), float("inf"), -float("inf")])
def test_impossible_latency_refused(bad: float) -> None:
    s = LatencySketch()
    with pytest.raises(ValueError, match="latency"):
        s.add(bad)
    assert s.count == 0


@pytest.mark.parametrize("q", [-0.1, 1.01, float("nan")])
def test_quantile_outside_0_1_refused(q: float) -> None:
    s = LatencySketch()
    s.add(1.0)
    with pytest.raises(ValueError, match="quantile"):
        s.quantile(q)


def test_memory_is_bounded_and_high_quantiles_stay_accurate() -> None:
    # 1 ns .. 1e9 ms needs ~2700 bins at 1 %: more than the limit, so the lowest collapse.
    values = np.geomspace(1e-6, 1e9, 50_000)
    s = sketch_of(values)
    wire = s.to_wire()
    assert len(wire.counts) <= SKETCH_BINS_MAX
    assert len(s.to_bytes()) < 32_768
    for q in (0.5, 0.9, 0.99):
        exact = float(np.quantile(values, q, method="lower"))
        got = s.quantile(q)
        assert got is not None and abs(got - exact) <= RELATIVE_ACCURACY * exact


def wire(**change: object) -> bytes:
    good = msgspec.structs.asdict(
        SketchWire(gamma=LatencySketch().to_wire().gamma, offset=10, counts=[1, 2], sum=3.0,
                   min=1.0, max=1.3)
    )  # fmt: skip
    good.update(change)
    return msgspec.msgpack.encode({k: v for k, v in good.items() if v is not ...})


def test_hand_built_wire_decodes() -> None:
    assert LatencySketch.from_bytes(wire()).count == 3


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "malformed"),
        (b"\xc1", "malformed"),
        (b"\x91" * 100_000, "payload_too_large"),
        (wire()[:-1], "malformed"),
        (wire() + b"\x00", "malformed"),
        (wire(v=2), "bad_version"),
        (wire(gamma=1.5), "incompatible"),
        (wire(gamma=1.0), "bad_schema"),
        (wire(gamma=float("nan")), "bad_schema"),
        (wire(offset=2**40), "bad_schema"),
        (wire(offset=100_000), "incompatible"),
        (wire(offset=-100_000), "incompatible"),
        (wire(counts=[-1]), "bad_schema"),
        (wire(counts=[1.5]), "bad_schema"),
        (wire(counts=[1] * (SKETCH_BINS_MAX + 1)), "bad_schema"),
        (wire(counts=[2**62, 2**62]), "bad_schema"),
        (wire(min=2.0, max=1.0), "bad_schema"),
        (wire(min=None), "bad_schema"),
        (wire(counts=[], min=None, max=None, sum=1.0), "bad_schema"),
        (wire(sum=float("inf")), "bad_schema"),
        (wire(counts=...), "bad_schema"),
        (msgspec.msgpack.encode([1, 2, 3]), "bad_schema"),
        (b"\x81\xa1v" + b"\x91" * 40 + b"\x01", "malformed"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_untrusted_bytes_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(BadSketch) as excinfo:
        LatencySketch.from_bytes(payload)
    assert excinfo.value.reason == reason
    assert isinstance(excinfo.value, ValueError)


def test_size_cap_applies_before_decoding() -> None:
    payload = encode_sketch(LatencySketch().to_wire())
    with pytest.raises(BadSketch) as excinfo:
        LatencySketch.from_bytes(payload, max_bytes=len(payload) - 1)
    assert excinfo.value.reason == "payload_too_large"


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_else(payload: bytes) -> None:
    with contextlib.suppress(BadSketch):
        LatencySketch.from_bytes(payload)
