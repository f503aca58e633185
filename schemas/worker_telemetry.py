"""A cloud worker's telemetry, published on ``{cloud_root}/workers/{worker}/telemetry`` (QoS 0,
every ``telemetry_interval_s``; docs/telemetry.md).

Unlike a node's windows (deltas, through an outbox), a worker's counts are **totals since its
boot** (``boot_id``): a worker keeps no outbox, so a window lost while the broker is away loses
nothing; the rate over a span is the difference of two windows of one boot.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
from msgspec import Meta

from .fields import REASONS_MAX, Epoch, Level, Name, Seconds, Seq, check_names
from .limits import DEFAULT_LIMITS, Limits
from .status import State
from .telemetry import COUNTER_KEYS_MAX, Counters
from .wire import decode_msgpack

WORKER_COUNT_NAMES: Final = (
    "received",
    "cases",
    "answered",
    "replies",
    "verdicts",
    "duplicates",
    "expired",
    "uploads",
    "batches",
    "handled",
    "handler_errors",
    "store_errors",
    "reply_failures",
    "ignored_draining",
    "takeovers",
    "reconnects",
)
"""The counts a worker reports (others may be added; consumers ignore what they do not know)."""


class WorkerTelemetry(msgspec.Struct, frozen=True, kw_only=True):
    worker: Level
    boot_id: Name
    """Changes at every start of the worker; ``seq`` and the totals restart with it."""
    seq: Seq
    ts: Epoch
    """When the window was taken (worker clock), seconds since the epoch."""
    window_s: Seconds
    """Seconds since the previous window of this boot (since the start for the first)."""
    state: State
    """As on the worker's retained presence: ``online`` or ``degraded``."""
    reasons: Annotated[list[Name], Meta(max_length=REASONS_MAX)] = []
    """Why it is degraded (``client_id_conflict``), as on its presence."""
    counts: Counters = {}
    """Totals since the boot, by name (see :data:`WORKER_COUNT_NAMES`)."""
    rejects: Counters = {}
    """Escalation messages rejected since the boot, by reason."""
    failures: Counters = {}
    """Unexpected failures since the boot, by the stage they stopped."""
    uptime_s: Seconds
    v: int = 1


_DECODER: Final = msgspec.msgpack.Decoder(WorkerTelemetry)
_FIELDS: Final = 12


def encode_worker_telemetry(t: WorkerTelemetry) -> bytes:
    """MessagePack of ``t``. Encoding does not validate; :func:`decode_worker_telemetry` does."""
    return msgspec.msgpack.encode(t)


def decode_worker_telemetry(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> WorkerTelemetry:
    """Decode and validate a worker's telemetry; raises only
    :class:`~schemas.errors.ContractError`."""
    budget = 1 + 2 * _FIELDS + REASONS_MAX + 3 * 2 * COUNTER_KEYS_MAX + limits.max_extra_items
    t = decode_msgpack(
        payload, _DECODER.decode, what="worker telemetry", limits=limits, budget=budget
    )
    check_names(limits, "worker telemetry", [t.worker, t.boot_id, *t.reasons])
    return t
