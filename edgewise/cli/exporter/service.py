"""The exporter as a long-lived resource: one MQTT session (reconnecting with backoff, as every
service does) feeding :class:`FleetMetrics`, and prometheus-client's HTTP server serving
``/metrics`` from it. The endpoint answers while the broker is away (with
``edgewise_exporter_connected 0``), so Prometheus can tell an exporter cut off from its broker
from a fleet that went quiet."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Self

from prometheus_client import CollectorRegistry, start_http_server

from edgewise.cli.exporter.collector import FleetCollector
from edgewise.cli.exporter.fleet import FleetMetrics

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from edgewise.mqtt import Inbound, MqttConfig, MqttSession

log = logging.getLogger(__name__)

DEFAULT_PORT = 9873
"""Not claimed in Prometheus' list of default exporter ports when this was chosen."""


class Exporter:
    """``async with Exporter(mqtt) as e:`` serves ``http://{host}:{e.port}/metrics`` until the
    block ends. ``port=0`` picks a free port (tests)."""

    def __init__(
        self,
        mqtt: MqttConfig,
        *,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        fleet: FleetMetrics | None = None,
        client_id: str = "edgewise-exporter",
    ) -> None:
        self.mqtt = mqtt
        self.host = host
        self.fleet = fleet if fleet is not None else FleetMetrics()
        self.lock = threading.Lock()
        self.client_id = mqtt.client_id_for(client_id)
        self._port = port
        self._session: MqttSession | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "use the exporter inside 'async with'"
        return int(self._server.server_port)

    @property
    def session(self) -> MqttSession:
        assert self._session is not None, "use the exporter inside 'async with'"
        return self._session

    def _connected(self) -> bool:
        return self._session is not None and self._session.connected

    def _on_message(self, msg: Inbound) -> None:
        with self.lock:
            self.fleet.ingest(msg.topic, msg.payload, time.monotonic())

    async def __aenter__(self) -> Self:
        from edgewise.mqtt import MqttSession

        registry = CollectorRegistry(auto_describe=False)
        registry.register(FleetCollector(self.fleet, self.lock, connected=self._connected))
        # A thread of its own: a scrape never waits for the event loop, nor the loop for it.
        self._server, self._thread = start_http_server(self._port, self.host, registry)
        session = MqttSession(
            self.mqtt,
            client_id=self.client_id,
            on_message=self._on_message,
            manual_ack=False,
            persistent=False,
        )
        await session.__aenter__()
        self._session = session
        for f in self.fleet.filters():
            session.subscribe(f, qos=1)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._session is not None:
                await self._session.__aexit__(exc_type, exc, tb)
        finally:
            if self._server is not None:
                server = self._server
                await asyncio.to_thread(server.shutdown)
                server.server_close()
