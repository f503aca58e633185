"""Intake: sensor frames in, checked, deduplicated and handed to the batcher, within bounds.

Per message: parse the topic, decode and validate the frames (size cap first), check each fits
the model, then hand it to the batcher (``to_inference``) unless a copy of it is being answered
already (the copy is acknowledged with it). A frame that may have been answered before (a
redelivery, or a key the answered filter knows) is marked ``check``: the result path looks it
up before answering. Anything that breaks the contract is dead-lettered and acknowledged at
once. While the node holds as many frames (or bytes) as it may, the frames' connection stops
reading (docs/adr/0076-intake-bounds.md).

:class:`FramesInHand` is the bookkeeping of frames received and not yet acknowledged: every
part of the node settles a frame through it (finish: acknowledge; forget: leave it to the
broker's redelivery; reject: dead-letter).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from edge_node.deadletter import DeadLetters
from edge_node.stats import NodeStats
from edgewise.mqtt import Inbound, MqttSession
from edgewise.serving.acks import InOrderAcker, Ticket
from edgewise.serving.batcher import MicroBatcher
from edgewise.serving.model import ServedModel
from schemas import ContractError, DeadLetterReason, Frame, Limits, Topics, decode_frames

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Pending:
    """A frame in hand, from receipt until it is settled."""

    ticket: Ticket
    device: str
    sensor: str
    frame: Frame
    key: str
    """What identifies the frame across redeliveries: where it came from and its seq/ts."""
    check: bool = False
    """It may have been answered already: look it up before answering it."""
    finished: bool = False
    """Its part of the ticket is done: finishing it again must not count another part."""


def frame_key(topic: str, frame: Frame, digest: str, index: int | None = None) -> str:
    # seq and ts alone repeat when a sensor without a clock restarts its counter; the payload's
    # digest keeps such a new frame from being taken for an answered one. A frame of a batch
    # adds its index in the message.
    key = f"{topic}\x00{frame.seq}\x00{frame.ts!r}\x00{digest}"
    return key if index is None else f"{key}\x00{index}"


class FramesInHand:
    """Frames received and not acknowledged yet, and the bound on how many the node holds."""

    def __init__(
        self,
        session: MqttSession,
        acker: InOrderAcker,
        stats: NodeStats,
        deadletters: DeadLetters,
        *,
        max_pending_frames: int,
        max_pending_bytes: int,
    ) -> None:
        self._session = session
        self._acker = acker
        self._stats = stats
        self._deadletters = deadletters
        self.max_pending = max_pending_frames
        self._max_pending_bytes = max_pending_bytes
        self.in_progress: dict[str, list[Ticket]] = {}
        """Frames being answered, by key -> copies that came meanwhile, acknowledged with them."""

    def held(self) -> int:
        """Frames the node holds in memory: received and not yet acknowledged, whether they
        wait for inference, for their results to be stored, or behind an earlier frame's
        acknowledgement (QoS 0 frames: until they are answered). Counting only those waiting
        for inference let frames pile up behind a slow commit once reading kept pace."""
        return max(len(self.in_progress), self._acker.outstanding)

    def over_bound(self) -> bool:
        return self.held() >= self.max_pending or self._acker.held_bytes >= self._max_pending_bytes

    def resume_if_drained(self) -> None:
        if (
            self._session.reading_paused
            and self.held() <= self.max_pending // 2
            and self._acker.held_bytes <= self._max_pending_bytes // 2
        ):
            self._session.resume_reading()

    def reject(self, msg: Inbound, reason: DeadLetterReason, detail: str) -> None:
        """Count and dead-letter ``msg`` (the caller acknowledges it)."""
        self._stats.rejects[reason] += 1
        self._deadletters.reject(msg.topic, msg.payload, reason, detail)

    def finish(self, batch: list[Pending]) -> None:
        """These frames are done (answered, stored or rejected): acknowledge them and any
        redelivered copies that arrived meanwhile."""
        tickets: list[Ticket] = []
        for p in batch:
            if p.finished:
                continue
            p.finished = True
            tickets.append(p.ticket)
            tickets.extend(self.in_progress.pop(p.key, ()))
        self._acker.finish_all(tickets)
        self.resume_if_drained()

    def forget(self, batch: list[Pending]) -> None:
        """These frames stay unacknowledged (the broker redelivers them): drop their state."""
        for p in batch:
            self.in_progress.pop(p.key, None)
        self.resume_if_drained()

    def taken_over(self, batch: list[Pending]) -> tuple[list[Pending], list[Pending]]:
        """Split off the QoS 1 frames whose connection another process took over with our
        client id: the broker redelivers them to that process, which answers them; answering
        them here too would give each a second result id."""
        session = self._session
        if not session.lost_any_to_takeover:
            return batch, []
        kept: list[Pending] = []
        lost: list[Pending] = []
        for p in batch:
            m = p.ticket.message
            (lost if m.qos and session.lost_to_takeover(m.connection) else kept).append(p)
        self._stats.frames_left_to_other += len(lost)
        return kept, lost


class Intake:
    """The frames' connection's ``on_message``: each frame checked, then to the batcher."""

    def __init__(
        self,
        session: MqttSession,
        topics: Topics,
        limits: Limits,
        acker: InOrderAcker,
        frames: FramesInHand,
        stats: NodeStats,
        *,
        model: Callable[[], ServedModel],
        maybe_answered: Callable[[str], bool],
        to_inference: MicroBatcher[Pending],
    ) -> None:
        self._session = session
        self._topics = topics
        self._limits = limits
        self._acker = acker
        self._frames = frames
        self._stats = stats
        self._model = model
        self._maybe_answered = maybe_answered
        self._to_inference = to_inference
        self.draining = False
        """Set by the node's drain: frames that come from then on are left to the broker."""

    def on_message(self, msg: Inbound) -> None:
        if self.draining:
            self._stats.frames_ignored_draining += 1
            return
        if self._session.giving_way:  # another process with this node id has them (ADR 0073)
            self._stats.frames_left_to_other += 1
            return
        self._stats.frames_in += 1
        ticket = self._acker.track(msg)
        try:
            device, sensor = self._topics.parse_sensor(msg.topic)
            frames = decode_frames(msg.payload, self._limits)
        except ContractError as exc:
            self._frames.reject(msg, exc.reason, exc.detail)
            self._acker.finish(ticket)
            return
        except Exception as exc:  # a bug must not hold back every later acknowledgement
            log.exception("unexpected error on a frame from %r", msg.topic[:128])
            self._frames.reject(msg, "internal_error", f"{type(exc).__name__}: {exc}")
            self._acker.finish(ticket)
            return
        digest = hashlib.blake2b(msg.payload, digest_size=8).hexdigest()
        if len(frames) == 1:
            key = frame_key(msg.topic, frames[0], digest)
            self._take(msg, ticket, device, sensor, frames[0], key)
        else:  # a batch: the message is acknowledged once every frame in it is done
            self._stats.frames_in += len(frames) - 1
            ticket.parts = len(frames)
            for i, frame in enumerate(frames):
                key = frame_key(msg.topic, frame, digest, i)
                self._take(msg, ticket, device, sensor, frame, key, index=i)
        if self._frames.over_bound():
            # The last resort (ADR 0076): Mosquitto before 2.0.13 lets one PUBACK release a
            # whole Receive Maximum of messages, so the broker's window bounds nothing there.
            # Only this connection waits: it carries frames and their acknowledgements out.
            self._session.pause_reading()

    def _take(
        self,
        msg: Inbound,
        ticket: Ticket,
        device: str,
        sensor: str,
        frame: Frame,
        key: str,
        *,
        index: int | None = None,
    ) -> None:
        """Check one frame against the model and queue it for inference."""
        try:
            self._model().check(frame.tensor)
        except Exception as exc:
            where = "" if index is None else f"frame {index} (seq {frame.seq}): "
            if isinstance(exc, ContractError):
                self._frames.reject(msg, exc.reason, where + exc.detail)
            else:  # a bug must not hold back every later acknowledgement
                log.exception("unexpected error on a frame from %r", msg.topic[:128])
                self._frames.reject(msg, "internal_error", f"{where}{type(exc).__name__}: {exc}")
            self._acker.finish(ticket)
            return
        in_progress = self._frames.in_progress
        waiting = in_progress.get(key)
        if waiting is not None:
            # A copy of a frame still being answered (DUP flag or not): acknowledged with it.
            waiting.append(ticket)
            return
        in_progress[key] = []
        check = msg.dup or self._maybe_answered(key)
        self._to_inference.add(Pending(ticket, device, sensor, frame, key, check))
