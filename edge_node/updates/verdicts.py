"""Verdict memory: which manifests and key sets were judged already, and how.

The retained key set and manifest come again on every connect; a verdict remembered here spares
verifying (and reporting) them again. Three kinds of memory:

* handled: taken in hand this run (installing, installed, or current): skipped;
* transient: refused for a passing cause (a timeout, the disk): skipped until the next connect;
* rejected (``seen.json``, across restarts): skipped, unless the reason depends on the keys
  (:data:`edgewise.releases.TRUST_DEPENDENT`) and the key set changed since.

Rejected key sets are remembered by envelope id (the last 1,024) so each is reported once.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from edge_node.updates.errors import StateError
from edge_node.updates.state import Seen, StateStore
from edgewise.releases import TRUST_DEPENDENT, Reason

log = logging.getLogger(__name__)

TRANSIENT = frozenset({Reason.DOWNLOAD_TIMEOUT, Reason.STORAGE_ERROR})
_HANDLED_KEYS_MAX = 1024


class VerdictMemory:
    def __init__(self, store: StateStore, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock
        self.seen = Seen()
        self._handled: set[str] = set()
        self._transient: set[str] = set()
        """Refused for a passing cause (a timeout, the disk): tried again after a reconnect."""
        self._handled_keys: collections.OrderedDict[str, None] = collections.OrderedDict()

    def load(self) -> None:
        """Read what earlier runs refused (``seen.json``)."""
        self.seen = self._store.seen()

    def forget_transient(self) -> None:
        """A new connection: what failed for a passing cause may be tried again."""
        self._transient.clear()

    def handled(self, manifest_id: str) -> None:
        self._handled.add(manifest_id)

    def already_judged(self, manifest_id: str, key_version: int) -> bool:
        if manifest_id in self._handled or manifest_id in self._transient:
            return True
        got = self.seen.rejected.get(manifest_id)
        if got is None:
            return False
        reason, version = got
        return not (Reason(reason) in TRUST_DEPENDENT and version != key_version)

    def refused(self, manifest_id: str, reason: Reason, key_version: int) -> None:
        """A manifest refused: remembered for good, or until the next connect if transient."""
        self._handled.discard(manifest_id)
        if reason in TRANSIENT:
            self._transient.add(manifest_id)
        else:
            self.remember_rejection(manifest_id, reason, key_version)

    def remember_rejection(self, manifest_id: str, reason: Reason, key_version: int) -> None:
        self.seen.rejected[manifest_id] = (reason.value, key_version)
        try:
            self._store.save_seen(self.seen, self._clock())
        except StateError as exc:
            log.error("cannot remember a rejection: %s", exc)

    def first_key_rejection(self, key: str) -> bool:
        """True the first time the key set ``key`` (its envelope id) is refused."""
        if key in self._handled_keys:  # the retained copy comes on every connect
            return False
        self._handled_keys[key] = None
        if len(self._handled_keys) > _HANDLED_KEYS_MAX:
            self._handled_keys.popitem(last=False)
        return True
