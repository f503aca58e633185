"""The one exception the wire contract raises, and its reason codes."""

from __future__ import annotations

from typing import Literal, get_args

ReasonCode = Literal[
    "payload_too_large",
    "malformed",
    "bad_schema",
    "bad_version",
    "bad_dtype",
    "bad_shape",
    "too_many_elements",
    "non_finite",
    "bad_topic",
]

REASON_CODES: frozenset[str] = frozenset(get_args(ReasonCode))

NodeRejectReason = Literal[
    "inference_failed",
    "non_finite_output",
    "internal_error",
]
"""Why a node refuses a frame that kept the contract (its own state, not the input's fault)."""

DeadLetterReason = ReasonCode | NodeRejectReason
DEADLETTER_REASONS: frozenset[str] = REASON_CODES | frozenset(get_args(NodeRejectReason))
"""Every ``reason`` a dead letter can carry."""


class ContractError(ValueError):
    """A message, tensor or topic broke the wire contract.

    ``reason`` is a stable, machine-readable code (count and route on it); ``detail`` is for
    humans and may change between versions. ``str(e)`` is ``"reason: detail"``.
    """

    reason: ReasonCode
    detail: str

    def __init__(self, reason: ReasonCode, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[ContractError], tuple[ReasonCode, str]]:
        return (type(self), (self.reason, self.detail))
