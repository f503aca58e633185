"""The node's retained status: its degradation reasons, said on every connection that can.

The status (``edge/{node}/status``, retained) is ``online``, or ``degraded`` with the reasons,
or ``offline`` (the will, or a clean stop). A connection carries it in one of two ways:

- it *vouches* for the node: its subscription is what the status speaks for and its will says
  ``offline`` when it drops. Every change of reason, every connect and the stop are said on it;
- it *also says* some reasons: a connection to the same broker that does not vouch, but that a
  reason concerns. ``client_id_conflict`` is said on every connection that can, since the
  connection that vouches may be the one another process took over
  (docs/adr/0073-client-id-conflict.md). Such a connection says the status when one of those
  reasons changes, and when it connects while one of them holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from edgewise.mqtt import MqttError, MqttSession
from edgewise.serving.model import ServedModel
from schemas import Status, encode_status

log = logging.getLogger(__name__)

State = Literal["online", "offline", "degraded"]


@dataclass(frozen=True, slots=True)
class StatusLink:
    """One connection that can carry the status, and when it does."""

    session: MqttSession
    vouches: bool
    also_says: frozenset[str] = frozenset()

    def says(self, reason: str) -> bool:
        return self.vouches or reason in self.also_says


class NodeStatus:
    """The degradation reasons and the retained status they make, on every status link."""

    def __init__(
        self,
        *,
        node_id: str,
        topic: str,
        boot_id: str,
        hardware_class: str,
        model: Callable[[], ServedModel | None],
        configured_model: tuple[str, int],
    ) -> None:
        self._node_id = node_id
        self.topic = topic
        self._boot_id = boot_id
        self._hardware_class = hardware_class
        self._model = model
        self._configured_model = configured_model
        self.reasons: list[str] = []
        self._links: list[StatusLink] = []

    @property
    def state(self) -> State:
        return "degraded" if self.reasons else "online"

    def link(self, session: MqttSession, *, vouches: bool, also_says: frozenset[str]) -> None:
        """``session`` carries the status: always if it vouches, else for ``also_says``."""
        self._links.append(StatusLink(session, vouches, also_says))

    @property
    def vouching(self) -> list[MqttSession]:
        """The connections whose status is the node's (each has a will saying offline)."""
        return [link.session for link in self._links if link.vouches]

    def payload(self, state: State, reasons: list[str]) -> bytes:
        m = self._model()
        name, release = self._configured_model
        return encode_status(
            Status(
                node=self._node_id,
                state=state,
                ts=time.time(),
                reasons=reasons,
                model=m.name if m else name,
                release=m.release if m else release,
                runtime=m.runtime.name if m else None,
                provider=m.runtime.provider if m else None,
                hardware_class=self._hardware_class,
                boot_id=self._boot_id,
            )
        )

    def set(self, reason: str, present: bool, *, says_itself: MqttSession | None = None) -> None:
        """Add or clear a degradation reason; say so on the retained status when it changes,
        on every link that says it (except ``says_itself``: one connecting, which says the
        status in its own on-connect)."""
        if (reason in self.reasons) == present:
            return
        if present:
            self.reasons.append(reason)
            log.warning("degraded: %s", reason)
        else:
            self.reasons.remove(reason)
            log.info("recovered: %s", reason)
        for link in self._links:
            if link.says(reason) and link.session is not says_itself:
                self.publish(link.session)

    def republish(self) -> None:
        """Say the status again on every vouching link (what it shows changed, not the reasons)."""
        for session in self.vouching:
            self.publish(session)

    async def connected(self, session: MqttSession) -> None:
        """A link's connection is up: it says the status if it says any reason that holds."""
        for link in self._links:
            if link.session is session and (
                link.vouches or any(r in link.also_says for r in self.reasons)
            ):
                await session.publish(
                    self.topic, self.payload(self.state, self.reasons), retain=True
                )

    def publish(self, session: MqttSession) -> None:
        if not session.connected:
            return  # said on the next connect
        fut = session.publish_nowait(
            self.topic, self.payload(self.state, self.reasons), retain=True
        )
        fut.add_done_callback(lambda f: f.exception())

    async def say_offline(self, reason: str) -> None:
        """A clean stop: ``offline`` on every vouching link that is up (2 s each at most)."""
        offline = self.payload("offline", [reason])
        for session in self.vouching:
            if session.connected:
                with contextlib.suppress(MqttError, TimeoutError):
                    async with asyncio.timeout(2.0):
                        await session.publish(self.topic, offline, retain=True)
