"""Constrained field types shared by the message schemas, and the checks that depend on
run-time :class:`~schemas.limits.Limits` (msgspec constraints are fixed per type)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Annotated, Final

from msgspec import Meta

from .errors import ContractError
from .limits import Limits

SEQ_MAX: Final = 2**63 - 1
TEXT_MAX_LEN: Final = 1024
REASONS_MAX: Final = 64

Seq = Annotated[int, Meta(ge=0, le=SEQ_MAX)]
"""A counter: 0..2**63-1."""

Int64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]

Seconds = Annotated[float, Meta(ge=0.0, le=sys.float_info.max)]
"""A finite, non-negative float (NaN and infinity fail the bounds): timestamps, latencies."""

EPOCH_MAX: Final = 4_102_444_800.0
"""2100-01-01T00:00:00Z in seconds since the Unix epoch: the latest time a message may name."""

Epoch = Annotated[float, Meta(ge=0.0, le=EPOCH_MAX)]
"""A point in time, seconds since the Unix epoch, finite and from 1970 to 2100 (:data:`EPOCH_MAX`):
timestamps and deadlines. Anything later is refused while decoding (``bad_schema``, naming the
field and the bound), so no duration a service computes from it (an MQTT 5 message expiry,
a timeout) can leave its range. A sensor clock that counts from its boot fits too."""

Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]

LEVEL_PATTERN: Final = r"\A[^$/+#\x00-\x1f\x7f-\x9f][^/+#\x00-\x1f\x7f-\x9f]*\Z"

Level = Annotated[str, Meta(min_length=1, pattern=LEVEL_PATTERN)]
"""A name that is also a valid MQTT topic level (node, device, sensor, model): no ``/``,
``+``, ``#``, control characters or leading ``$``."""

Name = Annotated[str, Meta(min_length=1)]

Text = Annotated[str, Meta(max_length=TEXT_MAX_LEN)]


def check_names(limits: Limits, what: str, names: Iterable[str | None]) -> None:
    """Refuse (``bad_schema``) any name longer than ``limits.max_str_len`` characters."""
    cap = limits.max_str_len
    for name in names:
        if name is not None and len(name) > cap:
            raise ContractError("bad_schema", f"{what}: {name[:32]!r}... is longer than {cap}")
