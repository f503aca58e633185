"""Operator commands: verified on receipt, recorded before acknowledged, run once, in order.

docs/adr/0073-client-id-conflict.md has the why. A command is verified when it arrives (garbage
never takes a place in the bounded queue), recorded in the journal
(:mod:`edge_node.updates.journal`, fsynced) and only then acknowledged to the broker, run one
at a time in the order received, and marked done. A crash between receipt and execution runs
the command once after the restart; a copy that comes again runs no more.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from edge_node.updates.config import UpdatesConfig
from edge_node.updates.crashpoints import crashpoint
from edge_node.updates.errors import StateError
from edge_node.updates.events import UpdateEvents
from edge_node.updates.journal import CommandJournal, Entry
from edge_node.updates.rejects import ControlRejects, Rejection
from edge_node.updates.stats import UpdateStats
from edgewise.mqtt import Inbound, MqttSession
from edgewise.releases import (
    Command,
    KeySet,
    Reason,
    Rejected,
    decode_document,
    decode_envelope,
    verify_command,
)
from edgewise.releases.events import EventKind
from schemas import log_text

log = logging.getLogger(__name__)

CommandHandler = Callable[[Mapping[str, str]], object]


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What came of a command: the event that reports it."""

    kind: EventKind
    reason: Reason | None
    detail: str


class Commands:
    def __init__(
        self,
        config: UpdatesConfig,
        *,
        journal: CommandJournal,
        session: MqttSession,
        handlers: dict[str, CommandHandler],
        node_id: str,
        hw_class: str,
        keys: Callable[[], KeySet | None],
        events: UpdateEvents,
        rejects: ControlRejects,
        stats: UpdateStats,
        clock: Callable[[], float],
    ) -> None:
        """``handlers``: by command name (the caller's dict, looked up when a command runs);
        ``keys()``: the key set held when a command arrives."""
        self._config = config
        self.journal = journal
        self._session = session
        self._handlers = handlers
        self._node_id = node_id
        self._hw_class = hw_class
        self._keys = keys
        self._events = events
        self._rejects = rejects
        self._stats = stats
        self._clock = clock
        self._to_record: list[tuple[Command, Inbound]] = []
        """Verified commands waiting for their journal write (then their acknowledgement)."""
        self._record_wake = asyncio.Event()
        self._waiting: collections.deque[Entry] = collections.deque()
        """Commands recorded and not yet run, in the order received."""
        self._run_wake = asyncio.Event()
        self._in_hand: set[str] = set()
        """Ids of the commands in ``_to_record`` and ``_waiting``: the bounded queue."""
        self._done_ids: set[str] = set()
        """Ids of the commands that ran (journal and, from before it, seen.json)."""

    @property
    def in_hand(self) -> int:
        """Commands received and not run yet (recorded or being recorded)."""
        return len(self._in_hand)

    def open(self, ran_before: Mapping[str, float]) -> None:
        """Open the journal; the commands recorded and not run go first (in order).
        ``ran_before``: ids of the commands run before the journal existed (seen.json)."""
        journal = self.journal
        journal.open()
        journal.prune(self._clock())
        self._done_ids = journal.done_ids() | set(ran_before)
        waiting = journal.waiting()
        self._waiting = collections.deque(waiting)
        self._in_hand = {e.id for e in waiting}
        if waiting:
            log.info("%d commands received before the restart wait to run", len(waiting))

    def take(self, msg: Inbound) -> None:
        """Verify a command on receipt; queue it for the journal, or refuse it (acknowledged,
        counted, reported at a capped rate). Only verified commands take a place in the
        bounded queue, so garbage can never crowd out an operator's command."""
        topic = msg.topic
        session = self._session
        if msg.retain:
            session.ack(msg)  # commands are events: a retained one would run each connect
            return
        try:
            command = verify_command(
                msg.payload,
                keys=self._keys(),
                node_id=self._node_id,
                hw_class=self._hw_class,
                seen_ids=self._done_ids,
                now=self._clock(),
            )
        except Rejected as exc:
            session.ack(msg)
            self._rejects.reject(Rejection("command", topic, exc.reason, exc.detail, msg.payload))
            return
        if command.id in self._in_hand:  # recorded (or being recorded), not run yet: a copy
            self._stats.commands_again += 1
            session.ack(msg)
            return
        if len(self._in_hand) >= self._config.command_queue_max:
            session.ack(msg)
            self._rejects.reject(
                Rejection(
                    "command",
                    topic,
                    Reason.QUEUE_FULL,
                    f"{len(self._in_hand)} commands wait already (updates.command_queue_max)",
                    msg.payload,
                    ref=command.id,
                )
            )
            return
        self._in_hand.add(command.id)
        self._to_record.append((command, msg))
        self._record_wake.set()

    async def record_loop(self) -> None:
        """Record verified commands (fsynced), then acknowledge them; hand them on to run."""
        while True:
            await self._record_wake.wait()
            self._record_wake.clear()
            batch, self._to_record = self._to_record, []
            if not batch:
                continue
            rows = [(c.id, m.payload, c.expires_at) for c, m in batch]
            try:
                made = await asyncio.to_thread(self.journal.record, rows)
            except StateError as exc:
                # Not acknowledged: the broker hands them to the session's next connection.
                for c, m in batch:
                    self._in_hand.discard(c.id)
                    self._rejects.reject(
                        Rejection("command", m.topic, Reason.STORAGE_ERROR, str(exc), ref=c.id)
                    )
                continue
            for _, m in batch:
                self._session.ack(m)
            self._waiting.extend(made)
            self._run_wake.set()

    async def run_loop(self) -> None:
        while True:
            while not self._waiting:
                await self._run_wake.wait()
                self._run_wake.clear()
            entry = self._waiting[0]
            crashpoint("updates.command.before_run")  # fault tests: recorded, acked, not run
            ref, outcome = await self._run(entry)
            # Done in memory at once (a copy arriving now is a replay), then on disk, then said.
            self._waiting.popleft()
            self._in_hand.discard(entry.id)
            self._done_ids.add(entry.id)
            self._stats.commands_run += 1
            summary = outcome.kind if outcome.reason is None else outcome.reason.value
            try:
                await asyncio.to_thread(self.journal.done, entry.id, f"{summary}: {outcome.detail}")
            except StateError as exc:  # it would run again after a restart
                log.error("cannot mark a command done: %s", log_text(str(exc)))
            self._events.report(outcome.kind, reason=outcome.reason, detail=outcome.detail, ref=ref)

    async def _run(self, entry: Entry) -> tuple[str, _Outcome]:
        """Run a recorded command (verified when received): its id and what came of it."""
        command = decode_document(decode_envelope(entry.payload), Command)
        if entry.expires_at <= self._clock():
            detail = f"expired at {entry.expires_at:.0f} before its turn came"
            return command.id, _Outcome("command_rejected", Reason.EXPIRED, detail)
        handler = self._handlers.get(command.name)
        if handler is None:
            detail = f"this node does not do {command.name}"
            return command.id, _Outcome("command_rejected", Reason.UNSUPPORTED_COMMAND, detail)
        try:
            outcome = handler(command.args)
            if asyncio.iscoroutine(outcome):
                outcome = await outcome
        except Exception as exc:  # a handler's failure is the command's outcome, not ours
            detail = f"{command.name}: {type(exc).__name__}: {exc}"
            return command.id, _Outcome("command_rejected", Reason.COMMAND_FAILED, detail)
        return command.id, _Outcome("command_done", None, f"{command.name}: {outcome}")
