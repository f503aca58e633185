"""Staged rollout: which nodes a release with ``rollout_percent`` reaches.

A node's place in a release's rollout is a stable hash of (node id, model, release) mapped onto
[0, 100). Widening the percent for the same release only adds nodes, never removes one; a new
release draws a new cohort, so the same nodes are not always first.
"""

from __future__ import annotations

import hashlib


def cohort_point(node_id: str, model: str, release: int) -> float:
    """The node's point in [0, 100) for this release (resolution 1/10000 of a percent)."""
    digest = hashlib.sha256(f"{node_id}\x00{model}\x00{release}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") % 1_000_000) / 10_000.0


def in_cohort(node_id: str, model: str, release: int, rollout_percent: float) -> bool:
    return cohort_point(node_id, model, release) < rollout_percent
