"""Typed, frozen settings of one durable outbox (a SQLite file)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The smallest bound accepted: the empty schema alone takes about 36 KiB of pages.
MIN_MAX_BYTES = 64 * 1024


class OutboxConfig(BaseModel):
    """Where the outbox lives, how big it may grow and what it gives up first when full.

    ``max_bytes`` bounds the database file plus its write-ahead log on disk at every instant,
    within 5 % for bounds of 256 KiB and more (ADR 0075; the ``-shm`` index file, 32 KiB for a
    WAL under 16 MiB, is not counted). On a volume smaller than the bound the outbox keeps its WAL
    within what the volume has free and refuses appends (``StorageFull``) that would leave less
    than a reserve (128 KiB) free, so that deletes always find room.
    ``eviction_order`` names every kind a record may have, the one evicted first first.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path = Path("edgewise-outbox.db")
    max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=MIN_MAX_BYTES,
        description="bound of the database file + its write-ahead log on disk, in bytes",
    )
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = Field(
        "FULL",
        description="SQLite synchronous mode: FULL survives power loss, NORMAL only process loss",
    )
    eviction_order: tuple[str, ...] = Field(
        ("telemetry", "hard_example", "event", "result"),
        min_length=1,
        description="every record kind, evicted first → evicted last",
    )
    answered_keep: int = Field(
        100_000,
        ge=0,
        description="how many frame keys to remember for deduplication (0 disables)",
    )

    @field_validator("eviction_order")
    @classmethod
    def _kinds_are_distinct_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not kind or kind != kind.strip() for kind in value):
            raise ValueError("record kinds must be non-empty names without surrounding spaces")
        if len(set(value)) != len(value):
            raise ValueError("eviction_order names a kind twice")
        return value
