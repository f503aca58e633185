"""What a :class:`edgewise.outbox.Forwarder` has done since it was made."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ForwarderStats:
    published: int = 0
    """PUBLISH packets handed to the client (resends after a reconnect count again)."""
    live_published: int = 0
    """Of those, records offered while the connection was up, sent ahead of any backlog."""
    delivered: int = 0
    """Records the broker acknowledged (each is then deleted from the outbox)."""
    delivered_items: dict[str, int] = field(default_factory=dict)
    """What those records carried (``Record.items``: e.g. results), per kind."""
    refused: int = 0
    """Records the broker or the client refused for good (e.g. an ACL); deleted and logged."""
    fresh: int = 0
    """Records stored after the link was last known down, sent live on the next connection."""
    confirmed: int = 0
    """End-to-end mode: records a consumer confirmed (each is then deleted from the outbox)."""
    resent: int = 0
    """End-to-end mode: sends of a record sent before and not confirmed yet (a timeout, a new
    connection)."""
    unconfirmed_evicted: int = 0
    """End-to-end mode: records the outbox evicted while they waited for a confirmation."""
    confirmations_unknown: int = 0
    """End-to-end mode: confirmed ids of no record waiting here (a duplicate confirmation, a
    record confirmed already, or sent by an earlier run and not sent again yet)."""
    unkeyed: int = 0
    """End-to-end mode: records of a confirmed kind whose id could not be read (deleted at the
    PUBACK, as without the mode)."""
