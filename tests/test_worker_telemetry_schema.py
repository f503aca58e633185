"""A worker's telemetry window (schemas.worker_telemetry): round trip, and hostile payloads
refused with a ContractError (size, schema, names), whatever the bytes."""

from __future__ import annotations

import msgspec
import pytest

from schemas import (
    ContractError,
    Limits,
    WorkerTelemetry,
    decode_worker_telemetry,
    encode_worker_telemetry,
)


def _window(**kw: object) -> WorkerTelemetry:
    fields: dict[str, object] = {
        "worker": "worker-1",
        "boot_id": "b1",
        "seq": 3,
        "ts": 1_800_000_000.0,
        "window_s": 10.0,
        "state": "degraded",
        "reasons": ["client_id_conflict"],
        "counts": {"takeovers": 4, "answered": 10},
        "rejects": {"bad_topic": 1},
        "uptime_s": 40.0,
    }
    fields.update(kw)
    return WorkerTelemetry(**fields)  # type: ignore[arg-type]


def test_a_window_round_trips() -> None:
    w = _window()
    assert decode_worker_telemetry(encode_worker_telemetry(w)) == w


@pytest.mark.parametrize(
    "bad",
    [
        {"counts": {"Bad Key": 1}},
        {"counts": {"takeovers": -1}},
        {"counts": {f"k{i}": i for i in range(65)}},
        {"reasons": ["r"] * 65},
        {"state": "sleepy"},
        {"worker": "a/b"},
        {"ts": 1e12},
    ],
)
def test_a_bad_window_is_refused(bad: dict[str, object]) -> None:
    payload = msgspec.msgpack.encode({**msgspec.structs.asdict(_window()), **bad})
    with pytest.raises(ContractError):
        decode_worker_telemetry(payload)


def test_an_oversize_payload_is_refused_before_decoding() -> None:
    payload = encode_worker_telemetry(_window(counts={f"k{i}": i for i in range(60)}))
    with pytest.raises(ContractError) as err:
        decode_worker_telemetry(payload, Limits(max_payload_bytes=len(payload) - 1))
    assert err.value.reason == "payload_too_large"


@pytest.mark.parametrize("garbage", [b"", b"\xc1", b"\x91" * 5000, b"\xde\xff\xff" + b"\x00" * 9])
def test_garbage_is_a_contract_error(garbage: bytes) -> None:
    with pytest.raises(ContractError):
        decode_worker_telemetry(garbage)
