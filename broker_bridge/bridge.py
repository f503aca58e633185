"""The bridge: two MQTT sessions, two durable queues, forwarding by rules, status and telemetry.

::

    site broker ──(up rules: filter → template)──▶ up queue (SQLite) ──▶ cloud broker
    site broker ◀── down queue (SQLite) ◀──(down rules: filter → template)── cloud broker

Each session subscribes to its direction's filters with MQTT 5 No Local (our own publishes are
never sent back to us) and Retain As Published (a retained message keeps its flag). On MQTT
3.1.1, where neither exists, echoes are recognised by fingerprint (:mod:`broker_bridge.echo`).
Design: docs/bridge.md, docs/adr/0010-bridge-no-echo.md, docs/adr/0011-bridge-queues.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Self

from paho.mqtt.properties import Properties

from broker_bridge.acks import ResultConfirmer
from broker_bridge.config import BridgeConfig
from broker_bridge.direction import EVICTION_ORDER, Lane
from broker_bridge.echo import EchoLedger
from broker_bridge.errors import QueueUnusable
from broker_bridge.wire import (
    AckTelemetry,
    BridgeTelemetry,
    DirectionTelemetry,
    encode_telemetry,
)
from edgewise.mqtt import Conflict, ConnectInfo, MqttError, MqttSession, Will
from edgewise.outbox import AsyncOutbox, Forwarder, OutboxConfig, OutboxError
from schemas import Limits, Status, encode_status

log = logging.getLogger(__name__)


class _LedgerSession(MqttSession):
    """A session that remembers what it publishes while it speaks MQTT 3.1.1 (no No Local)."""

    ledger: EchoLedger

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> asyncio.Future[None]:
        if self.protocol == "3.1.1" and self.connected:
            self.ledger.sent(topic, payload, time.monotonic())
        return super().publish_nowait(topic, payload, qos=qos, retain=retain, properties=properties)


class Bridge:
    """``async with Bridge(config) as bridge: await stop.wait(); await bridge.drain()``."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.boot_id = uuid.uuid4().hex[:12]
        self.status_topic = config.own_topic(config.status_topic)
        self.telemetry_topic = config.own_topic(config.telemetry_topic)
        self._stack = AsyncExitStack()
        self._tasks: asyncio.TaskGroup | None = None
        self._runners: list[asyncio.Task[None]] = []
        self._published_reasons: dict[str, tuple[str, ...]] = {}
        self._status_changed = asyncio.Event()
        self._telemetry_seq = 0
        self.up: Lane
        self.down: Lane
        self.site: _LedgerSession
        self.cloud: _LedgerSession
        self.queue_corrupt: list[str] = []
        self._said_offline = False
        # Set once a side's subscriptions are in place and its status is published.
        self._ready = {"site": asyncio.Event(), "cloud": asyncio.Event()}

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self._said_offline and self._runners:
                await self._say_offline([])
            for task in self._runners:
                task.cancel()
            if self._tasks is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._tasks.__aexit__(None, None, None)
        finally:
            await self._stack.aclose()

    async def _open_queue(self, name: str, max_bytes: int) -> AsyncOutbox:
        cfg = self.config
        outbox = AsyncOutbox(
            OutboxConfig(
                path=cfg.queue.dir / f"{name}.db",
                max_bytes=max_bytes,
                synchronous=cfg.queue.synchronous,
                eviction_order=EVICTION_ORDER,
                answered_keep=0,
            ),
            count_evicted_topics=True,  # evictions are logged per rule
        )
        try:
            await self._stack.enter_async_context(outbox)
        except OutboxError as exc:
            raise QueueUnusable(f"{name} queue in {cfg.queue.dir}: {exc}") from exc
        if outbox.recovered_from is not None:
            self.queue_corrupt.append(name)
            log.error(
                "%s queue was corrupt: kept aside as %s; forwarding with a fresh queue",
                name,
                outbox.recovered_from,
            )
        return outbox

    async def _start(self) -> None:
        cfg = self.config
        up_q = await self._open_queue("up", cfg.queue.up_max_bytes)
        down_q = await self._open_queue("down", cfg.queue.down_max_bytes)
        fwd = cfg.forward
        lane_args: dict[str, Any] = {
            "max_payload_bytes": cfg.max_payload_bytes,
            "max_batch": fwd.max_batch,
            "max_pending": fwd.max_pending,
        }
        self.up = Lane("up", cfg.compiled("up"), up_q, **lane_args)
        self.down = Lane("down", cfg.compiled("down"), down_q, **lane_args)
        offline = self._status_payload("offline", ["shutdown_unclean"])
        conflict = Conflict()  # one count of takeovers for both sides (ADR 0073)
        self.site = _LedgerSession(
            cfg.site_broker,
            client_id=f"{cfg.bridge_id}-site",
            on_message=self.up.receive,
            on_connect=self._on_connect_site,
            conflict=conflict,
            announce_conflict=True,  # on_connect publishes the status
            resubscribe=True,  # the rules may have changed since the broker kept the session
            will=Will(self.status_topic, offline, qos=1, retain=True),
        )
        self.cloud = _LedgerSession(
            cfg.cloud_broker,
            client_id=f"{cfg.bridge_id}-cloud",
            on_message=self.down.receive,
            on_connect=self._on_connect_cloud,
            conflict=conflict,
            announce_conflict=True,  # on_connect publishes the status
            resubscribe=True,
            will=Will(self.status_topic, offline, qos=1, retain=True),
        )
        for session in (self.site, self.cloud):
            session.ledger = EchoLedger(cfg.echo_window_s, cfg.echo_max_entries)
        for lane, source in ((self.up, self.site), (self.down, self.cloud)):
            for rule in lane.rules:
                source.subscribe(rule.filter, rule.qos, no_local=True, retain_as_published=True)
        await self._stack.enter_async_context(self.site)
        await self._stack.enter_async_context(self.cloud)
        rate = fwd.max_rate_per_s or None
        # Strict order per direction (live_first=False): the bridge promises order per topic.
        up_fwd = Forwarder(
            up_q, self.cloud, window=fwd.window, max_rate_per_s=rate, live_first=False
        )
        down_fwd = Forwarder(
            down_q, self.site, window=fwd.window, max_rate_per_s=rate, live_first=False
        )
        self.up.attach(self.site, self.cloud, up_fwd, self.site.ledger)
        if cfg.acks.enabled:  # end-to-end mode: confirm queued results to their nodes
            self.up.confirmer = ResultConfirmer(
                self.site,
                cfg.acks_rule(),
                by=cfg.bridge_id,
                max_ids=cfg.acks.max_ids,
                limits=Limits(max_payload_bytes=cfg.max_payload_bytes),
            )
        self.down.attach(self.cloud, self.site, down_fwd, self.cloud.ledger)
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        t = self._tasks
        self._runners = [
            t.create_task(up_fwd.run(), name="bridge-up-forwarder"),
            t.create_task(down_fwd.run(), name="bridge-down-forwarder"),
            t.create_task(self.up.pump(), name="bridge-up-pump"),
            t.create_task(self.down.pump(), name="bridge-down-pump"),
            t.create_task(self._status_loop(), name="bridge-status"),
            t.create_task(self._telemetry_loop(), name="bridge-telemetry"),
        ]
        log.info(
            "bridge %s: %d up rule(s), %d down rule(s); queues in %s",
            cfg.bridge_id,
            len(self.up.rules),
            len(self.down.rules),
            cfg.queue.dir,
        )

    async def drain(self) -> bool:
        """SIGTERM: stop taking messages, queue (and ack) what was taken, forward what the far
        brokers will take within ``drain_timeout_s``, say ``offline``. True if all was sent."""
        # Take nothing more: what arrives from now on is left unacknowledged, so the source
        # broker keeps it for our persistent session. (Reading goes on: PUBACKs come that way.)
        for lane in (self.up, self.down):
            lane.close_intake()
        finished = True
        try:
            async with asyncio.timeout(self.config.drain_timeout_s):
                await asyncio.shield(self._drain_lanes())
        except TimeoutError:
            finished = False
        for lane in (self.up, self.down):
            assert lane.forwarder is not None
            with contextlib.suppress(OutboxError):
                await asyncio.shield(lane.forwarder.flush())
        await self._say_offline([] if finished else ["drain_timeout"])
        return finished

    async def _say_offline(self, reasons: list[str]) -> None:
        """Publish ``offline`` (retained) to both brokers: a clean DISCONNECT drops the will."""
        self._said_offline = True
        payload = self._status_payload("offline", reasons)
        for session in (self.site, self.cloud):
            if session.connected:
                fut = session.publish_nowait(self.status_topic, payload, qos=1, retain=True)
                fut.add_done_callback(_retrieve)
                with contextlib.suppress(MqttError, TimeoutError):
                    async with asyncio.timeout(2.0):
                        await asyncio.shield(fut)

    async def _drain_lanes(self) -> None:
        for lane in (self.up, self.down):
            await lane.wait_drained()
        for lane in (self.up, self.down):
            assert lane.forwarder is not None
            if lane.outbox.stats().rows and lane.target is not None and lane.target.connected:
                lane.forwarder.kick()
                await lane.forwarder.wait_idle()

    # -- status ------------------------------------------------------------------------------

    def reasons(self, side: str) -> list[str]:
        """Why the bridge is degraded, as told to ``side`` ("site" or "cloud")."""
        out: list[str] = []
        if self.queue_corrupt:
            out.append("queue_corrupt")
        for lane in (self.up, self.down):
            if lane.storage_error is not None and lane.storage_error not in out:
                out.append(lane.storage_error)
        if self.up.evicting or self.down.evicting:
            out.append("evicting")
        if side == "site" and not self.cloud.connected:
            out.append("uplink_down")
        if side == "cloud" and not self.site.connected:
            out.append("site_down")
        if self.site.client_id_conflict or self.cloud.client_id_conflict:
            out.append("client_id_conflict")  # another bridge runs with this id (ADR 0073)
        return out

    def _status_payload(self, state: str, reasons: list[str]) -> bytes:
        return encode_status(
            Status(
                node=self.config.bridge_id,
                state=state,  # type: ignore[arg-type]
                ts=time.time(),
                reasons=reasons,
                runtime="bridge",
                boot_id=self.boot_id,
            )
        )

    async def _publish_status(self, side: str, session: MqttSession) -> None:
        reasons = self.reasons(side)
        payload = self._status_payload("degraded" if reasons else "online", reasons)
        await session.publish(self.status_topic, payload, qos=1, retain=True)
        self._published_reasons[side] = tuple(reasons)

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until both sessions have connected once, subscribed and published a status."""
        async with asyncio.timeout(timeout_s):
            for event in self._ready.values():
                await event.wait()

    async def _on_connect_site(self, info: ConnectInfo) -> None:
        await self._publish_status("site", self.site)
        self._ready["site"].set()
        self._status_changed.set()  # the cloud side may have been told "site_down"

    async def _on_connect_cloud(self, info: ConnectInfo) -> None:
        await self._publish_status("cloud", self.cloud)
        self._ready["cloud"].set()
        self._status_changed.set()

    async def _status_loop(self) -> None:
        """Tell each broker when the reasons it was last told change (checked every 0.5 s)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self._status_changed.wait()
            self._status_changed.clear()
            for lane in (self.up, self.down):
                lane.check_evicting()
            if self._said_offline:
                continue
            for side, session in (("site", self.site), ("cloud", self.cloud)):
                if not session.connected:
                    self._published_reasons.pop(side, None)
                    continue
                if tuple(self.reasons(side)) != self._published_reasons.get(side):
                    with contextlib.suppress(MqttError):
                        await self._publish_status(side, session)

    # -- telemetry ---------------------------------------------------------------------------

    def telemetry(self) -> BridgeTelemetry:
        self._telemetry_seq += 1
        return BridgeTelemetry(
            bridge=self.config.bridge_id,
            site=self.config.site,
            ts=time.time(),
            seq=self._telemetry_seq,
            up=self._lane_telemetry(self.up, self.config.queue.up_max_bytes),
            down=self._lane_telemetry(self.down, self.config.queue.down_max_bytes),
            reasons=self.reasons("cloud"),
            acks=None if self.up.confirmer is None else self._acks_telemetry(self.up.confirmer),
        )

    @staticmethod
    def _acks_telemetry(confirmer: ResultConfirmer) -> AckTelemetry:
        s = confirmer.stats
        return AckTelemetry(
            confirmed=s.confirmed,
            withheld=s.withheld,
            undecodable=s.undecodable,
            published=s.published,
            failed=s.failed,
        )

    @staticmethod
    def _lane_telemetry(lane: Lane, max_bytes: int) -> DirectionTelemetry:
        q = lane.outbox.stats()
        f = lane.forwarder
        assert f is not None and lane.source is not None and lane.target is not None
        return DirectionTelemetry(
            received=lane.stats.received,
            queued=lane.stats.queued,
            delivered=f.stats.delivered,
            published=f.stats.published,
            refused=f.stats.refused,
            echoes_dropped=lane.stats.echoes_dropped,
            oversize_dropped=lane.stats.oversize_dropped,
            unmatched=lane.stats.unmatched,
            evicted=q.evicted_total,
            queue_rows=q.rows,
            queue_bytes=q.bytes,
            queue_file_bytes=q.file_bytes,
            queue_max_bytes=max_bytes,
            in_flight=f.in_flight,
            source_connected=lane.source.connected,
            target_connected=lane.target.connected,
            failed=lane.stats.failed,
        )

    async def _telemetry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.telemetry_interval_s)
            payload = encode_telemetry(self.telemetry())
            for session in (self.site, self.cloud):
                if session.connected:
                    # Fire and forget: a telemetry window lost with a connection is replaced by
                    # the next one (every count in it is cumulative).
                    fut = session.publish_nowait(self.telemetry_topic, payload, qos=0)
                    fut.add_done_callback(_retrieve)


def _retrieve(fut: asyncio.Future[None]) -> None:
    """Mark a fire-and-forget publish's outcome as seen (no "never retrieved" noise)."""
    if not fut.cancelled():
        fut.exception()
