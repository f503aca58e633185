"""The reconnect machine: one connection kept up, with capped, jittered retries.

:class:`Reconnector` runs a session's connections one after another until it closes: it waits
out the backoff schedule between attempts (:mod:`edgewise.mqtt.backoff`, ADR 0077), falls
back from MQTT 5 to 3.1.1 where the broker refuses or ignores 5 (``protocol = "auto"``), and
hears from the takeover guard (:mod:`edgewise.mqtt.takeover`, ADR 0073) when another
connection took the client id, or when the service gives way to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from edgewise.mqtt.connection import ClosedAfterConnack, ClosedBeforeConnack
from edgewise.mqtt.errors import ConnectFailed, Disconnected, MqttError, NoConnack, ProtocolRefused

if TYPE_CHECKING:
    from edgewise.mqtt.session import MqttSession

log = logging.getLogger("edgewise.mqtt.session")
"""The session's logger: these lines are the session's, wherever the code lives."""


class Reconnector:
    """Keeps a session connected (:meth:`run`, its background task)."""

    def __init__(self, session: MqttSession) -> None:
        self.s = session
        self.protocol_on_trial = False
        self.trial_spent = False
        """An MQTT 3.1.1 trial after a close before CONNACK failed in this outage: no more."""
        self.farewell = False
        """The service gave way while this session was down: it connects once to say so."""
        self.taken_over: set[int] = set()
        """Numbers of the connections another connection took over (the last few)."""
        self.up_since = 0.0
        """``time.monotonic()`` when the current (or last) connection came up."""
        self.failure_waiter: asyncio.Future[BaseException] | None = None
        """Told of the next failed connect attempt (:meth:`wait_connected_or_failed`)."""

    async def wait_connected_or_failed(self, timeout_s: float | None) -> None:
        """The session's :meth:`~edgewise.mqtt.session.MqttSession.wait_connected_or_failed`."""
        s = self.s
        if s._connected.is_set():
            return
        assert s._loop is not None, "use the session inside 'async with'"
        failed: asyncio.Future[BaseException] = s._loop.create_future()
        self.failure_waiter = failed
        connected = asyncio.ensure_future(s._connected.wait())
        either: list[asyncio.Future[Any]] = [failed, connected]
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            connected.cancel()
            self.failure_waiter = None
        if s._connected.is_set():
            return
        exc = failed.result()
        code = exc.reason_code if isinstance(exc, ConnectFailed) else None
        raise ConnectFailed(str(exc) or type(exc).__name__, reason_code=code) from exc

    async def run(self) -> None:
        s = self.s
        while not s._stopping:
            pause = s._takeover.shared.pause_left_s()
            # The service gave way to another with its client ids (ADR 0073); a session that
            # speaks for it connects once more first, to say so (its on_connect hook).
            farewell, self.farewell = self.farewell and pause > 0, False
            if pause > 0 and not farewell:
                await asyncio.sleep(pause)
                continue
            try:
                info = await s._connector.connect_once()
            except ProtocolRefused as exc:
                s.known_down_at = time.monotonic()
                s._driver.close()
                if s.config.protocol == "auto" and s._protocol == "5":
                    log.warning("broker refused MQTT 5 (%s); falling back to MQTT 3.1.1", exc)
                    s._protocol = "3.1.1"
                    continue
                self._end_protocol_trial()
                await self._after_failure(exc)
                continue
            except NoConnack as exc:
                s.known_down_at = time.monotonic()
                s._driver.close()
                auto5 = s.config.protocol == "auto" and s._protocol == "5"
                if auto5 and not isinstance(exc, ClosedBeforeConnack):
                    # Silence to an MQTT 5 CONNECT (for connect_timeout_s) may mean a 3.1.1-only
                    # broker: try that at once, and keep it only if it works.
                    log.warning("no answer to an MQTT 5 CONNECT; trying MQTT 3.1.1")
                    s._protocol = "3.1.1"
                    self.protocol_on_trial = True
                    continue
                if auto5 and not self.trial_spent:
                    # Closed after our MQTT 5 CONNECT without a CONNACK: a broker that does not
                    # speak 5 may do that, but so does a broker going down, or a proxy whose
                    # broker is away. The next attempt, at its ordinary time (no extra
                    # connect), tries MQTT 3.1.1, once an outage (ADR 0077).
                    s._protocol = "3.1.1"
                    self.protocol_on_trial = True
                    await self._after_failure(exc, next_try="MQTT 3.1.1")
                    continue
                self._end_protocol_trial()
                await self._after_failure(exc)
                continue
            except (ConnectFailed, OSError, TimeoutError) as exc:
                s.known_down_at = time.monotonic()
                s._driver.close()
                self._end_protocol_trial()
                await self._after_failure(exc)
                continue
            self.protocol_on_trial = False  # MQTT 3.1.1 on trial worked: keep it
            self.trial_spent = False
            self.up_since = time.monotonic()
            s._takeover.connected()
            s.stats.connects += 1
            if s.stats.connects > 1:
                s.stats.reconnects += 1
            s.last_error = None
            log.info(
                "connected to %s:%d as %s (MQTT %s, session present: %s)",
                s.config.host,
                s.config.port,
                s.client_id,
                info.protocol,
                info.session_present,
            )
            try:
                await s._after_connect(info)
            except MqttError as exc:
                log.warning("connection dropped while setting up: %s", exc)
            if s._takeover.shared.pause_left_s() > 0:
                self.give_way()  # said what it had to (or connected as the service gave way)
            await s._lost.wait()
            s.known_down_at = time.monotonic()
            lived = s.known_down_at - self.up_since
            s._connected.clear()
            s._acks.fail_all(Disconnected("connection lost"))
            s._driver.close()
            if not s._stopping:
                why = s._connector.end_reason or "connection lost"
                taken = self._takeover_delay()
                if taken is None and s._takeover.shared.pause_left_s() > 0:
                    continue  # this one gave way: the loop's top waits the pause out
                if taken is None:
                    s.last_error = why
                    if lived >= s.config.reconnect_reset_after_s:
                        s._backoff.reset()  # a fresh outage; else the last one goes on
                    delay = s._backoff.next_delay_s()
                    log.warning(
                        "connection to %s:%d ended after %.1f s: %s; reconnecting in %.2f s",
                        s.config.host,
                        s.config.port,
                        lived,
                        why,
                        delay,
                    )
                else:
                    delay = taken  # the guard said why
                await asyncio.sleep(delay)

    def _end_protocol_trial(self) -> None:
        """MQTT 3.1.1 on trial failed too: the broker was just down, so speak MQTT 5 again
        (and try no more MQTT 3.1.1 after a close until a connection has been made)."""
        if self.protocol_on_trial:
            self.s._protocol = "5"
            self.protocol_on_trial = False
            self.trial_spent = True

    def give_way(self) -> None:
        """The service stops fighting for its client ids: leave the broker, cleanly (no will,
        and no takeover for the other process)."""
        s = self.s
        client = s._client
        if client is None or not s._connected.is_set() or s._stopping:
            self.farewell = s._announce_conflict and not s._stopping
            return
        log.info("client id %r gives way to the other connection", s.client_id)
        if s._announce_conflict and s._on_takeover is not None and not s._lost.is_set():
            # The session that speaks for the service says why first: what its hook publishes
            # is queued before the DISCONNECT and written with it (another connection's
            # takeover may have been the last straw, so its hook has not run here yet).
            try:
                s._on_takeover(s._connection)
            except Exception:
                log.exception("takeover hook failed")
        self.taken_over.add(s._connection)  # what it holds goes to the other process
        client.disconnect()
        with contextlib.suppress(Exception):
            client.loop_write()  # the DISCONNECT, now

    def _takeover_delay(self) -> float | None:
        """The lost connection was taken over: how long to wait (the guard logs it)."""
        s = self.s
        delay = s._takeover.lost(
            server_reason=s._connector.server_reason, peer_closed=s._connector.peer_closed
        )
        if delay is None:
            return None
        s.stats.takeovers = s._takeover.total
        self.taken_over.add(s._connection)
        self.taken_over.discard(s._connection - 64)
        s.last_error = f"client id {s.client_id!r} taken over by another connection"
        if s._on_takeover is not None:
            try:
                s._on_takeover(s._connection)
            except Exception:
                log.exception("takeover hook failed")
        return delay

    def closed_after_connack(self) -> ConnectFailed:
        """The broker accepted the connection and closed it at once: another connection with
        our client id may have come in between (a takeover the guard must see too)."""
        s = self.s
        s._takeover.connected()
        exc = ClosedAfterConnack(s.last_error or "connection closed right after CONNACK")
        exc.takeover_delay = self._takeover_delay()
        return exc

    async def _after_failure(self, exc: BaseException, *, next_try: str = "") -> None:
        """Count and log a failed attempt, and wait for the next one (``next_try``: what it
        tries differently; a command waiting for the outcome hears of that one instead)."""
        s = self.s
        taken = exc.takeover_delay if isinstance(exc, ClosedAfterConnack) else None
        if not isinstance(exc, ClosedAfterConnack):
            s._takeover.connect_failed()  # the broker was away: no takeover streak
        s.stats.connect_failures += 1
        s.last_error = str(exc) or type(exc).__name__
        waiter = self.failure_waiter
        if waiter is not None and not waiter.done() and not next_try:
            waiter.set_result(exc)
        if taken is not None:
            await asyncio.sleep(taken)  # the guard said why
            return
        delay = s._backoff.next_delay_s()
        log.warning(
            "cannot connect to %s:%d (%s); retrying%s in %.2f s",
            s.config.host,
            s.config.port,
            s.last_error,
            f" with {next_try}" if next_try else "",
            delay,
        )
        await asyncio.sleep(delay)
