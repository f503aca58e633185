"""The result path: a frame is acknowledged only once its result is durable.

Results made by inference wait in the store queue (``to_store``) while the next batch runs;
the store loop takes as many as fit one results message and one outbox transaction, and
:meth:`ResultPath.store` makes them durable through :meth:`Outbound.store_and_offer`: in the
same transaction the outbox records which frame each result answers; once it commits, the
frames are acknowledged (and their keys join the answered filter before that, so no copy slips
between); then the record goes to the forwarder, which deletes it on the broker's PUBACK.

Every copy of a frame whose result is already in the outbox (the newest
``storage.answered_keep`` frames) is acknowledged without a second inference, whatever brought
it again (:meth:`ResultPath.skip_answered`; :mod:`edge_node.answered`: the look-up every frame
pays). Frames escalated to the cloud are acknowledged once their case is journaled, or once
their result is stored if decided at once (docs/adr/0031-escalation-acks.md).

If the outbox cannot take a results message (full disk, a fault), the node degrades and
publishes it directly: its frames are acknowledged once the broker has it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import msgspec

from edge_node.answered import AnsweredFilter
from edge_node.escalation import Case, Escalator, Final
from edge_node.intake import FramesInHand, Pending
from edge_node.outbound import RESULT, Outbound, Tasks
from edge_node.stats import NodeStats
from edge_node.status import NodeStatus
from edgewise.mqtt import MqttSession
from edgewise.outbox import OutboxError, Record, StorageFull
from edgewise.outbox.store import answered_cost
from schemas import Result, ResultBatch, encode_results

log = logging.getLogger(__name__)

#: Bytes one result takes in a results message, at most (MessagePack ~150, JSON ~280).
_RESULT_BYTES_MAX = 300

#: Results of one batch, the (frame key, result id) pairs they answer, and their frames.
Answers = tuple[list[Result], list[tuple[str, str]], list[Pending]]


def _store_bytes(entry: Answers) -> int:
    """What one entry of results waiting to be stored costs the outbox's transaction."""
    results, answered, _ = entry
    return len(results) * _RESULT_BYTES_MAX + sum(answered_cost(k, r) for k, r in answered)


class ResultPath:
    """Results to the outbox, frames acknowledged after the commit, answered frames known."""

    def __init__(
        self,
        node_id: str,
        topic: str,
        *,
        frames: FramesInHand,
        outbound: Outbound,
        uplink: MqttSession,
        status: NodeStatus,
        stats: NodeStats,
        tasks: Tasks,
        escalator: Escalator | None,
        answered_keep: int,
        as_json: bool,
        max_results_per_message: int,
    ) -> None:
        self._node_id = node_id
        self._topic = topic
        self._frames = frames
        self._outbound = outbound
        self._uplink = uplink
        self._status = status
        self._stats = stats
        self._tasks = tasks
        self.escalator = escalator
        self._as_json = as_json
        self._max_results_per_message = max_results_per_message
        self._answered = AnsweredFilter(answered_keep)
        # Answered frames whose result is not in the outbox's answered table yet (sent to the
        # cloud, acknowledged once journaled), by key -> result id.
        self._answering: dict[str, str] = {}
        self.to_store: deque[Answers] = deque()
        self._store_task: asyncio.Task[None] | None = None
        self.in_flight: set[asyncio.Future[None]] = set()
        """Results published directly (degraded): their frames wait for the broker's PUBACK."""

    # ------------------------------------------------------------------ answered frames
    async def remember_answered(self) -> None:
        """Load the keys of the frames answered in earlier runs (before any frame can come)."""
        for key in await self._outbound.outbox.answered_keys():
            self._answered.add(key)

    def maybe_answered(self, key: str) -> bool:
        """The frame may have been answered: look it up before answering it again."""
        return key in self._answered or key in self._answering

    async def skip_answered(self, batch: list[Pending]) -> list[Pending]:
        """Acknowledge the frames answered already (their first result id stands); return the
        rest. Only those marked ``check`` are looked up, in one query."""
        known = {p.key for p in batch if p.check and p.key in self._answering}
        ask = [p.key for p in batch if p.check and p.key not in known]
        if ask:
            try:
                known.update(await self._outbound.outbox.answered_many(ask))
            except OutboxError as exc:
                log.warning("cannot look up %d frames (%s): answering them again", len(ask), exc)
        if not known:
            return batch
        fresh: list[Pending] = []
        done: list[Pending] = []
        for p in batch:
            if p.check and p.key in known:
                done.append(p)
            else:
                fresh.append(p)
        self._stats.frames_already_answered += len(done)
        self._frames.finish(done)
        return fresh

    # ------------------------------------------------------------------ the store queue
    def put(self, answers: Answers) -> None:
        """Queue one batch's results for storing. Storing runs beside the next batch's
        inference; results made while a commit is under way go into the next message
        together: fewer, fuller messages to store and forward."""
        self.to_store.append(answers)
        if self._store_task is None:
            self._store_task = self._tasks.start(self._store_loop())

    async def _store_loop(self) -> None:
        try:
            while self.to_store:
                results: list[Result] = []
                answered: list[tuple[str, str]] = []
                served: list[Pending] = []
                # At most one outbox transaction's worth of bytes: the WAL stays within its
                # share of the outbox's bound at every instant (ADR 0075).
                size, max_size = 0, self._outbound.outbox.max_txn_bytes
                while self.to_store:
                    entry = _store_bytes(self.to_store[0])
                    if results and (
                        len(results) + len(self.to_store[0][0]) > self._max_results_per_message
                        or size + entry > max_size
                    ):
                        break
                    r, a, p = self.to_store.popleft()
                    size += entry
                    results += r
                    answered += a
                    served += p
                every = served
                served, lost = self._frames.taken_over(every)
                if lost:  # taken over while inference ran: the other process answers them
                    self._frames.forget(lost)
                    gone = {id(x) for x in lost}
                    keep = [i for i, x in enumerate(every) if id(x) not in gone]
                    results = [results[i] for i in keep]
                    answered = [answered[i] for i in keep]
                    self._stats.results_out -= len(lost)
                    if not results:
                        continue
                try:
                    payload = self._encode(results)
                except Exception as exc:  # a bug must not hold back every later acknowledgement
                    self.fail(served, "encode", exc)
                    continue
                self._stats.result_messages += 1
                await self.store(payload, answered, served)
        finally:
            self._store_task = None

    def _encode(self, results: list[Result]) -> bytes:
        return encode_results(
            ResultBatch(node=self._node_id, results=results), as_json=self._as_json
        )

    # ------------------------------------------------------------------ durable, then acked
    async def store(
        self, payload: bytes, answered: list[tuple[str, str]], served: list[Pending]
    ) -> None:
        """Store one results message; its frames are acknowledged once it is durable."""
        record = Record(RESULT, self._topic, payload, items=len(served))

        def durable() -> None:
            self._status.set("storage_full", False)
            self._status.set("storage_error", False)
            for key, _ in answered:  # before finish lets go of them: no copy slips between
                self._answered.add(key)
            self._stats.results_stored += len(served)
            self._frames.finish(served)

        exc = await self._outbound.store_and_offer(record, answered, on_durable=durable)
        if exc is not None:  # OutboxError, or anything unexpected: degrade, never stall
            reason = "storage_full" if isinstance(exc, StorageFull) else "storage_error"
            if reason not in self._status.reasons:  # once per episode, not once per batch
                log.error("outbox write failed (%s): results go out without a durable copy", exc)
            self._status.set(reason, True)
            self._publish_direct(payload, served)

    def _publish_direct(self, payload: bytes, served: list[Pending]) -> None:
        """Degraded path: the frames are acknowledged only once the broker has the results."""
        connection = self._uplink.connection
        fut = self._uplink.publish_nowait(self._topic, payload, qos=1)
        self.in_flight.add(fut)
        fut.add_done_callback(lambda f: self._settled(f, served, connection))

    def _settled(self, fut: asyncio.Future[None], served: list[Pending], connection: int) -> None:
        self.in_flight.discard(fut)
        exc = fut.exception()
        if exc is None:
            self._stats.results_acked += len(served)
            self._frames.finish(served)
            return
        self._stats.publish_failures += 1
        if self._uplink.connected and self._uplink.connection == connection:
            # Refused by the broker (e.g. an ACL) or by the client while the link is up:
            # waiting would hold back every later acknowledgement, and retrying cannot help.
            log.error("results on %s not delivered: %s", self._topic, exc)
            self._frames.finish(served)
        else:
            # Connection lost: leave the frames unacknowledged; the broker redelivers them.
            self._frames.forget(served)

    def fail(self, frames: list[Pending], stage: str, exc: Exception) -> None:
        """Results that could not be made or stored (a bug, a fault): their frames are
        dead-lettered (``internal_error``, naming the stage) and acknowledged, so one bad batch
        never holds back the acknowledgements behind it."""
        log.error("%d results lost at %s: %s: %s", len(frames), stage, type(exc).__name__, exc)
        why = f"{stage}: {type(exc).__name__}: {exc}"
        for p in frames:
            self._frames.reject(p.ticket.message, "internal_error", why)
        self._frames.finish(frames)

    # ------------------------------------------------------------------ escalated frames
    async def escalate(self, cases: list[Case], escalated: list[Pending]) -> None:
        """Hand unsure frames to the escalator. A frame is acknowledged once its case is in the
        journal (final result to come) or, if decided at once, once that result is stored
        (docs/adr/0031-escalation-acks.md)."""
        assert self.escalator is not None
        try:
            decided = await self.escalator.escalate(cases)
        except Exception as exc:  # journal trouble: answer now with the edge verdict
            log.error("escalation failed (%s): %d frames answered edge_fallback", exc, len(cases))
            decided = [
                Final(c.frame_key, msgspec.structs.replace(c.result, source="edge_fallback"))
                for c in cases
            ]
        now = {f.frame_key for f in decided}
        waiting = [p for p in escalated if p.key not in now]
        if waiting:
            ids = {c.frame_key: c.result.id for c in cases}
            for p in waiting:  # answered: a copy that comes before the final result is stored
                self._answering[p.key] = ids[p.key]
            self._frames.finish(waiting)
        if decided:
            results = [f.result for f in decided]
            served = [p for p in escalated if p.key in now]
            try:
                payload = self._encode(results)
            except Exception as exc:  # a bug must not hold back every later acknowledgement
                self.fail(served, "encode", exc)
                return
            self._stats.results_out += len(results)
            self._stats.result_messages += 1
            answered = [(f.frame_key, f.result.id) for f in decided]
            await self.store(payload, answered, served)

    async def store_finals(self, finals: list[Final]) -> None:
        """The escalator's final results (cloud, edge_fallback): durable in the outbox before
        the escalator lets go of them (their frames were acknowledged already)."""
        payload = self._encode([f.result for f in finals])
        record = Record(RESULT, self._topic, payload, items=len(finals))

        def durable() -> None:
            for f in finals:
                self._answered.add(f.frame_key)
                self._answering.pop(f.frame_key, None)
            self._stats.results_out += len(finals)
            self._stats.result_messages += 1
            self._stats.results_stored += len(finals)

        answered = [(f.frame_key, f.result.id) for f in finals]
        failed = await self._outbound.store_and_offer(record, answered, on_durable=durable)
        if failed is not None:
            raise failed

    async def settled(self) -> None:
        """Wait until every result in hand is stored, or delivered directly."""
        tasks = self._tasks.running
        if self.escalator is not None:  # pending cases end by their deadline at the latest
            await asyncio.gather(*list(tasks), return_exceptions=True)
            await self.escalator.wait_settled()
        while tasks or self.in_flight:
            await asyncio.gather(*list(tasks), *list(self.in_flight), return_exceptions=True)
