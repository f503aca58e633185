"""Run a whole sample array through a runtime in batches, and the labels that come out."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.serving.runtime import Runtime, RuntimeRunError

DEFAULT_BATCH = 32


def batch_size(runtime: Runtime, wanted: int = DEFAULT_BATCH) -> int:
    """``wanted``, unless the model's batch dimension is fixed: then that size."""
    fixed = runtime.input_spec.shape[0]
    return fixed if fixed is not None else wanted


def batches(x: npt.NDArray[Any], size: int) -> Iterator[npt.NDArray[Any]]:
    """``x`` in batches of exactly ``size``; the last one is padded by repeating its first
    sample (a model with a fixed batch dimension takes no other size). Callers cut the outputs
    back to ``len(x)``."""
    for start in range(0, len(x), size):
        batch = x[start : start + size]
        if len(batch) < size:
            pad = np.repeat(batch[:1], size - len(batch), axis=0)
            batch = np.concatenate([batch, pad])
        yield np.ascontiguousarray(batch)


def predict(
    runtime: Runtime, x: npt.NDArray[Any], size: int = DEFAULT_BATCH
) -> npt.NDArray[np.int64]:
    """The arg-max label of every sample. Raises :class:`RuntimeRunError` as the runtime does."""
    size = batch_size(runtime, size)
    labels: list[npt.NDArray[np.int64]] = []
    for batch in batches(x, size):
        scores = runtime.run(batch)
        if scores.ndim != 2 or scores.shape[0] != len(batch):
            raise RuntimeRunError(
                f"a batch of {len(batch)} gave scores of shape {scores.shape}; "
                f"want [{len(batch)}, C]"
            )
        labels.append(np.asarray(scores.argmax(axis=1), dtype=np.int64))
    return np.concatenate(labels)[: len(x)] if labels else np.zeros(0, np.int64)
