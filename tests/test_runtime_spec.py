"""TensorSpec: which single samples fit a model input, and the reason when one does not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgewise.serving.runtime import TensorSpec, format_shape

IMAGE = TensorSpec("image", np.dtype(np.float32), (None, 8, 8))


def test_a_fitting_sample_is_accepted() -> None:
    assert IMAGE.accepts(np.zeros((8, 8), dtype=np.float32)) is None
    # Non-contiguous views fit too: layout is the runtime's business, not the contract's.
    assert IMAGE.accepts(np.zeros((8, 16), dtype=np.float32)[:, ::2]) is None


@pytest.mark.parametrize(
    ("dtype", "reason"),
    [
        (np.float64, "dtype float64, model wants float32"),
        (np.int8, "dtype int8, model wants float32"),
        (np.float16, "dtype float16, model wants float32"),
    ],
)
def test_wrong_dtype_is_refused_with_the_reason(dtype: type, reason: str) -> None:
    assert IMAGE.accepts(np.zeros((8, 8), dtype=dtype)) == reason


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ((4, 4), "shape (4, 4), model wants (8, 8)"),
        ((8, 9), "shape (8, 9), model wants (8, 8)"),
        ((64,), "shape (64,), model wants (8, 8)"),
        ((1, 8, 8), "shape (1, 8, 8), model wants (8, 8)"),  # a batch is not a sample
        ((), "shape (), model wants (8, 8)"),
    ],
)
def test_wrong_shape_is_refused_with_the_reason(shape: tuple[int, ...], reason: str) -> None:
    assert IMAGE.accepts(np.zeros(shape, dtype=np.float32)) == reason


def test_dtype_is_reported_before_shape() -> None:
    assert IMAGE.accepts(np.zeros((3,), dtype=np.int64)) == "dtype int64, model wants float32"


def test_dynamic_sample_dimensions_accept_any_size() -> None:
    spec = TensorSpec("tokens", np.dtype(np.int64), (None, None, 3))
    assert spec.accepts(np.zeros((5, 3), dtype=np.int64)) is None
    assert spec.accepts(np.zeros((70, 3), dtype=np.int64)) is None
    assert spec.accepts(np.zeros((5, 4), dtype=np.int64)) == "shape (5, 4), model wants (?, 3)"
    assert spec.accepts(np.zeros((5,), dtype=np.int64)) == "shape (5,), model wants (?, 3)"


def test_spec_is_frozen_and_describes_itself() -> None:
    assert IMAGE.sample_shape == (8, 8)
    assert IMAGE.describe() == "image float32 (?, 8, 8)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        IMAGE.name = "other"  # type: ignore[misc]
    assert TensorSpec("image", np.dtype(np.float32), (None, 8, 8)) == IMAGE
    assert TensorSpec("image", np.dtype(np.float64), (None, 8, 8)) != IMAGE


@pytest.mark.parametrize(
    ("shape", "text"),
    [
        ((), "()"),
        ((8,), "(8,)"),
        ((None,), "(?,)"),
        ((None, 8, 8), "(?, 8, 8)"),
        ((4, 4), "(4, 4)"),
    ],
)
def test_format_shape(shape: tuple[int | None, ...], text: str) -> None:
    assert format_shape(shape) == text
