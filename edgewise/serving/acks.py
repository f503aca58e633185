"""Acknowledge received QoS 1 messages in arrival order, once each is finished.

MQTT requires PUBACKs in the order the PUBLISH packets arrived. A frame is finished when its
result has been acknowledged upstream, or at once when it is rejected; a finished frame behind an
unfinished one waits. Messages from a connection that has since dropped are forgotten: the broker
redelivers them on the next connection (persistent session).
"""

from __future__ import annotations

import logging
from collections import deque

from edgewise.mqtt import Inbound, MqttSession

log = logging.getLogger(__name__)


class Ticket:
    """One received message. A message holding several frames (a batch) is finished once each
    of its ``parts`` is: :meth:`InOrderAcker.finish` is called once per part."""

    __slots__ = ("done", "message", "parts")

    def __init__(self, message: Inbound, parts: int = 1) -> None:
        self.message = message
        self.parts = parts
        self.done = False

    def finish_part(self) -> bool:
        """One part is done; True if that made the whole message done (once only)."""
        self.parts -= 1
        if self.parts <= 0 and not self.done:
            self.done = True
            return True
        return False


class InOrderAcker:
    def __init__(self, session: MqttSession) -> None:
        self._session = session
        self._queue: deque[Ticket] = deque()
        self.acked = 0
        self.ack_errors = 0
        self.held_bytes = 0
        """Payload bytes of the messages tracked and not yet let go of: QoS 1 ones until they
        are acknowledged (or dropped with their connection), QoS 0 ones until finished."""

    def track(self, message: Inbound) -> Ticket:
        ticket = Ticket(message)
        self.held_bytes += len(message.payload)
        if message.qos > 0:
            self._queue.append(ticket)
        return ticket

    def finish(self, ticket: Ticket) -> None:
        """One part of ``ticket`` is done (for a single frame: the whole message)."""
        if ticket.finish_part() and ticket.message.qos == 0:
            self.held_bytes -= len(ticket.message.payload)
        self._flush()

    def finish_all(self, tickets: list[Ticket]) -> None:
        """One part of each (a ticket listed twice: two parts)."""
        for t in tickets:
            if t.finish_part() and t.message.qos == 0:
                self.held_bytes -= len(t.message.payload)
        self._flush()

    @property
    def head(self) -> Ticket | None:
        """The oldest ticket not yet acknowledged (it holds back every later one)."""
        return self._queue[0] if self._queue else None

    @property
    def outstanding(self) -> int:
        return len(self._queue)

    def _flush(self) -> None:
        q = self._queue
        current = self._session.connection
        while q and (q[0].done or q[0].message.connection != current):
            t = q.popleft()
            self.held_bytes -= len(t.message.payload)
            if t.message.connection == current:
                try:
                    self._session.ack(t.message)
                except Exception as exc:  # never stop acknowledging the ones behind it
                    self.ack_errors += 1
                    log.error("acknowledging message %d failed: %s", t.message.mid, exc)
                    continue
                self.acked += 1
