"""Message ids: unique and time-ordered, so consumers can deduplicate and sort on them."""

from __future__ import annotations

import uuid6


def new_id() -> str:
    """A UUIDv7 in canonical text form (36 characters); later calls sort after earlier
    ones. The one place :mod:`schemas` reads a clock (the id embeds it)."""
    return str(uuid6.uuid7())
