"""Which verdicts are too unsure: pure functions of a model's output (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_node.escalation.config import PolicyConfig
from schemas import EdgeVerdict

TOP_K = 3


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
