"""The benchmark's publisher and consumer processes: plain paho 2.x, MQTT 5, one process each.

Each entry point (:func:`publish_flood`, :func:`publish_paced`, :func:`consume`) runs in its own
process (``multiprocessing`` spawn) so that no two of them share a GIL, connects with TCP_NODELAY,
signals ``ready`` once it can start, and puts exactly one report on its queue, even on failure.
Clients are driven by ``client.loop()`` in the process's only thread (no paho network thread).
Times are ``time.monotonic()``, one clock for every process on the machine (Linux), except the
latency figures, which compare the frame's ``ts`` (``time.time()`` at publish) to ``time.time()``
at receipt, as a user of the node would.
"""

from __future__ import annotations

import contextlib
import socket
import time
import traceback
from array import array
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any, Literal, cast

import msgspec
import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgewise.cli.frames import load_holdout
from schemas import ContractError, Frame, decode_results, encode_frame, encode_frames

CONNECT_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------- paho helpers
def _nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass
class _ConnState:
    reason: ReasonCode | None = None
    receive_maximum: int = 65535
    suback: list[ReasonCode] | None = None


def connect(
    host: str,
    port: int,
    client_id: str,
    *,
    clean_start: bool = True,
    session_expiry_s: int = 0,
    max_inflight: int = 20,
    timeout_s: float = CONNECT_TIMEOUT_S,
) -> tuple[mqtt.Client, int]:
    """A connected MQTT 5 client (TCP_NODELAY) and the broker's Receive Maximum.

    ``max_inflight`` is paho's window of QoS > 0 publishes (it queues beyond it, and cannot
    change it once connected). The caller drives the client with ``loop()`` (or
    ``loop_start()``).
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.on_socket_open = _nodelay
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(0)
    state = _ConnState()

    def on_connect(
        c: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        state.reason = reason
        if props is not None and hasattr(props, "ReceiveMaximum"):
            state.receive_maximum = int(props.ReceiveMaximum)

    client.on_connect = on_connect
    props: Properties | None = None
    if session_expiry_s:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry_s
    client.connect(host, port, keepalive=60, clean_start=clean_start, properties=props)
    deadline = time.monotonic() + timeout_s
    while state.reason is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no CONNACK from {host}:{port} in {timeout_s} s")
        client.loop(0.05)
    if state.reason.is_failure:
        raise ConnectionError(f"broker refused {client_id}: {state.reason}")
    client.on_connect = None
    return client, state.receive_maximum


def subscribe(client: mqtt.Client, topic: str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Subscribe at QoS 1 and wait for the SUBACK, driving the client with ``loop()``."""
    state = _ConnState()

    def on_subscribe(
        c: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        props: Properties | None,
    ) -> None:
        state.suback = reasons

    client.on_subscribe = on_subscribe
    client.subscribe(topic, qos=1)
    deadline = time.monotonic() + timeout_s
    while state.suback is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no SUBACK for {topic!r}")
        client.loop(0.05)
    if any(r.is_failure for r in state.suback):
        raise ConnectionError(f"subscription to {topic!r} refused: {state.suback}")
    client.on_subscribe = None


def _close(client: mqtt.Client) -> None:
    with contextlib.suppress(Exception):
        client.disconnect()
        client.loop(0.05)


# ---------------------------------------------------------------------------- publishers
@dataclass(frozen=True, slots=True)
class FloodSpec:
    host: str
    port: int
    topic: str
    count: int
    client_id: str
    window: int = 1000
    """QoS 1 publishes in flight (sent, not yet PUBACKed); capped by the broker's Receive Max."""
    payload: bytes | None = None
    """Publish these bytes every time instead of digit frames (e.g. a node's results message)."""
    frames_per_message: int = 1
    """Digit frames per message (> 1: frame batches); ``count`` still counts frames."""


@dataclass(frozen=True, slots=True)
class PacedSpec:
    host: str
    port: int
    topic: str
    rate_hz: float
    duration_s: float
    client_id: str
    frame_shape: tuple[int, ...] | None = None
    """Publish random uint8 frames of this shape (e.g. ``(224, 224, 3)``, an image) instead of
    the held-out digits."""


def random_frames(shape: tuple[int, ...], count: int = 8, seed: int = 0) -> npt.NDArray[np.uint8]:
    """``count`` frames of uniform random uint8 pixels, ``[count, *shape]``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)


@dataclass(slots=True)
class PublishReport:
    sent: int = 0
    acked: int = 0
    refused: int = 0
    started: float = 0.0
    """monotonic time of the first publish"""
    finished: float = 0.0
    """monotonic time of the last PUBACK"""
    window: int = 0
    max_lag_ms: float = 0.0
    """paced: worst delay of a publish behind its schedule"""
    error: str | None = None

    @property
    def rate(self) -> float:
        span = self.finished - self.started
        return self.acked / span if span > 0 else 0.0


class _Acks:
    __slots__ = ("acked", "refused")

    def __init__(self) -> None:
        self.acked = 0
        self.refused = 0

    def __call__(
        self,
        c: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        self.acked += 1
        if reason.is_failure:
            self.refused += 1


def _payload(seq: int, image: Any) -> bytes:
    return encode_frame(Frame(seq=seq, ts=time.time(), tensor=image))


def _batch_payload(first: int, count: int, images: Any) -> bytes:
    now = time.time()
    n = len(images)
    frames = [Frame(seq=s, ts=now, tensor=images[s % n]) for s in range(first, first + count)]
    return encode_frames(frames)


def publish_flood(spec: FloodSpec, ready: Event, go: Event, out: Queue[PublishReport]) -> None:
    """Publish ``spec.count`` frames as fast as the broker takes them, keeping a window."""
    report = PublishReport()
    try:
        images = load_holdout().images
        client, broker_max = connect(spec.host, spec.port, spec.client_id, max_inflight=spec.window)
        # paho queues (rather than sends) beyond its in-flight limit, does not honour the
        # broker's Receive Maximum and refuses more than 65,535 outstanding mids: our own
        # window, within all three, keeps them out of play.
        window = max(1, min(spec.window, broker_max))
        report.window = window
        acks = _Acks()
        client.on_publish = acks
        ready.set()
        if not go.wait(60):
            raise TimeoutError("never told to start")
        n = len(images)
        per = spec.frames_per_message
        messages = -(-spec.count // per)  # ceil
        sent = 0
        report.started = time.monotonic()
        deadline = report.started + 120
        while acks.acked < messages:
            limit = min(messages, acks.acked + window)
            while sent < limit:
                if spec.payload is not None:
                    data = spec.payload
                elif per == 1:
                    data = _payload(sent, images[sent % n])
                else:
                    first = sent * per
                    data = _batch_payload(first, min(per, spec.count - first), images)
                info = client.publish(spec.topic, data, qos=1)
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")
                sent += 1
                if sent % 64 == 0:
                    client.loop(0)  # take the PUBACKs that are in
            client.loop(0.005)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{acks.acked} of {messages} PUBACKs after 120 s")
        report.finished = time.monotonic()
        report.sent, report.acked, report.refused = sent, acks.acked, acks.refused
        _close(client)
    except Exception:
        report.error = traceback.format_exc(limit=3)
    out.put(report)


def publish_paced(
    spec: PacedSpec,
    ready: Event,
    go: Event,
    out: Queue[PublishReport],
    stop: Event | None = None,
) -> None:
    """Publish at a steady ``spec.rate_hz`` for ``spec.duration_s``, one frame per tick, or
    until ``stop`` is set."""
    report = PublishReport()
    try:
        shape = spec.frame_shape
        images = load_holdout().images if shape is None else random_frames(shape)
        # At a steady rate only a handful are ever in flight; 1000 is the broker's window.
        client, _ = connect(spec.host, spec.port, spec.client_id, max_inflight=1000)
        acks = _Acks()
        client.on_publish = acks
        ready.set()
        if not go.wait(60):
            raise TimeoutError("never told to start")
        total = round(spec.rate_hz * spec.duration_s)
        interval = 1.0 / spec.rate_hz
        n = len(images)
        start = time.monotonic() + 0.01
        max_lag = 0.0
        for i in range(total):
            if stop is not None and stop.is_set():
                total = i
                break
            due = start + i * interval
            now = time.monotonic()
            while now < due:
                client.loop(min(due - now, 0.01))  # waits on the socket: takes PUBACKs
                now = time.monotonic()
            max_lag = max(max_lag, now - due)
            info = client.publish(spec.topic, _payload(i, images[i % n]), qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")
            if i == 0:
                report.started = now
        deadline = time.monotonic() + 10
        while acks.acked < total and time.monotonic() < deadline:
            client.loop(0.01)
        report.finished = time.monotonic()
        report.sent, report.acked, report.refused = total, acks.acked, acks.refused
        report.max_lag_ms = max_lag * 1000
        _close(client)
    except Exception:
        report.error = traceback.format_exc(limit=3)
    out.put(report)


# ---------------------------------------------------------------------------- consumer
@dataclass(frozen=True, slots=True)
class ConsumeSpec:
    host: str
    port: int
    topic: str
    client_id: str
    kind: Literal["frames", "results"]
    """frames: a bare subscriber (count messages; no decode unless latency is wanted);
    results: decode each results batch and count its results for ``device``."""
    expect: int
    device: str | None = None
    latency: bool = False
    idle_timeout_s: float = 5.0
    deadline_s: float = 150.0


@dataclass(slots=True)
class ConsumeReport:
    received: int = 0
    """frames (kind frames) or distinct results for the device (kind results)"""
    messages: int = 0
    first: float = 0.0
    """monotonic time the first message arrived"""
    first_items: int = 0
    """items in the first message (a results batch holds several)"""
    last: float = 0.0
    duplicates: int = 0
    undecodable: int = 0
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    node_ms: array[float] = field(default_factory=lambda: array("d"))
    """results: the node's own ``latency_ms`` (frame received to result built)"""
    timed_out: bool = False
    error: str | None = None

    @property
    def rate(self) -> float:
        """Items per second from the first message to the last (the first message's items,
        which arrived at the start of the span, are not counted)."""
        span = self.last - self.first
        return (self.received - self.first_items) / span if span > 0 else 0.0


class _FrameTs(msgspec.Struct):
    ts: float | None = None


_FRAME_TS = msgspec.msgpack.Decoder(_FrameTs)


class _Counter:
    """on_message for both kinds; kept small, it runs once per delivered message."""

    def __init__(self, spec: ConsumeSpec, report: ConsumeReport) -> None:
        self.spec = spec
        self.report = report
        self.seen: set[int] = set()

    def __call__(self, c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        r = self.report
        if self.spec.kind == "frames":
            n = 1
            if self.spec.latency:
                ts = _FRAME_TS.decode(msg.payload).ts
                if ts is not None:
                    r.latencies_ms.append((time.time() - ts) * 1000.0)
        else:
            wall = time.time()
            try:
                batch = decode_results(cast(bytes, msg.payload))
            except ContractError:
                r.undecodable += 1
                return
            n = 0
            for res in batch.results:
                if res.device != self.spec.device:
                    continue
                if res.frame_seq in self.seen:
                    r.duplicates += 1
                    continue
                self.seen.add(res.frame_seq)
                n += 1
                if self.spec.latency and res.frame_ts is not None:
                    r.latencies_ms.append((wall - res.frame_ts) * 1000.0)
                    r.node_ms.append(res.latency_ms)
            if n == 0:
                return
        if r.messages == 0:
            r.first = now
            r.first_items = n
        r.messages += 1
        r.received += n
        r.last = now


def consume(spec: ConsumeSpec, ready: Event, out: Queue[ConsumeReport]) -> None:
    """Subscribe (QoS 1, paho's automatic PUBACKs) and count until ``spec.expect`` items."""
    report = ConsumeReport()
    try:
        client, _ = connect(spec.host, spec.port, spec.client_id)
        client.on_message = _Counter(spec, report)
        subscribe(client, spec.topic)
        ready.set()
        deadline = time.monotonic() + spec.deadline_s
        while report.received < spec.expect:
            client.loop(0.1)
            now = time.monotonic()
            if now > deadline or (report.last and now - report.last > spec.idle_timeout_s):
                report.timed_out = True
                break
        _close(client)
    except Exception:
        report.error = traceback.format_exc(limit=3)
    out.put(report)


# ---------------------------------------------------------------------------- drain consumer
@dataclass(frozen=True, slots=True)
class DrainSpec:
    """A node's results after an outage: the backlog of one device, live results of another."""

    host: str
    port: int
    topic: str
    client_id: str
    backlog_device: str
    backlog_expect: int
    live_device: str
    deadline_s: float = 600.0
    finish_wait_s: float = 10.0
    """after ``finish``: how long to wait for the live results still to come"""


@dataclass(slots=True)
class DrainReport:
    messages: int = 0
    backlog_received: int = 0
    """distinct backlog results (by frame seq)"""
    backlog_duplicates: int = 0
    backlog_first: float = 0.0
    """monotonic time the first backlog result arrived"""
    backlog_last: float = 0.0
    backlog_inversions: int = 0
    """backlog results that arrived after one with a higher frame seq (0: in order)"""
    live_seq: array[int] = field(default_factory=lambda: array("q"))
    live_ts: array[float] = field(default_factory=lambda: array("d"))
    """each live result's frame ``ts`` (``time.time()`` at publish)"""
    live_arrived: array[float] = field(default_factory=lambda: array("d"))
    """``time.time()`` when its results message arrived"""
    live_duplicates: int = 0
    other_results: int = 0
    """results of other devices (e.g. resent warm-up results)"""
    undecodable: int = 0
    timed_out: bool = False
    error: str | None = None


class _DrainCounter:
    def __init__(self, spec: DrainSpec, report: DrainReport) -> None:
        self.spec = spec
        self.report = report
        self.backlog_seen: set[int] = set()
        self.live_seen: set[int] = set()
        self.top = -1

    def __call__(self, c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        wall = time.time()
        r = self.report
        try:
            batch = decode_results(cast(bytes, msg.payload))
        except ContractError:
            r.undecodable += 1
            return
        r.messages += 1
        for res in batch.results:
            if res.device == self.spec.backlog_device:
                if res.frame_seq in self.backlog_seen:
                    r.backlog_duplicates += 1
                    continue
                self.backlog_seen.add(res.frame_seq)
                if res.frame_seq < self.top:
                    r.backlog_inversions += 1
                self.top = max(self.top, res.frame_seq)
                if r.backlog_received == 0:
                    r.backlog_first = now
                r.backlog_received += 1
                r.backlog_last = now
            elif res.device == self.spec.live_device:
                if res.frame_seq in self.live_seen:
                    r.live_duplicates += 1
                    continue
                self.live_seen.add(res.frame_seq)
                r.live_seq.append(res.frame_seq)
                r.live_ts.append(res.frame_ts if res.frame_ts is not None else float("nan"))
                r.live_arrived.append(wall)
            else:
                r.other_results += 1


def consume_drain(
    spec: DrainSpec,
    ready: Event,
    backlog_done: Event,
    finish: Event,
    live_expect: Any,
    out: Queue[DrainReport],
) -> None:
    """Count a node's backlog and live results; set ``backlog_done`` once the whole backlog is
    in; stop once ``finish`` is set and ``live_expect.value`` live results arrived."""
    report = DrainReport()
    try:
        client, _ = connect(spec.host, spec.port, spec.client_id)
        counter = _DrainCounter(spec, report)
        client.on_message = counter
        subscribe(client, spec.topic)
        ready.set()
        deadline = time.monotonic() + spec.deadline_s
        finish_seen = 0.0
        while True:
            client.loop(0.05)
            now = time.monotonic()
            if report.backlog_received >= spec.backlog_expect and not backlog_done.is_set():
                backlog_done.set()
            if finish.is_set():
                finish_seen = finish_seen or now
                if len(report.live_seq) >= live_expect.value:
                    break
                if now - finish_seen > spec.finish_wait_s:
                    report.timed_out = True
                    break
            if now > deadline:
                report.timed_out = True
                break
        _close(client)
    except Exception:
        report.error = traceback.format_exc(limit=3)
    out.put(report)
