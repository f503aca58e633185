"""A simulated sensor: publishes the held-out digits frames at a steady rate."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from edgewise.cli.frames import LabelledFrames, load_holdout
from edgewise.mqtt import MqttConfig, MqttError, MqttSession, PublishFailed, PublishRejected
from schemas import Frame, Topics, encode_frame, encode_frames


@dataclass(slots=True)
class SimStats:
    sent: int = 0
    acked: int = 0
    failed: int = 0
    resent: int = 0
    """Frames published again because their connection dropped before the broker acked them."""
    elapsed_s: float = 0.0


def sensor_client_id(device: str, sensor: str) -> str:
    return f"edgewise-sensor-{device}-{sensor}"


async def simulate(
    mqtt: MqttConfig | MqttSession,
    *,
    device: str = "sim-1",
    sensor: str = "digits",
    rate_hz: float = 100.0,
    count: int | None = None,
    duration_s: float | None = None,
    qos: int = 1,
    fmt: Literal["msgpack", "json"] = "msgpack",
    topics: Topics | None = None,
    frames: LabelledFrames | None = None,
    on_sent: Callable[[int, int], None] | None = None,
    stop: asyncio.Event | None = None,
    start_seq: int = 0,
    per_message: int = 1,
) -> SimStats:
    """Publish frames (cycling through the held-out set) until ``count``/``duration_s``/``stop``.

    ``on_sent(seq, label)`` is called for each frame as it is handed to the client, so a caller
    can score the results it gets back. ``per_message`` > 1 sends frame batches: a message goes
    out once that many frames are due (the last one with what is left), so each frame waits up
    to ``per_message / rate_hz`` for its batch. A message whose connection dropped before the
    broker acknowledged it is published again once connected (at least once, as a QoS 1 sensor
    must; the node may then get a frame twice); one the broker refused is not. ``sent``,
    ``acked``, ``failed`` (not acknowledged in the end) and ``resent`` count frames.

    ``mqtt`` is the broker's settings, or a session already connected (a command's,
    :func:`edgewise.cli.connect.session`). A session of its own that cannot connect raises
    :class:`~edgewise.mqtt.ConnectFailed` at the first failed attempt (or ``TimeoutError``).
    """
    if rate_hz <= 0:
        raise ValueError("rate_hz must be > 0")
    if per_message < 1:
        raise ValueError("per_message must be >= 1")
    frames = frames or load_holdout()
    topic = (topics or Topics()).sensor(device, sensor)
    stats = SimStats()
    pending: set[asyncio.Future[None]] = set()

    unacked: list[tuple[int, bytes]] = []
    """Messages (frames in them, payload) whose publish failed: published again."""

    def settled(n: int, payload: bytes, f: asyncio.Future[None]) -> None:
        pending.discard(f)
        exc = f.exception()
        if exc is None:
            stats.acked += n
        elif isinstance(exc, PublishFailed) and not exc.transient:
            pass  # e.g. over the broker's maximum packet size: sending again cannot help (failed)
        elif not isinstance(exc, PublishRejected):  # the connection dropped: send it again
            unacked.append((n, payload))

    batch: list[Frame] = []

    async def send(session: MqttSession, n: int, payload: bytes) -> None:
        if not session.connected:
            await session.wait_connected()
        fut = session.publish_nowait(topic, payload, qos=qos)
        pending.add(fut)
        fut.add_done_callback(functools.partial(settled, n, payload))

    async def resend(session: MqttSession) -> None:
        while unacked:
            n, payload = unacked.pop(0)
            stats.resent += n
            await send(session, n, payload)

    async def publish(session: MqttSession) -> None:
        if len(batch) == 1:
            payload = encode_frame(batch[0], as_json=fmt == "json")
        else:
            payload = encode_frames(batch, as_json=fmt == "json")
        n = len(batch)
        batch.clear()
        await resend(session)
        await send(session, n, payload)

    async with contextlib.AsyncExitStack() as stack:
        if isinstance(mqtt, MqttSession):
            session = mqtt
        else:
            session = await stack.enter_async_context(
                MqttSession(
                    mqtt,
                    client_id=sensor_client_id(device, sensor),
                    persistent=False,
                    manual_ack=False,
                )
            )
            await session.wait_connected_or_failed(2 * mqtt.connect_timeout_s + 5)
        start = time.monotonic()
        seq = start_seq
        interval = 1.0 / rate_hz
        while True:
            if stop is not None and stop.is_set():
                break
            if count is not None and stats.sent >= count:
                break
            now = time.monotonic()
            if duration_s is not None and now - start >= duration_s:
                break
            due = int((now - start) / interval) + 1 - stats.sent
            if count is not None:
                due = min(due, count - stats.sent)
            for _ in range(max(due, 0)):
                i = seq % len(frames)
                batch.append(Frame(seq=seq, ts=time.time(), tensor=frames.images[i]))
                if on_sent is not None:
                    on_sent(seq, int(frames.labels[i]))
                stats.sent += 1
                seq += 1
                if len(batch) >= per_message:
                    await publish(session)
            next_at = start + (stats.sent) * interval
            await asyncio.sleep(max(0.0, min(next_at - time.monotonic(), 0.05)))
        if batch:
            await publish(session)
        try:
            async with asyncio.timeout(10):
                while pending or unacked:
                    await resend(session)
                    await asyncio.gather(*list(pending), return_exceptions=True)
        except TimeoutError:
            pass
        stats.failed = stats.sent - stats.acked
        stats.elapsed_s = time.monotonic() - start
    return stats


__all__ = ["MqttError", "SimStats", "sensor_client_id", "simulate"]
