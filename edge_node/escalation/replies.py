"""The reply path: the workers' verdicts in, checked, each resolving its pending case once.

Whole reply messages that are malformed, oversized or for another node, and single verdicts for
an unknown case or with the wrong correlation id (the case's own and its message's, which over
MQTT 5 must match the correlation data too) are rejected and counted by reason. Late and
duplicate verdicts are counted and ignored. An in-time verdict for a probe says the cloud is
back. Presence messages arrive on the same session and are handed on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from edge_node.escalation.availability import CloudAvailability
from edge_node.escalation.cache import CloudVerdict, VerdictCache
from edge_node.escalation.cases import Entry
from edge_node.escalation.config import EscalationConfig
from edge_node.escalation.pending import PendingCases
from edge_node.escalation.stats import EscalationStats
from edgewise.mqtt import Inbound
from schemas import CaseVerdict, ContractError, Limits, Topics, decode_replies

log = logging.getLogger(__name__)


class Replies:
    def __init__(
        self,
        config: EscalationConfig,
        *,
        node_id: str,
        topics: Topics,
        reply_topic: str,
        pending: PendingCases,
        cache: VerdictCache,
        availability: CloudAvailability,
        stats: EscalationStats,
        on_presence: Callable[[Inbound, str], None],
    ) -> None:
        self._config = config
        self._node_id = node_id
        self._topics = topics
        self._reply_topic = reply_topic
        self._pending = pending
        self._cache = cache
        self._availability = availability
        self._stats = stats
        self._on_presence = on_presence
        self._limits = Limits(max_payload_bytes=config.max_reply_bytes)

    def on_message(self, msg: Inbound) -> None:
        if msg.topic != self._reply_topic:
            worker = self._topics.parse_worker_status(msg.topic)
            if worker is not None and self._config.watch_worker_presence:
                self._on_presence(msg, worker)
            else:
                self._reject("bad_topic")
            return
        try:
            reply = decode_replies(msg.payload, self._limits)
        except ContractError as exc:
            self._reject(exc.reason)
            return
        if reply.node != self._node_id:
            self._reject("wrong_node")
            return
        corr_data = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        message_corr: bytes | None = reply.corr.encode()
        if corr_data is not None and bytes(corr_data) != message_corr:
            message_corr = None  # MQTT 5 correlation data and payload disagree: no case matches
        pending = self._pending
        for v in reply.verdicts:
            entry = pending.get(v.id)
            if entry is None:
                probe = self._availability.probes.get(v.id)
                if probe is not None and self._probe_answered(probe, v, message_corr):
                    continue
                if pending.was_resolved(v.id):
                    self._stats.late_replies += 1  # late or duplicate: the result is decided
                else:
                    self._reject("unknown_escalation")
                continue
            if v.corr != entry.corr or message_corr is None or entry.message_corr != message_corr:
                self._reject("wrong_correlation")
                continue
            self._stats.replies += 1
            verdict = CloudVerdict(int(v.label), float(v.confidence))
            self._cache.put(entry.key, verdict)
            self._stats.cloud += 1
            pending.resolve(entry, "cloud", verdict)
            self._availability.answered()

    def _probe_answered(self, probe: Entry, v: CaseVerdict, message_corr: bytes | None) -> bool:
        """A verdict for a probe: True if it is the probe's and in time (the cloud is back)."""
        if v.corr != probe.corr or message_corr is None or probe.message_corr != message_corr:
            return False
        del self._availability.probes[v.id]
        if time.monotonic() > probe.deadline:
            self._stats.late_replies += 1
            return True
        self._stats.probe_replies += 1
        self._cache.put(probe.key, CloudVerdict(int(v.label), float(v.confidence)))
        self._availability.answered()
        return True

    def _reject(self, reason: str) -> None:
        self._stats.reply_rejects[reason] += 1
        log.debug("reply rejected: %s", reason)
