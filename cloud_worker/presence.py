"""A worker's retained presence on ``{cloud_root}/workers/{worker_id}/status``.

The node's :class:`~schemas.Status` schema (``node`` = the worker id, ``runtime = "worker"``):
``online`` while connected and taking escalations; ``degraded`` with its reasons while it
serves but something is wrong (``client_id_conflict``: another process connects with this
worker's client id, docs/adr/0080-worker-status.md); ``offline`` with reason ``shutdown`` when
it stops, and, as its MQTT will, ``connection_lost``. Nodes count every state but ``offline``
as a worker that answers (docs/adr/0074-cloud-availability.md): a degraded worker is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from edgewise.mqtt import MqttError, MqttSession, Will
from schemas import State, Status, encode_status

log = logging.getLogger(__name__)


class Presence:
    """Says, retained, how the worker stands; :meth:`refresh` says it again when that
    changes (every call is cheap: a comparison)."""

    def __init__(self, topic: str, worker_id: str, boot_id: str) -> None:
        self.topic = topic
        self.worker_id = worker_id
        self.boot_id = boot_id
        self.session: MqttSession | None = None
        self.quiet = False
        """Set once the worker drains: it says nothing but ``offline`` any more."""
        self._said: tuple[str, ...] | None = None
        """The reasons last said (None: nothing said yet; every connect says it again)."""

    def will(self) -> Will:
        return Will(self.topic, self.payload("offline", ["connection_lost"]))

    def payload(self, state: State, reasons: list[str]) -> bytes:
        return encode_status(
            Status(
                node=self.worker_id,
                state=state,
                ts=time.time(),
                reasons=reasons,
                runtime="worker",
                boot_id=self.boot_id,
            )
        )

    def reasons(self) -> list[str]:
        """Why the worker is degraded (empty: it is not)."""
        session = self.session
        if session is not None and session.client_id_conflict:
            return ["client_id_conflict"]  # another process runs with this id (ADR 0073)
        return []

    def state(self) -> State:
        return "degraded" if self.reasons() else "online"

    def announce(self) -> None:
        """Say ``online`` (or ``degraded`` and why) now, on the live connection."""
        session = self.session
        if self.quiet or session is None:
            return
        reasons = self.reasons()
        self._said = tuple(reasons)
        # Not awaited: a broker that refuses it (an ACL without the presence topic) must not
        # keep the worker from serving; nodes then go by replies alone.
        fut = session.publish_nowait(
            self.topic, self.payload("degraded" if reasons else "online", reasons), qos=1,
            retain=True,
        )  # fmt: skip
        fut.add_done_callback(self._sent)

    def refresh(self) -> None:
        """Say it again if the reasons changed since it was last said on this connection."""
        session = self.session
        if session is None or not session.connected or self._said is None:
            return
        if tuple(self.reasons()) != self._said:
            self.announce()

    def _sent(self, fut: asyncio.Future[None]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            log.warning("presence on %s not published: %s", self.topic, exc)

    async def say_offline(self) -> None:
        """Retained ``offline``: nodes stop waiting for this worker at once (a clean
        DISCONNECT discards the will, so it is said here)."""
        self.quiet = True
        session = self.session
        if session is None or not session.connected:
            return
        fut = session.publish_nowait(
            self.topic, self.payload("offline", ["shutdown"]), qos=1, retain=True
        )
        with contextlib.suppress(MqttError, TimeoutError):
            async with asyncio.timeout(2.0):
                await fut
