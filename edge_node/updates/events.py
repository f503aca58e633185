"""Update events: every step, verdict and command outcome reported (retained, QoS 1).

Handed to the node's outbox when it gives a ``publish_event``; otherwise queued (the last 256)
and published on the updater's own session whenever it is connected.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from edgewise.mqtt import MqttSession
from edgewise.releases import Reason, UpdateEvent, encode_event
from edgewise.releases.events import EventKind
from schemas import Topics, log_text, new_id

log = logging.getLogger(__name__)


class UpdateEvents:
    def __init__(
        self,
        *,
        node_id: str,
        model_name: str,
        topics: Topics,
        session: MqttSession,
        running: Callable[[], int],
        clock: Callable[[], float],
        publish_event: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self._node_id = node_id
        self._model_name = model_name
        self._topics = topics
        self._session = session
        self._running = running
        self._clock = clock
        self._publish_event = publish_event
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=256)
        self.kinds: list[str] = []
        """Every event kind reported, in order (``kind`` or ``kind:reason``)."""

    def report(
        self,
        kind: EventKind,
        *,
        release: int | None = None,
        reason: Reason | None = None,
        detail: str = "",
        ref: str | None = None,
        running: int | None = None,
        quiet: bool = False,
    ) -> None:
        """Report an event (``quiet``: its log line was written already, rate-capped)."""
        if running is None:
            running = self._running()
        event = UpdateEvent(
            id=new_id(),
            node=self._node_id,
            ts=self._clock(),
            kind=kind,
            model=self._model_name,
            release=release,
            running_release=running,
            reason=reason.value if reason else None,
            detail=detail[:1024],
            ref=ref,
        )
        self.kinds.append(kind if reason is None else f"{kind}:{reason.value}")
        if not quiet:
            log.info(
                "update event %s release=%s reason=%s %s", kind, release, reason, log_text(detail)
            )
        topic, payload = self._topics.events(self._node_id), encode_event(event)
        if self._publish_event is not None:
            self._publish_event(topic, payload)
            return
        self._queue.append((topic, payload))
        self.flush()

    def flush(self) -> None:
        """Publish the queued events while the session is connected."""
        session = self._session
        while self._queue and session.connected:
            topic, payload = self._queue[0]
            fut = session.publish_nowait(topic, payload, qos=1, retain=True)
            if fut.done() and fut.exception() is not None:
                return  # not connected after all: kept for the next connect
            self._queue.popleft()
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
