"""What goes into an outbox (:class:`Record`) and what comes back out (:class:`Stored`)."""

from __future__ import annotations

from dataclasses import dataclass

#: A record's kind: ``"result"``, ``"telemetry"``, ``"hard_example"``, ``"event"`` or any other
#: name listed in :attr:`edgewise.outbox.config.OutboxConfig.eviction_order`.
Kind = str


@dataclass(frozen=True, slots=True)
class Record:
    """One message to publish, as a caller appends it."""

    kind: Kind
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    items: int = 1
    """How many things the payload carries (e.g. results in a results message): evictions are
    also counted in items, so a count can be set against what is missing downstream."""

    def stored(self, id: int, created_at: float) -> Stored:
        """This record as the outbox holds it once ``append`` gave it ``id``."""
        return Stored(
            id,
            self.kind,
            self.topic,
            self.payload,
            self.qos,
            self.retain,
            created_at,
            self.items,
        )

    def __post_init__(self) -> None:
        if self.items < 0:
            raise ValueError(f"items must be >= 0, not {self.items!r}")
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {self.qos!r}")
        if not self.topic:
            raise ValueError("topic must not be empty")


@dataclass(frozen=True, slots=True)
class Stored:
    """One record as stored: ``id`` grows monotonically and is never reused, even after deletes."""

    id: int
    kind: Kind
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created_at: float
    items: int = 1
