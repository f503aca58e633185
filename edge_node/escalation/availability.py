"""Is the cloud there? Unanswered cases, worker presence and probes (docs/adr/0074).

After ``unavailable_after_unanswered`` cases in a row ended at their deadline with no reply, or
when the number of workers online on the retained presence topics
(``{cloud_root}/workers/+/status``) drops from one or more to none, the cloud is *unavailable*:
the escalator decides unsure cases ``edge_fallback`` at once and sends at most one case per
``probe_interval_s`` as a probe. The first in-time reply (to a probe or any case) makes it
available again. ``on_cloud_change`` hears each change.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from edge_node.escalation.cases import Entry
from edge_node.escalation.config import EscalationConfig
from edge_node.escalation.stats import EscalationStats
from schemas import ContractError, decode_status

log = logging.getLogger(__name__)

_PROBES_KEEP = 64
"""Probes awaiting a reply remembered at most (older ones are forgotten: their replies then
count as unknown)."""
_PRESENCE_MAX = 10_000
"""Workers whose presence is followed at most (a flood of made-up worker ids is ignored)."""


class CloudAvailability:
    def __init__(
        self,
        config: EscalationConfig,
        stats: EscalationStats,
        on_cloud_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._config = config
        self._stats = stats
        self.on_cloud_change = on_cloud_change
        self.unavailable: str | None = None
        """Why the cloud is taken for unavailable (``no_replies``, ``no_workers``), or None."""
        self._unanswered = 0
        """Escalated cases in a row that ended at their deadline with no reply."""
        self._next_probe_at = 0.0
        self.probes: OrderedDict[str, Entry] = OrderedDict()
        """Probes sent and awaiting a reply, by result id."""
        self.workers: dict[str, bool] = {}
        """Worker id -> online, from the retained presence messages seen."""

    def unanswered(self) -> None:
        """A case ended at its deadline with no reply."""
        self._unanswered += 1
        if self._unanswered >= self._config.unavailable_after_unanswered:
            self.set_unavailable("no_replies")

    def answered(self) -> None:
        """An in-time reply: the cloud answers."""
        self._unanswered = 0
        if self.unavailable is None:
            return
        log.info("cloud available again (was: %s)", self.unavailable)
        self.unavailable = None
        if self.on_cloud_change is not None:
            self.on_cloud_change(True)

    def set_unavailable(self, reason: str) -> None:
        if self.unavailable is not None:
            self.unavailable = reason
            return
        self.unavailable = reason
        self._stats.unavailable_episodes += 1
        self._next_probe_at = time.monotonic() + self._config.probe_interval_s
        log.warning(
            "cloud unavailable (%s): unsure cases are decided edge_fallback at once; probing"
            " every %.1f s",
            reason,
            self._config.probe_interval_s,
        )
        if self.on_cloud_change is not None:
            self.on_cloud_change(False)

    def probe_due(self, now: float) -> bool:
        """True (at most once per ``probe_interval_s``) when a case should go out as a probe."""
        if now < self._next_probe_at:
            return False
        self._next_probe_at = now + self._config.probe_interval_s
        return True

    def remember_probe(self, entry: Entry) -> None:
        self.probes[entry.case.result.id] = entry
        while len(self.probes) > _PROBES_KEEP:
            self.probes.popitem(last=False)

    @property
    def workers_online(self) -> int | None:
        """Workers whose presence says online (None: no worker ever announced itself)."""
        if not self.workers:
            return None
        return sum(self.workers.values())

    def on_presence(self, payload: bytes, worker: str) -> bool:
        """A presence message of ``worker``; True if the last worker seen online is gone (the
        cloud is unavailable now: what is pending cannot be answered)."""
        before = self.workers_online
        if not payload:  # a retained presence cleared
            self.workers.pop(worker, None)
        else:
            try:
                status = decode_status(payload)
            except ContractError:
                self._stats.presence_rejects += 1
                return False
            if status.node != worker:
                self._stats.presence_rejects += 1
                return False
            if worker not in self.workers and len(self.workers) >= _PRESENCE_MAX:
                self._stats.presence_rejects += 1
                return False
            self.workers[worker] = status.state != "offline"
        after = self.workers_online
        if after == 0 and before:  # the last worker seen online is gone
            self.set_unavailable("no_workers")
            return True
        if after and not before and self.unavailable is not None:
            self._next_probe_at = 0.0  # a worker is back: the next unsure case probes
        return False
