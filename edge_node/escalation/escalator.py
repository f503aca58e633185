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
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar

import msgspec
import numpy as np

from edge_node.escalation.cache import CloudVerdict, VerdictCache, input_key
from edge_node.escalation.config import EscalationConfig, PolicyConfig
from edge_node.escalation.journal import Journal, JournalError
from edge_node.escalation.policy import assess, edge_verdict, probabilities, with_thresholds
from edgewise.mqtt import (
    Conflict,
    Inbound,
    MqttConfig,
    MqttSession,
    PublishProperties,
    max_packet_for,
)
from edgewise.mqtt.properties import expiry_interval_s
from edgewise.outbox import AsyncOutbox, Forwarder, OutboxConfig, OutboxError, Record
from schemas import (
    CASES_MAX,
    CaseVerdict,
    ContractError,
    EdgeVerdict,
    EscalationCase,
    Limits,
    Result,
    Source,
    Topics,
    decode_replies,
    decode_status,
    encode_escalations,
    make_case,
    make_escalation_batch,
)

log = logging.getLogger(__name__)

HARD_EXAMPLE = "hard_example"
"""The outbox record kind of hard-example uploads (evicted before results by default)."""

_RESOLVED_KEEP = 100_000
_E = TypeVar("_E")
_CASE_OVERHEAD_BYTES = 256
"""Roughly what a case adds to a message besides its tensor (ids, edge verdict, keys)."""
_PROBES_KEEP = 64
"""Probes awaiting a reply remembered at most (older ones are forgotten: their replies then
count as unknown)."""
_PRESENCE_MAX = 10_000
"""Workers whose presence is followed at most (a flood of made-up worker ids is ignored)."""


@dataclass(slots=True)
class Case:
    """One unsure verdict, as the node hands it over."""

    result: Result
    """The provisional result: edge verdict, ``source="edge"``, its final id already given."""
    frame_key: str
    tensor: np.ndarray
    verdict: EdgeVerdict
    received_at: float
    """``time.monotonic()`` when the frame arrived (the final result's latency counts from it)."""


@dataclass(frozen=True, slots=True)
class Final:
    frame_key: str
    result: Result


Deliver = Callable[[list[Final]], Awaitable[None]]


@dataclass(slots=True)
class Triage:
    rows: list[int]
    verdicts: list[EdgeVerdict]


@dataclass(slots=True)
class _Entry:
    case: Case
    corr: str
    key: str
    deadline: float
    message_corr: bytes | None = None
    """The ``corr`` of the message that carried the case, as bytes (set when it is sent)."""


@dataclass(slots=True)
class EscalationStats:
    escalated: int = 0
    """Cases sent to the cloud (published)."""
    messages: int = 0
    """Escalation messages published (each holds one or more cases)."""
    cloud: int = 0
    cached: int = 0
    fallback: int = 0
    offline: int = 0
    overflow: int = 0
    """Decided ``edge_fallback`` at once because ``max_pending`` cases were waiting."""
    recovered: int = 0
    """Pending cases found in the journal at start (decided ``edge_fallback``)."""
    late_replies: int = 0
    """Verdicts for cases decided already (late or duplicate), ignored."""
    replies: int = 0
    """Verdicts accepted (each resolves one case)."""
    hard_examples_stored: int = 0
    hard_examples_lost: int = 0
    reply_rejects: Counter[str] = field(default_factory=Counter)
    """By reason: whole reply messages (malformed, wrong_node, ...) and single verdicts
    (unknown_escalation, wrong_correlation)."""
    batch_sizes: Counter[int] = field(default_factory=Counter)
    """Escalation messages by number of cases."""
    unavailable_fallback: int = 0
    """Cases decided ``edge_fallback`` because the cloud was unavailable (at once, or pending
    when the last worker went offline); counted in ``fallback`` too."""
    unavailable_episodes: int = 0
    """Times the cloud became unavailable."""
    probes: int = 0
    """Probe cases sent while the cloud was unavailable."""
    probe_replies: int = 0
    """In-time verdicts for probes."""
    finals_lost: int = 0
    """Final results given up because storing them failed for a reason other than storage
    (a bug, a fault); their frames were acknowledged when they were journaled."""
    presence_rejects: int = 0
    """Presence messages that were not a valid status of the worker their topic names."""

    @property
    def replies_rejected(self) -> int:
        return sum(self.reply_rejects.values())


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
        self._deliver = deliver
        self.reply_topic = topics.reply(node_id)
        self.stats = EscalationStats()
        self._limits = Limits(max_payload_bytes=config.max_reply_bytes)
        self._cache = VerdictCache(config.cache_entries, config.cache_ttl_s)
        self._pending: dict[str, _Entry] = {}
        self._manifest_policies: dict[str, PolicyConfig] = {}
        self._overrides: dict[str, PolicyConfig] = {}
        self._by_frame: dict[str, str] = {}
        self._resolved: OrderedDict[str, None] = OrderedDict()
        self._heap: list[tuple[float, str]] = []
        self._outgoing: list[_Entry] = []
        self._flush_scheduled = False
        self._deadline_wake = asyncio.Event()
        self._finals: list[Final] = []
        self._finals_wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._settled.set()
        self._delivering = False
        self._removing: set[asyncio.Future[None]] = set()
        self._stack: contextlib.AsyncExitStack | None = None
        self._on_cloud_change = on_cloud_change
        self.unavailable: str | None = None
        """Why the cloud is taken for unavailable (``no_replies``, ``no_workers``), or None."""
        self._unanswered = 0
        """Escalated cases in a row that ended at their deadline with no reply."""
        self._next_probe_at = 0.0
        self._probes: OrderedDict[str, _Entry] = OrderedDict()
        self.workers: dict[str, bool] = {}
        """Worker id -> online, from the retained presence messages seen."""
        self._presence_filter = topics.worker_status_filter()
        self.journal = Journal(state_dir / f"{node_id}.escalations.db", synchronous=synchronous)
        self.uplink = MqttSession(
            # An explicit client id in the node's config names the node's own connection.
            config.uplink or node_mqtt.model_copy(update={"client_id": ""}),
            client_id=f"edgewise-node-{node_id}-escalation",
            on_message=self._on_reply,
            manual_ack=False,
            persistent=False,
            keep_properties=True,
            conflict=conflict,
            max_packet_bytes=max_packet_for(config.max_reply_bytes),  # replies, presence
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
                tasks.create_task(self._deadlines(), name="escalation-deadlines"),
                tasks.create_task(self._deliveries(), name="escalation-deliveries"),
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
        for _rid, frame_key, blob in left:
            try:
                result = msgspec.msgpack.decode(blob, type=Result)
            except msgspec.DecodeError:
                log.error("unreadable entry in the escalation journal; dropped")
                continue
            self.stats.recovered += 1
            self.stats.fallback += 1
            final = msgspec.structs.replace(result, source="edge_fallback")
            self._finals.append(Final(frame_key, final))
        if self._finals:
            log.warning("%d escalations pending at the last stop: edge_fallback", len(self._finals))
            self._settled.clear()
            self._finals_wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_result_id(self, frame_key: str) -> str | None:
        """The result id of a frame still waiting for the cloud (a redelivered copy of it is
        answered already)."""
        return self._by_frame.get(frame_key)

    async def wait_settled(self) -> None:
        """Return once nothing is pending, every final result has been delivered and its
        journal entry deleted."""
        while True:
            while self._pending or self._finals or self._delivering:
                self._settled.clear()
                await self._settled.wait()
            if not self._removing:
                return
            await asyncio.gather(*list(self._removing), return_exceptions=True)

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
        entries: list[_Entry] = []
        offline: list[Case] = []
        for c in cases:
            key = input_key(c.result.model, c.result.release, c.tensor)
            hit = self._cache.get(key, now)
            if hit is not None:
                self.stats.cached += 1
                decided.append(self._final(c, "cloud_cached", hit))
            elif not online:
                self.stats.offline += 1
                decided.append(self._final(c, "edge_offline"))
                offline.append(c)
            elif len(self._pending) + len(entries) >= self.config.max_pending:
                self.stats.overflow += 1
                self.stats.fallback += 1
                decided.append(self._final(c, "edge_fallback"))
            elif self.unavailable is not None:
                self.stats.fallback += 1
                self.stats.unavailable_fallback += 1
                decided.append(self._final(c, "edge_fallback"))
                if now >= self._next_probe_at:
                    self._next_probe_at = now + self.config.probe_interval_s
                    self._probe(c, key, now)
            else:
                policy = self.policy(c.result.model)
                deadline_s = policy.deadline_ms / 1000.0
                entries.append(_Entry(c, secrets.token_hex(8), key, now + deadline_s))
        if offline:
            await self._store_uploads(self._uploads(offline, now_wall), len(offline))
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
        self._settled.clear()
        for e in entries:
            self._add_pending(e)
        try:
            await journaled
        except JournalError as exc:
            log.error("escalation journal write failed (%s); the frames stay unacknowledged", exc)
            raise
        return decided

    # ------------------------------------------------------------------ availability
    def _probe(self, c: Case, key: str, now: float) -> None:
        """Send ``c`` (decided already) to the workers as well: its reply, if one comes in
        time, says the cloud is back."""
        deadline = now + self.policy(c.result.model).deadline_ms / 1000.0
        entry = _Entry(c, secrets.token_hex(8), key, deadline)
        self._probes[c.result.id] = entry
        while len(self._probes) > _PROBES_KEEP:
            self._probes.popitem(last=False)
        try:
            case = _wire_case(c, corr=entry.corr, deadline=time.time() + (deadline - now))
            self._publish(c.result.model, [(entry, case)], time.time(), now)
        except Exception as exc:  # the case is decided already; the next one probes
            log.warning("probe not sent: %s: %s", type(exc).__name__, exc)
            return
        self.stats.probes += 1

    def _set_unavailable(self, reason: str) -> None:
        if self.unavailable is not None:
            self.unavailable = reason
            return
        self.unavailable = reason
        self.stats.unavailable_episodes += 1
        self._next_probe_at = time.monotonic() + self.config.probe_interval_s
        log.warning(
            "cloud unavailable (%s): unsure cases are decided edge_fallback at once; probing"
            " every %.1f s",
            reason,
            self.config.probe_interval_s,
        )
        if self._on_cloud_change is not None:
            self._on_cloud_change(False)

    def _cloud_answered(self) -> None:
        """An in-time reply: the cloud answers."""
        self._unanswered = 0
        if self.unavailable is None:
            return
        log.info("cloud available again (was: %s)", self.unavailable)
        self.unavailable = None
        if self._on_cloud_change is not None:
            self._on_cloud_change(True)

    @property
    def workers_online(self) -> int | None:
        """Workers whose presence says online (None: no worker ever announced itself)."""
        if not self.workers:
            return None
        return sum(self.workers.values())

    def _on_presence(self, msg: Inbound, worker: str) -> None:
        before = self.workers_online
        if not msg.payload:  # a retained presence cleared
            self.workers.pop(worker, None)
        else:
            try:
                status = decode_status(msg.payload)
            except ContractError:
                self.stats.presence_rejects += 1
                return
            if status.node != worker:
                self.stats.presence_rejects += 1
                return
            if worker not in self.workers and len(self.workers) >= _PRESENCE_MAX:
                self.stats.presence_rejects += 1
                return
            self.workers[worker] = status.state != "offline"
        after = self.workers_online
        if after == 0 and before:  # the last worker seen online is gone
            # Nobody can answer what is pending (nor what comes): decide it all now.
            self._set_unavailable("no_workers")
            for entry in list(self._pending.values()):
                self.stats.fallback += 1
                self.stats.unavailable_fallback += 1
                self._resolve(entry, "edge_fallback")
        elif after and not before and self.unavailable is not None:
            self._next_probe_at = 0.0  # a worker is back: the next unsure case probes

    # ------------------------------------------------------------------ sending
    def _add_pending(self, e: _Entry) -> None:
        rid = e.case.result.id
        self._pending[rid] = e
        self._by_frame[e.case.frame_key] = rid
        if not self._heap or e.deadline < self._heap[0][0]:
            self._deadline_wake.set()
        heapq.heappush(self._heap, (e.deadline, rid))
        self._outgoing.append(e)
        if not self._flush_scheduled:
            # Sent at the next turn of the event loop: cases handed over by other micro-batches
            # in this turn go in the same messages.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        outgoing, self._outgoing = self._outgoing, []
        now_wall, now = time.time(), time.monotonic()
        by_model: dict[str, list[tuple[_Entry, EscalationCase]]] = {}
        for e in outgoing:
            if e.case.result.id not in self._pending:
                continue  # resolved already (its deadline passed meanwhile)
            case = _wire_case(e.case, corr=e.corr, deadline=now_wall + (e.deadline - now))
            by_model.setdefault(e.case.result.model, []).append((e, case))
        for model, pairs in by_model.items():
            for chunk in _chunks(pairs, self.config.max_message_bytes):
                self._publish(model, chunk, now_wall, now)

    def _publish(
        self, model: str, chunk: list[tuple[_Entry, EscalationCase]], now_wall: float, now: float
    ) -> None:
        corr = secrets.token_hex(8)
        for e, _ in chunk:
            e.message_corr = corr.encode()
        batch = make_escalation_batch(
            node=self.node_id,
            model=model,
            ts=now_wall,
            cases=[c for _, c in chunk],
            reply_to=self.reply_topic,
            corr=corr,
        )
        props: PublishProperties | None = None
        if self.uplink.protocol == "5":
            remaining = min(e.deadline for e, _ in chunk) - now
            props = PublishProperties(
                response_topic=self.reply_topic,
                correlation_data=corr.encode(),
                message_expiry_interval_s=expiry_interval_s(remaining),
            )
        fut = self.uplink.publish_nowait(
            self.topics.escalations(model), encode_escalations(batch), qos=1, properties=props
        )
        fut.add_done_callback(lambda f: f.exception())  # a lost one falls back at its deadline
        self.stats.escalated += len(chunk)
        self.stats.messages += 1
        self.stats.batch_sizes[len(chunk)] += 1

    def _uploads(self, cases: list[Case], now_wall: float) -> list[tuple[Record, int]]:
        """Hard-example upload messages of ``cases`` (per model), with their case counts."""
        by_model: dict[str, list[tuple[Case, EscalationCase]]] = {}
        for c in cases:
            by_model.setdefault(c.result.model, []).append((c, _wire_case(c)))
        records: list[tuple[Record, int]] = []
        for model, pairs in by_model.items():
            for chunk in _chunks(pairs, self.config.max_message_bytes):
                batch = make_escalation_batch(
                    node=self.node_id,
                    model=model,
                    ts=now_wall,
                    cases=[e for _, e in chunk],
                    offline=True,
                )
                payload = encode_escalations(batch)
                topic = self.topics.escalations(model)
                record = Record(HARD_EXAMPLE, topic, payload, items=len(chunk))
                records.append((record, len(chunk)))
        return records

    async def _store_uploads(self, records: list[tuple[Record, int]], n: int) -> None:
        try:
            ids = await self.hard_examples.append([r for r, _ in records])
        except (OutboxError, ValueError) as exc:
            self.stats.hard_examples_lost += n
            log.error("hard examples not kept (%s): the results stand, the examples are lost", exc)
            return
        self.stats.hard_examples_stored += n
        now = time.time()
        self.forwarder.offer([r.stored(i, now) for (r, _), i in zip(records, ids, strict=True)])

    # ------------------------------------------------------------------ replies
    def _on_reply(self, msg: Inbound) -> None:
        if msg.topic != self.reply_topic:
            worker = self.topics.parse_worker_status(msg.topic)
            if worker is not None and self.config.watch_worker_presence:
                self._on_presence(msg, worker)
            else:
                self._reject("bad_topic")
            return
        try:
            reply = decode_replies(msg.payload, self._limits)
        except ContractError as exc:
            self._reject(exc.reason)
            return
        if reply.node != self.node_id:
            self._reject("wrong_node")
            return
        corr_data = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        message_corr: bytes | None = reply.corr.encode()
        if corr_data is not None and bytes(corr_data) != message_corr:
            message_corr = None  # MQTT 5 correlation data and payload disagree: no case matches
        for v in reply.verdicts:
            entry = self._pending.get(v.id)
            if entry is None:
                probe = self._probes.get(v.id)
                if probe is not None and self._probe_answered(probe, v, message_corr):
                    continue
                if v.id in self._resolved:
                    self.stats.late_replies += 1  # late or duplicate: the result is decided
                else:
                    self._reject("unknown_escalation")
                continue
            if v.corr != entry.corr or message_corr is None or entry.message_corr != message_corr:
                self._reject("wrong_correlation")
                continue
            self.stats.replies += 1
            verdict = CloudVerdict(int(v.label), float(v.confidence))
            self._cache.put(entry.key, verdict)
            self.stats.cloud += 1
            self._resolve(entry, "cloud", verdict)
            self._cloud_answered()

    def _probe_answered(self, probe: _Entry, v: CaseVerdict, message_corr: bytes | None) -> bool:
        """A verdict for a probe: True if it is the probe's and in time (the cloud is back)."""
        if v.corr != probe.corr or message_corr is None or probe.message_corr != message_corr:
            return False
        del self._probes[v.id]
        if time.monotonic() > probe.deadline:
            self.stats.late_replies += 1
            return True
        self.stats.probe_replies += 1
        self._cache.put(probe.key, CloudVerdict(int(v.label), float(v.confidence)))
        self._cloud_answered()
        return True

    def _reject(self, reason: str) -> None:
        self.stats.reply_rejects[reason] += 1
        log.debug("reply rejected: %s", reason)

    # ------------------------------------------------------------------ resolving
    def _final(self, c: Case, source: Source, verdict: CloudVerdict | None = None) -> Final:
        changes: dict[str, object] = {
            "source": source,
            "latency_ms": max(0.0, (time.monotonic() - c.received_at) * 1000.0),
        }
        if verdict is not None:
            changes["label"] = verdict.label
            changes["confidence"] = min(1.0, max(0.0, verdict.confidence))
        return Final(c.frame_key, msgspec.structs.replace(c.result, **changes))

    def _resolve(self, entry: _Entry, source: Source, verdict: CloudVerdict | None = None) -> None:
        rid = entry.case.result.id
        if self._pending.pop(rid, None) is None:
            return  # already resolved: exactly once
        self._by_frame.pop(entry.case.frame_key, None)
        self._resolved[rid] = None
        while len(self._resolved) > _RESOLVED_KEEP:
            self._resolved.popitem(last=False)
        self._finals.append(self._final(entry.case, source, verdict))
        self._finals_wake.set()

    async def _deadlines(self) -> None:
        while True:
            now = time.monotonic()
            while self._heap and self._heap[0][0] <= now:
                _, rid = heapq.heappop(self._heap)
                entry = self._pending.get(rid)
                if entry is not None:
                    self.stats.fallback += 1
                    self._resolve(entry, "edge_fallback")
                    self._unanswered += 1
                    if self._unanswered >= self.config.unavailable_after_unanswered:
                        self._set_unavailable("no_replies")
            self._deadline_wake.clear()
            timeout = self._heap[0][0] - now if self._heap else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._deadline_wake.wait()

    def _removed(self, fut: asyncio.Future[None]) -> None:
        self._removing.discard(fut)
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:  # stays journaled: decided again (same id) after a restart
            log.error("escalation journal delete failed: %s", exc)

    async def _deliver_each(self, batch: list[Final]) -> list[Final]:
        """Deliver ``batch`` one result at a time; a result that fails alone for a reason other
        than storage is given up (logged, counted in ``finals_lost``), so it cannot hold back
        the others for ever; one that meets storage trouble waits for the next round. Returns
        the results done with (delivered or given up)."""
        done: list[Final] = []
        for i, final in enumerate(batch):
            try:
                await self._deliver([final])
            except (OutboxError, OSError):
                self._finals[:0] = batch[i:]
                break
            except Exception as exc:
                self.stats.finals_lost += 1
                why = f"{type(exc).__name__}: {exc}"
                log.error("final result %s given up: %s", final.result.id, why)
            done.append(final)
        return done

    async def _deliveries(self) -> None:
        while True:
            if not self._finals:
                if not self._pending:
                    self._settled.set()
                self._finals_wake.clear()
                await self._finals_wake.wait()
                continue
            batch, self._finals = self._finals, []
            self._delivering = True
            try:
                await self._deliver(batch)
            except (OutboxError, OSError) as exc:  # storage trouble: keep them, try again
                log.error("storing %d final results failed (%s); retrying", len(batch), exc)
                self._finals[:0] = batch
                self._delivering = False
                await asyncio.sleep(0.5)
                continue
            except Exception as exc:  # not storage: one of them may be what fails, every time
                log.error("storing %d final results failed (%s); one by one", len(batch), exc)
                batch = await self._deliver_each(batch)
            # The delete commits in the background (in order, after this batch's insert): the
            # next final results need not wait for it.
            if batch:
                removed = self.journal.remove_nowait([f.result.id for f in batch])
                self._removing.add(removed)
                removed.add_done_callback(self._removed)
            self._delivering = False


def _chunks(
    pairs: list[tuple[_E, EscalationCase]], max_bytes: int
) -> list[list[tuple[_E, EscalationCase]]]:
    """``pairs`` in runs of at most ``CASES_MAX`` cases and about ``max_bytes`` (a case bigger
    than that goes alone)."""
    out: list[list[tuple[_E, EscalationCase]]] = []
    run: list[tuple[_E, EscalationCase]] = []
    size = 0
    for pair in pairs:
        n = len(pair[1].data) + _CASE_OVERHEAD_BYTES
        if run and (len(run) >= CASES_MAX or size + n > max_bytes):
            out.append(run)
            run, size = [], 0
        run.append(pair)
        size += n
    if run:
        out.append(run)
    return out


def _wire_case(
    c: Case, *, corr: str | None = None, deadline: float | None = None
) -> EscalationCase:
    """``c`` as it goes on the wire: to the workers (with ``corr`` and ``deadline``) or in a
    hard-example upload (without)."""
    r = c.result
    return make_case(
        id=r.id,
        release=r.release,
        device=r.device,
        sensor=r.sensor,
        frame_seq=r.frame_seq,
        tensor=c.tensor,
        edge=c.verdict,
        corr=corr,
        deadline=deadline,
    )
