"""Another connection took our client id: detect it, back off, and give way.

Two processes that connect with one client id (a restored VM image, a copied config) make the
broker close one connection each time the other connects; each reconnects at once and closes
the other: a fight without end (docs/adr/0073-client-id-conflict.md).

The connections of one service (a node's main, updater, downloader and escalator connections;
a bridge's two sides) share one :class:`Conflict`: a duplicate is a duplicate of the whole
service. What tells a connection that it was taken over:

* MQTT 5 brokers that say so (EMQX; the standard's way): a DISCONNECT from the server with
  reason code 0x8E "Session taken over". One such DISCONNECT is one takeover.
* Mosquitto (2.0.11 here, both protocol versions) and any MQTT 3.1.1 broker just close the
  socket. A close by the broker (end of stream, no DISCONNECT, no socket error) less than
  :data:`SUSPECT_LIFETIME_S` after the connect is a *suspect*. A suspect of a connection whose
  previous end was a suspect too, and which reconnected at the first attempt since, is *armed*
  (the broker was up all along); :data:`ARMED_FOR_CONFLICT` armed suspects in a row among the
  service's connections make a conflict, and every suspect since the streak began counts as a
  takeover; while the conflict lasts each further suspect is one. A failed connect attempt, or
  a connection that ends otherwise, breaks the streak: a broker that restarts closes every
  connection at once (suspects, not armed) and then refuses the first attempts.

A takeover waits ``first_s`` doubled per takeover of the service (jittered upwards). At
:data:`TAKEOVERS_BEFORE_PAUSE` the service gives way: every connection sharing the conflict
disconnects (cleanly: no will, no takeover) and none tries again for :data:`PAUSE_S` (5
minutes); so two processes make at most about ten takeovers before one leaves the other alone.
The conflict ends once a connection has stayed up :data:`CLEAR_AFTER_S` without a takeover in
the service.
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
ARMED_FOR_CONFLICT = 2
TAKEOVERS_BEFORE_PAUSE = 5
PAUSE_S = 300.0
CLEAR_AFTER_S = 600.0


@dataclass(slots=True, eq=False)
class Conflict:
    """The takeovers of one service's connections (see the module's docstring)."""

    clock: Callable[[], float] = time.monotonic
    takeovers: int = 0
    """Takeovers in the conflict under way (0: none)."""
    last_at: float = 0.0
    """When the last one was counted (``clock``)."""
    paused_until: float = 0.0
    """No connection of the service connects before this (``clock``): it gave way."""
    streak: int = 0
    """Armed suspects in a row."""
    pending: int = 0
    """Suspects since the streak began, not counted as takeovers yet."""
    _give_way: dict[int, Callable[[], None]] = field(default_factory=dict)

    def join(self, give_way: Callable[[], None]) -> int:
        """A connection of the service: ``give_way()`` disconnects it. Returns a token."""
        token = id(give_way)
        self._give_way[token] = give_way
        return token

    def leave(self, token: int) -> None:
        self._give_way.pop(token, None)

    def pause_left_s(self) -> float:
        return max(0.0, self.paused_until - self.clock())

    def reset_streak(self) -> None:
        self.streak = self.pending = 0

    def give_way(self, rng: random.Random) -> float:
        """Stop fighting: every connection of the service leaves; the pause, in seconds."""
        pause = PAUSE_S * rng.uniform(1.0, 1.1)
        self.paused_until = self.clock() + pause
        for give_way in list(self._give_way.values()):
            try:
                give_way()
            except Exception:
                log.exception("a connection could not give way")
        return pause


@dataclass(slots=True)
class TakeoverGuard:
    """Takeover bookkeeping of one :class:`~edgewise.mqtt.MqttSession` (one client id)."""

    client_id: str
    first_s: float = 1.0
    shared: Conflict = field(default_factory=Conflict)
    rng: random.Random = field(default_factory=random.Random)
    total: int = 0
    """This connection's takeovers since the start."""
    _suspect: bool = False
    """The previous end of this connection was a suspect."""
    _up_since: float | None = None
    _first_try: bool = True
    _failed: bool = False

    @property
    def takeovers(self) -> int:
        """Takeovers in the conflict under way, of every connection sharing it."""
        return self.shared.takeovers

    @property
    def conflict(self) -> bool:
        """Another connection uses our client id (cleared once this connection has been up,
        and none sharing the conflict taken over, for CLEAR_AFTER_S)."""
        shared, up, now = self.shared, self._up_since, self.shared.clock()
        if (
            shared.takeovers
            and up is not None
            and now - up >= CLEAR_AFTER_S
            and now - shared.last_at >= CLEAR_AFTER_S
        ):
            log.info(
                "client id %r: no takeover for %.0f s, the conflict is over",
                self.client_id,
                CLEAR_AFTER_S,
            )
            shared.takeovers = 0
            shared.reset_streak()
        return shared.takeovers > 0

    def connect_failed(self) -> None:
        """An attempt failed: the broker is away, and that breaks any streak."""
        self._failed = True
        self._suspect = False
        self.shared.reset_streak()

    def connected(self) -> None:
        self._up_since = self.shared.clock()
        self._first_try = not self._failed
        self._failed = False

    def lost(self, *, server_reason: int | None, peer_closed: bool) -> float | None:
        """The connection ended: how long to wait if it was taken over, else None.

        ``server_reason``: the reason code of a DISCONNECT the server sent (None: none came);
        ``peer_closed``: the broker closed the socket (end of stream, no socket error).
        """
        self.conflict  # noqa: B018 - a conflict over since is cleared first
        shared = self.shared
        up = self._up_since
        self._up_since = None
        lived = math.inf if up is None else shared.clock() - up
        if server_reason == SESSION_TAKEN_OVER:
            return self._taken_over(1, "the broker said so (MQTT 5 reason 0x8E)")
        if server_reason is not None or not peer_closed or lived >= SUSPECT_LIFETIME_S:
            self._suspect = False
            shared.reset_streak()
            return None
        shared.pending += 1
        if self._suspect and self._first_try:
            shared.streak += 1
        self._suspect = True
        if not shared.takeovers and shared.streak < ARMED_FOR_CONFLICT:
            return None
        count, shared.pending = shared.pending, 0
        if count > 1:
            why = (
                f"the broker closed the service's connections {count} times in a row soon"
                " after accepting them, without a reason"
            )
        else:
            why = "the broker closed the connection again"
        return self._taken_over(count, why)

    def _taken_over(self, count: int, why: str) -> float:
        shared = self.shared
        shared.takeovers += count
        shared.last_at = shared.clock()
        self.total += count
        n = shared.takeovers
        if n >= TAKEOVERS_BEFORE_PAUSE:
            log.error(
                "client id %r taken over again (%d takeovers; %s): another process runs with"
                " this client id; stopped fighting: all connections give way, one try every"
                " %.0f s until it is gone",
                self.client_id,
                n,
                why,
                PAUSE_S,
            )
            return shared.give_way(self.rng)
        delay: float = self.first_s * 2.0 ** (n - 1) * self.rng.uniform(1.0, 1.5)
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
