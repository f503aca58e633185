"""Another connection took our client id: detect it, back off, and stop fighting.

Two processes that connect with one client id (a restored VM image, a copied config) make the
broker close one connection each time the other connects; each reconnects at once and closes
the other: a fight without end (docs/adr/0073-client-id-conflict.md). What tells a connection
that it was taken over:

* MQTT 5 brokers that say so (EMQX; the standard's way): a DISCONNECT from the server with
  reason code 0x8E "Session taken over". One such DISCONNECT is one takeover.
* Mosquitto (2.0.11 here, both protocol versions) and any MQTT 3.1.1 broker just close the
  socket. A close by the broker (end of stream, no DISCONNECT, no socket error) is a *suspect*
  when the connection had lived less than :data:`SUSPECT_LIFETIME_S`; a streak of
  :data:`SUSPECTS_FOR_CONFLICT` suspects, each but the first reached at the first connect
  attempt after the one before (the broker was up all along), is a conflict and counts as that
  many takeovers; while the conflict lasts each further suspect is one more. A broker that
  restarts is not a suspect for long: the first attempt after it fails and breaks the streak.

A takeover waits ``first_s`` doubled per takeover (jittered upwards); after
:data:`TAKEOVERS_BEFORE_PAUSE` takeovers it waits :data:`PAUSE_S` (5 minutes) between tries, so
two processes fight at most ten times before one of them gives way. The conflict ends once a
connection has stayed up :data:`CLEAR_AFTER_S` without being taken over.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

SESSION_TAKEN_OVER = 0x8E
"""MQTT 5 reason code of the server's DISCONNECT to a connection whose client id another took."""
SUSPECT_LIFETIME_S = 60.0
SUSPECTS_FOR_CONFLICT = 3
TAKEOVERS_BEFORE_PAUSE = 5
PAUSE_S = 300.0
CLEAR_AFTER_S = 600.0


@dataclass(slots=True)
class TakeoverGuard:
    """Takeover bookkeeping of one :class:`~mqtt_session.MqttSession` (one client id)."""

    client_id: str
    first_s: float = 1.0
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic
    takeovers: int = 0
    """Takeovers in the conflict under way (0: none)."""
    total: int = 0
    """Takeovers since the start."""
    streak: int = 0
    """Suspect closes in a row (see the module's docstring)."""
    _up_since: float | None = None
    _first_try: bool = True
    _failed: bool = False

    @property
    def conflict(self) -> bool:
        """Another connection uses this client id (cleared after CLEAR_AFTER_S up untouched)."""
        up = self._up_since
        if self.takeovers and up is not None and self.clock() - up >= CLEAR_AFTER_S:
            log.info(
                "client id %r: no takeover for %.0f s, the conflict is over",
                self.client_id,
                CLEAR_AFTER_S,
            )
            self.takeovers = 0
            self.streak = 0
        return self.takeovers > 0

    def connect_failed(self) -> None:
        self._failed = True

    def connected(self) -> None:
        self._up_since = self.clock()
        self._first_try = not self._failed
        self._failed = False

    def lost(self, *, server_reason: int | None, peer_closed: bool) -> float | None:
        """The connection ended: how long to wait if it was taken over, else None.

        ``server_reason``: the reason code of a DISCONNECT the server sent (None: none came);
        ``peer_closed``: the broker closed the socket (end of stream, no socket error).
        """
        self.conflict  # noqa: B018 - a conflict over since is cleared first
        up = self._up_since
        self._up_since = None
        lived = math.inf if up is None else self.clock() - up
        if server_reason == SESSION_TAKEN_OVER:
            return self._taken_over(1, "the broker said so (MQTT 5 reason 0x8E)")
        if server_reason is not None or not peer_closed or lived >= SUSPECT_LIFETIME_S:
            self.streak = 0
            return None
        if self.streak and not self._first_try:
            self.streak = 0  # the broker was away in between: a restart, not another client
        self.streak += 1
        if self.takeovers:
            return self._taken_over(1, "the broker closed the connection again")
        if self.streak >= SUSPECTS_FOR_CONFLICT:
            return self._taken_over(
                self.streak,
                f"the broker closed {self.streak} connections in a row soon after accepting"
                " them, without a reason",
            )
        return None

    def _taken_over(self, count: int, why: str) -> float:
        self.takeovers += count
        self.total += count
        n = self.takeovers
        if n >= TAKEOVERS_BEFORE_PAUSE:
            delay: float = PAUSE_S * self.rng.uniform(1.0, 1.1)
            log.error(
                "client id %r taken over again (%d takeovers; %s): another process runs with"
                " this client id; stopped fighting: one try every %.0f s until it is gone",
                self.client_id,
                n,
                why,
                PAUSE_S,
            )
            return delay
        delay = self.first_s * 2.0 ** (n - 1) * self.rng.uniform(1.0, 1.5)
        log.warning(
            "client id %r taken over by another connection (%d takeovers; %s): is another"
            " process running with this client id (a copied config or VM image)? reconnecting"
            " in %.1f s",
            self.client_id,
            n,
            why,
            delay,
        )
        return delay
