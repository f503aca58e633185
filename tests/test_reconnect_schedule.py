"""The reconnect schedule (ADR 0077): fast while an outage is young, polite once it is old; one
TCP connect per attempt, an MQTT 3.1.1 try only after a broker answered or closed an MQTT 5
CONNECT; the log line that says why a connection ended.

The schedule itself is checked on a simulated clock (every delay the schedule draws, over an hour
of outage, for hundreds of seeds): counts of attempts per window, no wall-clock timing. Against
sockets, the tests count TCP connections and attempts, and read the delays the session drew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import statistics
import threading
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import pytest

from edgewise.local_broker import BrokerInfo, TcpProxy, free_port
from edgewise.mqtt import Backoff, MqttConfig, MqttSession
from tests.conftest import BrokerFactory
from tests.waiting import eventually

SCENARIO_TIMEOUT_S = 60.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _outage(backoff: Backoff, clock: FakeClock, seconds: float) -> list[float]:
    """The attempts (seconds after the loss) of an outage lasting ``seconds``, each attempt
    failing at once: the session draws a delay at the loss and after every failed attempt."""
    start, times = clock.now, list[float]()
    while True:
        clock.now += backoff.next_delay_s()
        if clock.now - start > seconds:
            return times
        times.append(clock.now - start)


def _most_in_a_window(times: list[float], window_s: float, since_s: float) -> int:
    """The most attempts in any ``window_s`` (half open) starting at or after ``since_s``."""
    after = [t for t in times if t >= since_s]
    most, j = 0, 0
    for i, t in enumerate(after):
        while j < len(after) and after[j] < t + window_s:
            j += 1
        most = max(most, j - i)
    return most


# -- the schedule, on a simulated clock -------------------------------------------------------
def test_a_broker_back_within_the_first_minute_is_tried_again_within_2s() -> None:
    """Defaults: the first retry within 0.5 s of the loss, and while the outage is younger than
    62 s no wait longer than 2 s, so whenever the broker comes back in the first minute (and
    the 2 s after it, for its start-up) an attempt follows within 2 s."""
    config = MqttConfig()
    assert config.reconnect_fast_for_s >= 62.0
    for seed in range(300):
        clock = FakeClock()
        times = _outage(Backoff.of(config, rng=random.Random(seed), clock=clock), clock, 120.0)
        assert times[0] <= config.reconnect_first_s
        for before, after in zip([0.0, *times], times, strict=False):
            if before < config.reconnect_fast_for_s:
                assert after - before <= config.reconnect_fast_cap_s, (seed, before, after)
        back = 60.0 + random.Random(-seed).uniform(0.0, 2.0)  # a broker back after 60 s
        assert min(t for t in times if t >= back) - back <= config.reconnect_fast_cap_s


def test_a_long_outage_gets_at_most_12_attempts_a_minute() -> None:
    """Defaults, an hour of outage, 300 seeds: after the first minute, no 60 s window holds more
    than 12 attempts, and the first 12 delays after the first minute add up to 60 s or more."""
    config = MqttConfig()
    most = 0
    for seed in range(300):
        clock = FakeClock()
        backoff = Backoff.of(config, rng=random.Random(seed), clock=clock)
        times = _outage(backoff, clock, 3600.0)
        most = max(most, _most_in_a_window(times, 60.0, 60.0))
        later = [t for t in times if t >= 60.0]
        assert later[12] - later[0] >= 60.0, seed
    assert most <= 12
    # The first minute is where the attempts are (fast), and then the count drops.
    clock = FakeClock()
    times = _outage(Backoff.of(config, rng=random.Random(1), clock=clock), clock, 3600.0)
    first_minute = sum(t < 60.0 for t in times)
    assert first_minute > 24
    assert len(times) - first_minute < 12 * 59


def test_delays_are_spread_over_half_to_the_whole_ceiling() -> None:
    """Equal jitter: at a given point of the schedule the delays spread evenly over
    [ceiling / 2, ceiling] (a fleet that lost its broker together comes back spread out, and
    never faster than half the ceiling)."""
    config = MqttConfig()
    n = 4000
    for ceiling, age_s in ((config.reconnect_first_s, 0.0), (config.reconnect_cap_s, 600.0)):
        rng = random.Random(12345)
        draws: list[float] = []
        for _ in range(n):
            clock = FakeClock()
            backoff = Backoff.of(config, rng=rng, clock=clock)
            backoff.outage_since = clock.now - age_s if age_s else None
            draws.append(backoff.next_delay_s())
        low, high = ceiling / 2, ceiling
        assert all(low <= d <= high for d in draws)
        assert statistics.fmean(draws) == pytest.approx((low + high) / 2, rel=0.03)
        width = (high - low) / 10
        buckets = [0] * 10
        for d in draws:
            buckets[min(int((d - low) / width), 9)] += 1
        assert all(0.08 * n <= count <= 0.12 * n for count in buckets), buckets
    a, b = Backoff.of(config), Backoff.of(config)
    assert [a.next_delay_s() for _ in range(5)] != [b.next_delay_s() for _ in range(5)]


def test_reset_starts_a_new_outage_and_without_it_the_old_one_goes_on() -> None:
    config = MqttConfig()
    clock = FakeClock()
    backoff = Backoff.of(config, rng=random.Random(3), clock=clock)
    _outage(backoff, clock, 300.0)
    assert backoff.ceiling_s() == config.reconnect_cap_s  # an old outage: polite
    assert backoff.next_delay_s() >= config.reconnect_cap_s / 2
    backoff.reset()
    assert backoff.next_delay_s() <= config.reconnect_first_s


def test_any_allowed_config_retries_first_within_2s_and_never_beyond_its_cap() -> None:
    slowest = MqttConfig(reconnect_first_s=2.0, reconnect_fast_cap_s=60.0, reconnect_cap_s=60.0)
    quick = MqttConfig(reconnect_first_s=0.1, reconnect_cap_s=0.5)  # as the tests use
    for seed in range(300):
        clock = FakeClock()
        times = _outage(Backoff.of(slowest, rng=random.Random(seed), clock=clock), clock, 900.0)
        assert 1.0 <= times[0] <= 2.0
        gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
        assert max(gaps) <= 60.0
        clock = FakeClock()
        times = _outage(Backoff.of(quick, rng=random.Random(seed), clock=clock), clock, 120.0)
        gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
        assert min(gaps) >= 0.05 and max(gaps) <= 0.5  # a cap below the fast cap wins
    with pytest.raises(ValueError, match="reconnect_first_s"):
        MqttConfig(reconnect_first_s=2.5)
    with pytest.raises(ValueError, match="reconnect_cap_s"):
        MqttConfig(reconnect_first_s=2.0, reconnect_cap_s=1.0)
    with pytest.raises(ValueError, match="reconnect_cap_s"):
        MqttConfig(reconnect_cap_s=61)


# -- against sockets: one TCP connect per attempt ---------------------------------------------
def _quick(port: int, **overrides: Any) -> MqttConfig:
    """The default schedule scaled down 20 times: fast for 3 s, then waits of 0.25..0.5 s."""
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "connect_timeout_s": 5.0,
        "reconnect_first_s": 0.025,
        "reconnect_fast_cap_s": 0.1,
        "reconnect_fast_for_s": 3.0,
        "reconnect_cap_s": 0.5,
        "reconnect_reset_after_s": 0.5,
    }
    settings.update(overrides)
    return MqttConfig(**settings)


def _client_id(name: str) -> str:
    return f"test-schedule-{name}-{uuid.uuid4().hex[:8]}"


class _RecordingBackoff(Backoff):
    """The session's schedule, noting every delay it draws."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drawn: list[float] = []

    def next_delay_s(self) -> float:
        delay = super().next_delay_s()
        self.drawn.append(delay)
        return delay


class Attempts:
    """What a session tried: the protocol of each client it made, the delays it drew."""

    def __init__(self, session: MqttSession, monkeypatch: pytest.MonkeyPatch) -> None:
        self.protocols: list[str] = []
        backoff = _RecordingBackoff.of(session.config)
        backoff.outage_since, backoff.attempt = (
            session._backoff.outage_since,
            session._backoff.attempt,
        )
        session._backoff = backoff
        self.delays = backoff.drawn
        make = session._make_client

        def made() -> paho.Client:
            self.protocols.append(session.protocol)
            return make()

        monkeypatch.setattr(session, "_make_client", made)


def test_a_refused_tcp_connect_costs_one_connect_and_no_protocol_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing listens (ECONNREFUSED): every attempt is one MQTT 5 client, one connect."""

    async def scenario() -> tuple[list[str], int]:
        async with MqttSession(_quick(free_port()), client_id=_client_id("refused")) as s:
            attempts = Attempts(s, monkeypatch)
            await eventually(
                lambda: s.stats.connect_failures >= 10, "10 failed attempts", timeout_s=30
            )
            return list(attempts.protocols), s.stats.connect_failures

    protocols, failures = asyncio.run(scenario())
    assert set(protocols) == {"5"}
    assert failures <= len(protocols) <= failures + 1  # one client per attempt


def test_a_link_that_resets_every_connect_costs_one_tcp_connect_per_attempt(
    mosquitto: BrokerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cut link (the proxy accepts and resets, as a link or a proxy refusing does): each
    attempt is one TCP connection at the proxy, MQTT 5 always, no immediate MQTT 3.1.1 retry.
    Once the outage is older than the fast phase, every wait drawn is at least half the cap."""

    async def scenario(proxy: TcpProxy) -> tuple[list[str], list[float], int, int]:
        config = _quick(proxy.port)
        async with MqttSession(config, client_id=_client_id("cut")) as s:
            await s.wait_connected(10)
            attempts = Attempts(s, monkeypatch)
            await asyncio.to_thread(proxy.cut)
            await eventually(
                lambda: s._backoff.ceiling_s() == config.reconnect_cap_s, "polite", timeout_s=30
            )
            polite_from = len(attempts.delays)
            await eventually(
                lambda: len(attempts.delays) >= polite_from + 6, "6 polite delays", timeout_s=30
            )
            failures, refused = s.stats.connect_failures, proxy.connections_refused
            await asyncio.to_thread(proxy.restore)
            await s.wait_connected(10)
            return attempts.protocols, attempts.delays[polite_from:], failures, refused

    with TcpProxy(mosquitto.host, mosquitto.port) as proxy:
        protocols, polite, failures, refused = asyncio.run(scenario(proxy))
    assert set(protocols) == {"5"}
    assert failures >= 10
    assert failures <= refused <= failures + 1  # one TCP connection per attempt
    assert all(0.25 <= d <= 0.5 for d in polite), polite


def _read_packet(conn: socket.socket) -> bytes:
    """One whole MQTT packet from ``conn`` (b"" at the end of the stream)."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                return b""
            data += chunk
        return data

    packet = exactly(1)
    length, shift = 0, 0
    while packet:
        byte = exactly(1)
        if not byte:
            return b""
        packet += byte
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            return packet + exactly(length) if length else packet
    return b""


class _MqttGate:
    """A TCP server that reads each CONNECT and notes its protocol level (5, or 4 for 3.1.1);
    then closes the connection in order (everything read, no CONNACK: a broker that does not
    take that version, or a proxy whose broker is away), or, for the levels in ``forward``,
    passes it on to ``target`` (a real Mosquitto)."""

    def __init__(self, target: BrokerInfo | None = None, forward: frozenset[int] = frozenset()):
        self.levels: list[int] = []
        self._target, self._forward = target, forward
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> _MqttGate:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            connect = _read_packet(conn)
        except OSError:
            conn.close()
            return
        # Fixed header (2 bytes for a CONNECT under 128 bytes), "MQTT" with its length, level.
        level = connect[8] if len(connect) > 8 else -1
        self.levels.append(level)
        if level not in self._forward or self._target is None:
            conn.shutdown(socket.SHUT_RDWR)  # FIN: everything sent was read
            conn.close()
            return
        up = socket.create_connection((self._target.host, self._target.port))
        up.sendall(connect)
        conn.settimeout(None)
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def test_a_close_after_the_mqtt5_connect_tries_311_once_an_outage_at_its_ordinary_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that reads the CONNECT and closes without a CONNACK: the attempt after the
    first tries MQTT 3.1.1 (after its ordinary wait, not at once: one TCP connection per
    attempt); that fails too, so the outage goes on in MQTT 5 without more 3.1.1 tries."""

    async def scenario(gate: _MqttGate) -> tuple[list[str], int, int]:
        async with MqttSession(_quick(gate.port), client_id=_client_id("close")) as s:
            attempts = Attempts(s, monkeypatch)
            await eventually(
                lambda: s.stats.connect_failures >= 10, "10 failed attempts", timeout_s=30
            )
            return list(attempts.protocols), s.stats.connect_failures, len(gate.levels)

    with _MqttGate() as gate:
        protocols, failures, connections = asyncio.run(scenario(gate))
        levels = list(gate.levels)
    assert protocols[:3] == ["5", "3.1.1", "5"]
    assert protocols.count("3.1.1") == 1
    assert levels[:3] == [5, 4, 5] and levels.count(4) == 1  # what came over the wire
    assert failures <= connections <= failures + 1


def test_a_broker_that_closes_on_mqtt5_is_reached_with_311_on_the_next_attempt(
    mosquitto: BrokerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that takes only MQTT 3.1.1 and closes an MQTT 5 CONNECT (the gate before a real
    Mosquitto): two TCP connections, the second one MQTT 3.1.1, and it stays."""

    async def scenario(gate: _MqttGate) -> tuple[list[str], str]:
        async with MqttSession(_quick(gate.port), client_id=_client_id("v311only")) as s:
            attempts = Attempts(s, monkeypatch)
            await s.wait_connected(20)
            return list(attempts.protocols), s.protocol

    with _MqttGate(mosquitto, forward=frozenset({4})) as gate:
        protocols, protocol = asyncio.run(scenario(gate))
        levels = list(gate.levels)
    assert protocols == ["5", "3.1.1"]
    assert levels == [5, 4]
    assert protocol == "3.1.1"


def test_a_flapping_connection_goes_on_with_its_outage_and_a_lasting_one_starts_afresh(
    mosquitto: BrokerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an outage long enough to be polite, a connection that drops before
    ``reconnect_reset_after_s`` keeps the polite waits (a broker that accepts and drops is not
    hammered); with ``reconnect_reset_after_s = 0`` the next loss starts fast again."""

    async def first_wait_after_a_brief_connection(reset_after_s: float) -> float:
        with TcpProxy(mosquitto.host, mosquitto.port) as proxy:
            config = _quick(proxy.port, reconnect_reset_after_s=reset_after_s)
            async with MqttSession(config, client_id=_client_id("flap")) as s:
                await s.wait_connected(10)
                attempts = Attempts(s, monkeypatch)
                await asyncio.to_thread(proxy.cut)
                await eventually(
                    lambda: s._backoff.ceiling_s() == config.reconnect_cap_s, "polite", timeout_s=30
                )
                await asyncio.to_thread(proxy.restore)
                await s.wait_connected(10)
                drawn = len(attempts.delays)
                await asyncio.to_thread(proxy.cut)
                await eventually(
                    lambda: len(attempts.delays) > drawn, "the wait after the loss", timeout_s=30
                )
                return attempts.delays[drawn]

    async def scenario() -> tuple[float, float]:
        return (
            await first_wait_after_a_brief_connection(3600.0),
            await first_wait_after_a_brief_connection(0.0),
        )

    flapping, fresh = asyncio.run(scenario())
    assert flapping >= 0.25  # half the cap: the outage went on
    assert fresh <= 0.025  # reconnect_first_s: a new outage


# -- why a connection ended -------------------------------------------------------------------
def _ended(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " ended after " in r.getMessage()]


def test_the_log_line_says_why_a_connection_ended(
    start_mosquitto: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A cut link (a reset): network error; a stalled link: keep-alive timeout; a broker
    killed: the broker closed the connection."""
    caplog.set_level(logging.WARNING, logger="edgewise.mqtt.session")
    broker = start_mosquitto("broker")
    info = broker.info

    async def lose(s: MqttSession, cause: Callable[[], None], n: int) -> str:
        await asyncio.to_thread(cause)
        await eventually(lambda: len(_ended(caplog)) >= n, f"loss {n}", timeout_s=30)
        return _ended(caplog)[n - 1]

    async def scenario(proxy: TcpProxy) -> list[str]:
        config = _quick(proxy.port, keepalive_s=5)
        lines: list[str] = []
        async with MqttSession(config, client_id=_client_id("why")) as s:
            await s.wait_connected(10)
            lines.append(await lose(s, proxy.cut, 1))
            await asyncio.to_thread(proxy.restore)
            await s.wait_connected(10)
            lines.append(await lose(s, proxy.pause, 2))
            await asyncio.to_thread(proxy.resume)
            await s.wait_connected(10)
            lines.append(await lose(s, broker.kill, 3))
        return lines

    try:
        with TcpProxy(info.host, info.port) as proxy:
            cut, stalled, killed = asyncio.run(asyncio.wait_for(scenario(proxy), 90))
    finally:
        broker.kill()
    assert "network error: Connection reset by peer" in cut, cut
    assert "keep-alive timeout" in stalled and "keepalive_s (5 s)" in stalled, stalled
    assert "the broker closed the connection (no DISCONNECT)" in killed, killed
    assert all(f"127.0.0.1:{proxy.port}" in line for line in (cut, stalled, killed))


def test_the_log_line_names_the_reason_code_of_a_brokers_disconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An MQTT 5 broker that ends the connection with a DISCONNECT (here a minimal one, as
    EMQX does when it shuts down: 0x8B): the line names the reason and its code."""
    caplog.set_level(logging.WARNING, logger="edgewise.mqtt.session")

    async def packet(reader: asyncio.StreamReader) -> int:
        """Read one MQTT packet; its type (0 at the end of the stream)."""
        first = await reader.read(1)
        if not first:
            return 0
        length, shift = 0, 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        await reader.readexactly(length)
        return first[0] >> 4

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await packet(reader) == 1  # CONNECT
        writer.write(bytes([0x20, 0x03, 0x00, 0x00, 0x00]))  # CONNACK: success, no properties
        await writer.drain()
        while await packet(reader) not in (0, 3):
            pass  # until the client publishes
        writer.write(bytes([0xE0, 0x02, 0x8B, 0x00]))  # DISCONNECT: server shutting down
        await writer.drain()
        writer.close()

    async def scenario() -> str:
        server = await asyncio.start_server(broker, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, MqttSession(_quick(port), client_id=_client_id("dis")) as s:
            await s.wait_connected(10)
            s.publish_nowait("t/x", b"x", qos=0)
            await eventually(lambda: bool(_ended(caplog)), "the DISCONNECT", timeout_s=30)
            return _ended(caplog)[0]

    line = asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT_S))
    assert "the broker sent DISCONNECT: Server shutting down (reason code 0x8b)" in line, line
