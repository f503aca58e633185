"""The checks of an escalation message that depend on :class:`~schemas.limits.Limits` (name
lengths, topic levels, every tensor), after the typed decode (:func:`schemas.decode_escalations`).

The usual message passes in one pass per rule over all its cases; only a message that fails is
searched again, case by case, for the first broken rule and its error detail.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from .errors import ContractError
from .fields import LEVEL_PATTERN, check_names
from .limits import Limits
from .tensor import check_header
from .topics import validate_topic

if TYPE_CHECKING:
    from .escalation import EscalationBatch, EscalationCase

_LEVEL: Final = re.compile(LEVEL_PATTERN)
"""What a :data:`~schemas.fields.Level` must match (cases' ``device`` and ``sensor`` are checked
against it once per distinct value of a message)."""


def check_batch(batch: EscalationBatch, limits: Limits) -> None:
    check_names(limits, "escalation", (batch.node, batch.model))
    if (batch.reply_to is None) != (batch.corr is None):
        raise ContractError("bad_schema", "escalation: reply_to and corr go together")
    if batch.reply_to is not None:
        validate_topic(batch.reply_to)
    if not _cases_look_right(batch, limits):
        _find_bad_case(batch, limits)
    check_tensors(batch.cases, limits)


def _cases_look_right(batch: EscalationBatch, limits: Limits) -> bool:
    """True when every case passes :func:`_find_bad_case` (one pass, no error detail)."""
    cases = batch.cases
    cap = limits.max_str_len
    no_corr = batch.corr is None
    if len({c.id for c in cases}) != len(cases) or not all(
        len(c.id) <= cap
        and len(c.device) <= cap
        and len(c.sensor) <= cap
        and len(c.edge.top_labels) == len(c.edge.top_probs)
        and (c.corr is None) == no_corr
        for c in cases
    ):
        return False
    levels = {c.device for c in cases}
    levels.update([c.sensor for c in cases])
    return all(_LEVEL.search(level) for level in levels)


def _find_bad_case(batch: EscalationBatch, limits: Limits) -> None:
    """Raise for the first case (in order) that breaks a rule."""
    ids: set[str] = set()
    for c in batch.cases:
        check_names(limits, "escalation case", (c.id, c.device, c.sensor))
        if c.id in ids:
            raise ContractError("bad_schema", f"escalation: case {c.id[:40]!r} twice")
        ids.add(c.id)
        if len(c.edge.top_labels) != len(c.edge.top_probs):
            raise ContractError(
                "bad_schema", "escalation: top_labels and top_probs differ in length"
            )
        if (c.corr is None) != (batch.corr is None):
            raise ContractError(
                "bad_schema", "escalation: every case has a corr when the message wants a reply"
            )
        for what, level in (("device", c.device), ("sensor", c.sensor)):
            if not _LEVEL.search(level):
                raise ContractError(
                    "bad_schema",
                    f"escalation case {c.id[:40]!r}: {what} {level[:64]!r} is not a topic level"
                    " (no '/', '+', '#', control characters or leading '$')",
                )


def check_tensors(cases: list[EscalationCase], limits: Limits) -> None:
    """Every case's tensor, as :func:`~schemas.tensor.tensor_from_wire` checks one (dtype,
    shape, element count, data length, finite floats), each header once per message and the
    float data of cases that share a header in one pass."""
    first = cases[0]
    dtype, shape = first.dtype, first.shape
    if all(c.dtype == dtype and c.shape == shape for c in cases):  # the usual message
        dt, _, count = check_header(dtype, shape, limits)
        nbytes = count * dt.itemsize
        if all(len(c.data) == nbytes for c in cases):
            if dt.kind == "f":
                values = np.frombuffer(b"".join([c.data for c in cases]), dtype=dt)
                if not np.isfinite(values).all():
                    raise ContractError("non_finite", f"{dt.name} data holds NaN or infinity")
            return
    headers: dict[tuple[str, tuple[int, ...]], tuple[np.dtype[Any], int]] = {}
    floats: dict[tuple[str, tuple[int, ...]], list[bytes]] = {}
    for c in cases:
        key = (c.dtype, tuple(c.shape))
        known = headers.get(key)
        if known is None:
            dt, _, count = check_header(c.dtype, c.shape, limits)
            known = headers[key] = (dt, count * dt.itemsize)
        dt, nbytes = known
        if len(c.data) != nbytes:
            raise ContractError(
                "bad_shape",
                f"data is {len(c.data)} bytes, shape {list(c.shape)} of {dt.name} needs {nbytes}",
            )
        if dt.kind == "f":
            floats.setdefault(key, []).append(c.data)
    for key, chunks in floats.items():
        values = np.frombuffer(b"".join(chunks), dtype=headers[key][0])
        if not np.isfinite(values).all():
            raise ContractError("non_finite", f"{values.dtype.name} data holds NaN or infinity")
