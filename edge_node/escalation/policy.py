"""Which verdicts are too unsure: pure functions of a model's output (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from edge_node.escalation.config import PolicyConfig
from schemas import EdgeVerdict

TOP_K = 3

THRESHOLD_NAMES = {
    "escalate_below": "max_softmax_below",
    "max_softmax_below": "max_softmax_below",
    "margin_below": "margin_below",
    "entropy_above": "entropy_above",
    "deadline_ms": "deadline_ms",
}
"""Names a manifest's ``thresholds`` or a ``set_threshold`` command may use, and the policy field
each sets (``escalate_below`` is the short name of ``max_softmax_below``)."""


def with_thresholds(base: PolicyConfig, thresholds: Mapping[str, float | str]) -> PolicyConfig:
    """``base`` with the named thresholds replaced; ValueError naming the bad name or value."""
    changes: dict[str, float] = {}
    for name, value in thresholds.items():
        field = THRESHOLD_NAMES.get(name)
        if field is None:
            known = ", ".join(sorted(THRESHOLD_NAMES))
            raise ValueError(f"unknown threshold {name!r} (known: {known})")
        try:
            changes[field] = float(value)
        except ValueError:
            raise ValueError(f"threshold {name}={value!r} is not a number") from None
    try:
        return PolicyConfig.model_validate({**base.model_dump(), **changes})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'policy'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"thresholds {dict(thresholds)}: {problems}") from None


def probabilities(scores: np.ndarray, kind: str) -> np.ndarray:
    """``[N, C]`` probabilities from a model's scores (softmax when they are logits)."""
    values = scores.astype(np.float64, copy=False)
    if kind == "logits":
        shifted = np.exp(values - values.max(axis=1, keepdims=True))
        normalised: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
        return normalised
    clipped: np.ndarray = np.clip(values, 0.0, 1.0)
    return clipped


@dataclass(frozen=True, slots=True)
class Assessment:
    top1: np.ndarray
    margin: np.ndarray
    entropy: np.ndarray
    escalate: np.ndarray
    """bool [N]: True where the policy says the cloud should decide."""


def assess(probs: np.ndarray, policy: PolicyConfig) -> Assessment:
    """Apply ``policy`` to probabilities ``[N, C]``."""
    ordered = -np.sort(-probs, axis=1)
    top1 = ordered[:, 0]
    second = ordered[:, 1] if probs.shape[1] > 1 else np.zeros_like(top1)
    margin = top1 - second
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(probs > 0, np.log(np.where(probs > 0, probs, 1.0)), 0.0)
    entropy = -(probs * logs).sum(axis=1)
    escalate = np.zeros(len(probs), dtype=bool)
    if policy.max_softmax_below is not None:
        escalate |= top1 < policy.max_softmax_below
    if policy.margin_below is not None:
        escalate |= margin < policy.margin_below
    if policy.entropy_above is not None:
        escalate |= entropy > policy.entropy_above
    return Assessment(top1, margin, entropy, escalate)


def edge_verdict(probs_row: np.ndarray, a: Assessment, i: int) -> EdgeVerdict:
    """The wire summary of row ``i``: label, confidence, margin, entropy, top-3."""
    order = np.argsort(-probs_row, kind="stable")[:TOP_K]
    return EdgeVerdict(
        label=int(order[0]),
        confidence=float(min(1.0, max(0.0, a.top1[i]))),
        margin=float(min(1.0, max(0.0, a.margin[i]))),
        entropy=float(max(0.0, a.entropy[i])),
        top_labels=[int(k) for k in order],
        top_probs=[float(min(1.0, max(0.0, probs_row[k]))) for k in order],
    )
