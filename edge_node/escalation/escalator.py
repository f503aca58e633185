"""The node's side of hybrid inference: send unsure cases to the cloud, always answer.

``async with Escalator(...) as esc`` owns an uplink MQTT session (to the cloud workers' broker;
by default the node's own), the pending-escalation journal, a verdict cache, and a forwarder of
the hard examples for cases decided while the uplink was down: they wait in the node's outbox
(ADR 0069; in a file of their own for an escalator outside a node) until it is back.

The node calls :meth:`Escalator.triage` on each batch's scores to learn which rows are unsure,
then :meth:`Escalator.escalate` with those cases. ``escalate`` returns once every case is either
decided already (``cloud_cached``: the cache knew the input; ``edge_offline``: no uplink;
``edge_fallback``: too many pending) — those results come back to be stored like any other — or
durable in the journal and on its way to the cloud. The cases of one call, and of any other calls
made in the same turn of the event loop, go out together: one message per model holds up to
``schemas.CASES_MAX`` of them (docs/adr/0032-escalation-batches.md). Each pending case is
resolved exactly once, by the first valid verdict for it (``cloud``) or by its deadline
(``edge_fallback``), and its final result is handed to the ``deliver`` callback, which stores it
durably; only then does the journal let it go. A reply may answer some cases of a message; the
others fall back at their deadline. Late and duplicate verdicts are ignored; hostile replies
(malformed, oversized, for another node) and verdicts (unknown case, wrong correlation id) are
rejected and counted. Nothing here blocks other frames.

The escalator also notices when the cloud is gone (docs/adr/0074-cloud-availability.md): after
``unavailable_after_unanswered`` cases in a row ended at their deadline with no reply, or when
the number of workers online on the retained presence topics (``{cloud_root}/workers/+/status``)
drops from one or more to none, the cloud is *unavailable*: unsure cases
are decided ``edge_fallback`` at once (cases pending on a worker pool that went offline too),
and at most one case per ``probe_interval_s`` is also sent to the workers as a probe. The first
in-time reply (to a probe or any case) makes it available again. ``on_cloud_change`` hears each
change (the node says ``degraded: cloud_unavailable``).

This module is the wiring and the node's API; the promises live in :mod:`.pending` (each case
resolved once, delivered, then let go), :mod:`.publish` (cases out in batches, hard examples
to the outbox), :mod:`.replies` (verdicts in, checked) and :mod:`.availability` (is the cloud
there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import msgspec
import numpy as np

from edge_node.escalation.availability import CloudAvailability
from edge_node.escalation.cache import VerdictCache, input_key
from edge_node.escalation.cases import Case, Deliver, Entry, Final, Triage, final_of
from edge_node.escalation.config import EscalationConfig, PolicyConfig
from edge_node.escalation.journal import Journal, JournalError
from edge_node.escalation.pending import PendingCases
from edge_node.escalation.policy import assess, edge_verdict, probabilities, with_thresholds
from edge_node.escalation.publish import HARD_EXAMPLE, CaseSender, HardExamples
from edge_node.escalation.replies import Replies
from edge_node.escalation.stats import EscalationStats
from edgewise.mqtt import Conflict, Inbound, MqttConfig, MqttSession, max_packet_for
from edgewise.outbox import AsyncOutbox, Forwarder, OutboxConfig
from schemas import Result, Topics

log = logging.getLogger(__name__)

__all__ = ["HARD_EXAMPLE", "Case", "Deliver", "EscalationStats", "Escalator", "Final", "Triage"]


class Escalator:
    def __init__(
        self,
        config: EscalationConfig,
        *,
        node_id: str,
        node_mqtt: MqttConfig,
        topics: Topics,
        state_dir: Path,
        deliver: Deliver,
        synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL",
        outbox: AsyncOutbox | None = None,
        on_cloud_change: Callable[[bool], None] | None = None,
        conflict: Conflict | None = None,
    ) -> None:
        """``outbox``: the node's outbox, opened by the node before this is entered; hard
        examples are stored there (kind ``hard_example``, bounded and evicted with the node's
        records). Without it (the escalator on its own) they get a file of their own.
        ``conflict``: the node's takeover count, shared by its connections (ADR 0073)."""
        self.config = config
        self.node_id = node_id
        self.topics = topics
        self.reply_topic = topics.reply(node_id)
        self.stats = EscalationStats()
        self._cache = VerdictCache(config.cache_entries, config.cache_ttl_s)
        self._manifest_policies: dict[str, PolicyConfig] = {}
        self._overrides: dict[str, PolicyConfig] = {}
        self._stack: contextlib.AsyncExitStack | None = None
        self.availability = CloudAvailability(config, self.stats, on_cloud_change)
        self._presence_filter = topics.worker_status_filter()
        self.journal = Journal(state_dir / f"{node_id}.escalations.db", synchronous=synchronous)
        self.cases = PendingCases(
            self.journal, deliver, self.stats, on_unanswered=self.availability.unanswered
        )
        self.replies = Replies(
            config,
            node_id=node_id,
            topics=topics,
            reply_topic=self.reply_topic,
            pending=self.cases,
            cache=self._cache,
            availability=self.availability,
            stats=self.stats,
            on_presence=self._on_presence,
        )
        self.uplink = MqttSession(
            # An explicit client id in the node's config names the node's own connection.
            config.uplink or node_mqtt.model_copy(update={"client_id": ""}),
            client_id=f"edgewise-node-{node_id}-escalation",
            on_message=self.replies.on_message,
            manual_ack=False,
            persistent=False,
            keep_properties=True,
            conflict=conflict,
            max_packet_bytes=max_packet_for(config.max_reply_bytes),  # replies, presence
        )
        self.sender = CaseSender(
            config,
            node_id=node_id,
            topics=topics,
            reply_topic=self.reply_topic,
            uplink=self.uplink,
            stats=self.stats,
            is_pending=self.cases.__contains__,
        )
        self.owns_outbox = outbox is None
        self.hard_examples = (
            outbox
            if outbox is not None
            else AsyncOutbox(
                OutboxConfig(
                    path=state_dir / f"{node_id}.hard_examples.db",
                    max_bytes=config.hard_example_outbox_max_bytes,
                    synchronous=synchronous,
                    eviction_order=("hard_example",),
                    answered_keep=0,
                )
            )
        )
        self.forwarder = Forwarder(
            self.hard_examples, self.uplink, window=64, kinds=frozenset({HARD_EXAMPLE})
        )
        self._uploads = HardExamples(
            config,
            node_id=node_id,
            topics=topics,
            outbox=self.hard_examples,
            forwarder=self.forwarder,
            stats=self.stats,
        )

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Self:
        config = self.config
        async with contextlib.AsyncExitStack() as stack:
            left = await self.journal.open()
            stack.push_async_callback(self.journal.close)
            if self.owns_outbox:
                await stack.enter_async_context(self.hard_examples)
            await stack.enter_async_context(self.uplink)
            self.uplink.subscribe(self.reply_topic, qos=1)
            if config.watch_worker_presence:
                self.uplink.subscribe(self._presence_filter, qos=1)
            tasks = await stack.enter_async_context(asyncio.TaskGroup())
            loops = [
                tasks.create_task(self.cases.deadlines(), name="escalation-deadlines"),
                tasks.create_task(self.cases.deliveries(), name="escalation-deliveries"),
                tasks.create_task(self.forwarder.run(), name="hard-example-forwarder"),
            ]
            stack.callback(lambda: [t.cancel() for t in loops])
            self._recover(left)
            # A moment for the uplink to come up, so the first unsure frames are not taken
            # for offline ones; a cloud that is away does not hold up the node for long.
            with contextlib.suppress(TimeoutError):
                await self.uplink.wait_connected(min(2.0, self.uplink.config.connect_timeout_s))
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            await self._stack.__aexit__(None, None, None)

    def _recover(self, left: list[tuple[str, str, bytes]]) -> None:
        """Cases pending when an earlier run stopped: their replies cannot be told from late ones,
        so each is decided now as ``edge_fallback``, under the result id it was given then."""
        finals: list[Final] = []
        for _rid, frame_key, blob in left:
            try:
                result = msgspec.msgpack.decode(blob, type=Result)
            except msgspec.DecodeError:
                log.error("unreadable entry in the escalation journal; dropped")
                continue
            self.stats.recovered += 1
            self.stats.fallback += 1
            final = msgspec.structs.replace(result, source="edge_fallback")
            finals.append(Final(frame_key, final))
        if finals:
            log.warning("%d escalations pending at the last stop: edge_fallback", len(finals))
            self.cases.decided(finals)

    @property
    def pending(self) -> int:
        return len(self.cases)

    def pending_result_id(self, frame_key: str) -> str | None:
        """The result id of a frame still waiting for the cloud (a redelivered copy of it is
        answered already)."""
        return self.cases.result_id_of(frame_key)

    async def wait_settled(self) -> None:
        """Return once nothing is pending, every final result has been delivered and its
        journal entry deleted."""
        await self.cases.wait_settled()

    # ------------------------------------------------------------------ availability
    @property
    def unavailable(self) -> str | None:
        """Why the cloud is taken for unavailable (``no_replies``, ``no_workers``), or None."""
        return self.availability.unavailable

    @property
    def workers(self) -> dict[str, bool]:
        """Worker id -> online, from the retained presence messages seen."""
        return self.availability.workers

    @property
    def workers_online(self) -> int | None:
        """Workers whose presence says online (None: no worker ever announced itself)."""
        return self.availability.workers_online

    def _on_presence(self, msg: Inbound, worker: str) -> None:
        if self.availability.on_presence(msg.payload, worker):
            # Nobody can answer what is pending (nor what comes): decide it all now.
            for entry in self.cases.entries():
                self.stats.fallback += 1
                self.stats.unavailable_fallback += 1
                self.cases.resolve(entry, "edge_fallback")

    # ------------------------------------------------------------------ node API
    def policy(self, model: str) -> PolicyConfig:
        """The policy for ``model``, first found of: a ``set_threshold`` command's, the node
        config's ``escalation.policies`` entry, the served release's manifest thresholds (over
        ``escalation.policy``), ``escalation.policy``."""
        found = self._overrides.get(model) or self.config.policies.get(model)
        return found or self._manifest_policies.get(model) or self.config.policy

    def use_manifest_thresholds(self, model: str, thresholds: Mapping[str, float]) -> None:
        """The thresholds the release now served for ``model`` came with (empty: none)."""
        self._manifest_policies.pop(model, None)
        if not thresholds:
            return
        try:
            self._manifest_policies[model] = with_thresholds(self.config.policy, thresholds)
        except ValueError as exc:  # signed, but not for this node's version: keep the default
            log.warning("manifest thresholds of %s not used: %s", model, exc)

    def set_thresholds(self, model: str, thresholds: Mapping[str, float | str]) -> PolicyConfig:
        """An operator's ``set_threshold``: these thresholds over the current policy, until the
        node restarts. ValueError (naming the bad threshold) leaves the policy as it was."""
        policy = with_thresholds(self.policy(model), thresholds)
        self._overrides[model] = policy
        return policy

    def triage(self, model: str, scores: np.ndarray, output: str) -> Triage:
        """Which rows of ``scores`` ``[N, C]`` the policy for ``model`` sends to the cloud."""
        policy = self.policy(model)
        if scores.ndim != 2 or len(scores) == 0:
            return Triage([], [])
        probs = probabilities(scores, output)
        a = assess(probs, policy)
        rows = [int(i) for i in np.flatnonzero(a.escalate & np.isfinite(probs).all(axis=1))]
        return Triage(rows, [edge_verdict(probs[i], a, i) for i in rows])

    async def escalate(self, cases: list[Case]) -> list[Final]:
        """Take these cases; returns those decided at once. When it returns, every other case is
        committed to the journal (its frame may be acknowledged) and sent to the cloud."""
        now_wall = time.time()
        now = time.monotonic()
        online = self.uplink.connected
        decided: list[Final] = []
        entries: list[Entry] = []
        offline: list[Case] = []
        for c in cases:
            key = input_key(c.result.model, c.result.release, c.tensor)
            hit = self._cache.get(key, now)
            if hit is not None:
                self.stats.cached += 1
                decided.append(final_of(c, "cloud_cached", hit))
            elif not online:
                self.stats.offline += 1
                decided.append(final_of(c, "edge_offline"))
                offline.append(c)
            elif len(self.cases) + len(entries) >= self.config.max_pending:
                self.stats.overflow += 1
                self.stats.fallback += 1
                decided.append(final_of(c, "edge_fallback"))
            elif self.unavailable is not None:
                self.stats.fallback += 1
                self.stats.unavailable_fallback += 1
                decided.append(final_of(c, "edge_fallback"))
                if self.availability.probe_due(now):
                    self._probe(c, key, now)
            else:
                policy = self.policy(c.result.model)
                deadline_s = policy.deadline_ms / 1000.0
                entries.append(Entry(c, secrets.token_hex(8), key, now + deadline_s))
        if offline:
            await self._uploads.store(offline, now_wall)
        if not entries:
            return decided
        journaled = self.journal.add_nowait(
            [
                (e.case.result.id, e.case.frame_key, msgspec.msgpack.encode(e.case.result))
                for e in entries
            ]
        )
        # Pending (and published) before the commit finishes: the journal's thread runs this
        # insert before any delete a reply could cause, and the frames wait for the commit.
        self.cases.hold()
        for e in entries:
            self.cases.add(e)
            self.sender.send(e)
        try:
            await journaled
        except JournalError as exc:
            log.error("escalation journal write failed (%s); the frames stay unacknowledged", exc)
            raise
        return decided

    def _probe(self, c: Case, key: str, now: float) -> None:
        """Send ``c`` (decided already) to the workers as well: its reply, if one comes in
        time, says the cloud is back."""
        deadline = now + self.policy(c.result.model).deadline_ms / 1000.0
        entry = Entry(c, secrets.token_hex(8), key, deadline)
        self.availability.remember_probe(entry)
        if self.sender.probe(entry, now):
            self.stats.probes += 1
