"""From a model's scores ``[N, C]`` to one verdict per row: the label and how sure the model is.

Confidence is the largest softmax probability of the row, in [0, 1]. For a model that outputs
probabilities it is the largest output (clipped to [0, 1] against rounding); for one that outputs
logits it is computed with a numerically stable softmax (the row maximum is subtracted first, so
large logits do not overflow).

A row with NaN or infinite scores has no meaningful verdict: its label and confidence are
unspecified (the confidence is usually NaN). Use :func:`finite_rows` to find such rows.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

ScoreKind = Literal["probabilities", "logits"]


def verdicts(
    scores: npt.NDArray[Any], kind: ScoreKind
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """``(labels int64 [N], confidences float64 [N])`` for scores ``[N, C]`` (C >= 1).

    Ties go to the lowest class index. Raises ``ValueError`` for a score array that is not 2-D
    with at least one class, or an unknown ``kind``.
    """
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be [N, C] with C >= 1, got shape {scores.shape}")
    if kind not in ("probabilities", "logits"):
        raise ValueError(f"kind must be 'probabilities' or 'logits', got {kind!r}")
    values = scores.astype(np.float64, copy=False)
    labels = values.argmax(axis=1).astype(np.int64, copy=False)
    top = np.take_along_axis(values, labels[:, None], axis=1)[:, 0]
    with np.errstate(invalid="ignore", over="ignore"):
        if kind == "probabilities":
            confidences = np.clip(top, 0.0, 1.0)
        else:
            # softmax(x)[argmax] = 1 / sum(exp(x - max)): the top term is exp(0) = 1.
            confidences = 1.0 / np.exp(values - top[:, None]).sum(axis=1)
    return labels, confidences


def finite_rows(scores: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """``bool [N]``: True where every score in the row is finite (no NaN, no +-Inf)."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {scores.shape}")
    result: npt.NDArray[np.bool_] = np.isfinite(scores).all(axis=1)
    return result
