"""One telemetry window of a node, published on ``edge/{node}/telemetry`` (QoS 1, through the
node's outbox, so windows recorded while the uplink is down arrive later, in order).

``counts`` and ``rejects`` are deltas over this window; ``evictions`` are cumulative since the
outbox was created (a consumer that missed windows still sees every eviction). ``latency`` is
a sketch (:mod:`schemas.sketch`) of this window's per-frame latencies in milliseconds, so a
fleet p99 is the p99 of the merged node sketches.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
from msgspec import Meta

from .errors import ContractError
from .fields import REASONS_MAX, Epoch, Level, Name, Seconds, Seq, check_names
from .limits import DEFAULT_LIMITS, Limits
from .sketch import SKETCH_MAX_BYTES, decode_sketch
from .status import State
from .wire import decode_msgpack

COUNTER_KEYS_MAX: Final = 64
"""Most keys in each of ``counts``, ``rejects`` and ``evictions``."""
COUNTER_KEY_PATTERN: Final = r"\A[a-z][a-z0-9_]{0,63}\Z"

CounterKey = Annotated[str, Meta(pattern=COUNTER_KEY_PATTERN)]
"""A counter name: lower-case ASCII letters, digits and ``_``, starting with a letter, <= 64."""
Counters = Annotated[dict[CounterKey, Seq], Meta(max_length=COUNTER_KEYS_MAX)]
Celsius = Annotated[float, Meta(ge=-273.15, le=1000.0)]

COUNT_NAMES: Final = (
    "frames",
    "results",
    "rejected",
    "escalations",
    "cloud_replies",
    "fallbacks",
    "reconnects",
    "deadletters",
    "published",
)
"""The counts a node reports (others may be added; consumers ignore what they do not know)."""


class Telemetry(msgspec.Struct, frozen=True, kw_only=True):
    node: Level
    id: Name
    """Unique, time-ordered (:func:`schemas.ids.new_id`)."""
    boot_id: Name
    """Changes at every start of the node; ``seq`` restarts with it."""
    seq: Seq
    """Telemetry window counter within the boot (0, 1, 2, ...)."""
    ts: Epoch
    """End of the window (node clock), seconds since the epoch."""
    window_s: Seconds
    """Length of the window, seconds."""
    state: State
    reasons: Annotated[list[Name], Meta(max_length=REASONS_MAX)] = []
    model: Level | None = None
    release: Seq | None = None
    runtime: Name | None = None
    provider: Name | None = None
    hardware_class: Level | None = None
    counts: Counters = {}
    """Deltas over the window, by name (see :data:`COUNT_NAMES`)."""
    rejects: Counters = {}
    """Deltas over the window, by reject reason."""
    evictions: Counters = {}
    """Cumulative since the outbox was created, by record kind."""
    outbox_rows: Seq = 0
    outbox_bytes: Seq = 0
    latency: Annotated[bytes, Meta(max_length=SKETCH_MAX_BYTES)]
    """Encoded :class:`~schemas.sketch.SketchWire` of the window's latencies (ms)."""
    latency_count: Seq
    """How many latencies the sketch holds (checked against it)."""
    rss_bytes: Seq | None = None
    cpu_temp_c: Celsius | None = None
    """``None`` where the OS does not expose a temperature."""
    uptime_s: Seconds
    """Seconds since the process started."""
    v: int = 1


_DECODER: Final = msgspec.msgpack.Decoder(Telemetry)
_FIELDS: Final = 25


def encode_telemetry(t: Telemetry) -> bytes:
    """MessagePack of ``t``. Encoding does not validate; :func:`decode_telemetry` does."""
    return msgspec.msgpack.encode(t)


def decode_telemetry(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Telemetry:
    """Decode and validate a telemetry window, its sketch included; raises only
    :class:`~schemas.errors.ContractError`."""
    budget = 1 + 2 * _FIELDS + REASONS_MAX + 3 * 2 * COUNTER_KEYS_MAX + limits.max_extra_items
    t = decode_msgpack(payload, _DECODER.decode, what="telemetry", limits=limits, budget=budget)
    check_names(limits, "telemetry", [t.node, t.id, t.boot_id, t.model, t.runtime, t.provider])
    check_names(limits, "telemetry", [t.hardware_class, *t.reasons])
    try:
        sketch = decode_sketch(t.latency, limits)
    except ContractError as exc:
        raise ContractError("bad_schema", f"telemetry latency: {exc}") from None
    if sketch.count != t.latency_count:
        raise ContractError(
            "bad_schema",
            f"telemetry: latency_count {t.latency_count} != {sketch.count} in the sketch",
        )
    return t
