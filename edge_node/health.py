"""Health: the checks that put degradation reasons on the node's status, and take them off.

Once a second: is the uplink down or stalled past ``health.uplink_grace_s`` (``uplink_down``);
does another process run with this node's client id (``client_id_conflict``,
docs/adr/0073-client-id-conflict.md); in end-to-end mode, has a consumer left results
unconfirmed too long (``awaiting_consumer``, docs/adr/0078-end-to-end-acks.md); and is the
inference session due for its recycle. On each model served: is it on the preferred provider
(``accelerator_unavailable``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from edge_node.config import EndToEndConfig, HealthConfig
from edge_node.hardware import NodeHardware
from edge_node.status import NodeStatus
from edgewise.mqtt import MqttSession
from edgewise.outbox import Forwarder
from edgewise.serving.model import ServedModel

log = logging.getLogger(__name__)


class Health:
    def __init__(
        self,
        config: HealthConfig,
        status: NodeStatus,
        hardware: NodeHardware,
        *,
        uplink: MqttSession,
        forwarders: list[Forwarder],
        results_to_uplink: Forwarder,
        end_to_end: EndToEndConfig,
        connections: Callable[[], list[MqttSession]],
        recycle_s: float,
        recycle: Callable[[], Awaitable[bool]],
        draining: Callable[[], bool],
    ) -> None:
        self._config = config
        self._status = status
        self._hardware = hardware
        self._uplink = uplink
        self._forwarders = forwarders
        self._results_to_uplink = results_to_uplink
        self._e2e = end_to_end
        self._connections = connections
        self._recycle_s = recycle_s
        self._recycle = recycle
        self._draining = draining
        self._uplink_bad_since: float | None = time.monotonic()

    def oldest_in_flight_s(self) -> float:
        return max(f.oldest_in_flight_s for f in self._forwarders)

    def uplink_up(self) -> None:
        """The uplink connected: ``uplink_down`` clears (it says so itself on connect)."""
        self._uplink_bad_since = None
        self._status.set("uplink_down", False, says_itself=self._uplink)

    def sync_conflict(self) -> None:
        """``degraded: client_id_conflict`` while another process takes one of the node's
        connections over: it runs with this node's id (docs/adr/0073-client-id-conflict.md)."""
        conflict = any(s.client_id_conflict for s in self._connections())
        self._status.set("client_id_conflict", conflict)

    def cloud_changed(self, available: bool) -> None:
        """The escalator's verdict on the cloud workers (docs/adr/0074-cloud-availability.md)."""
        self._status.set("cloud_unavailable", not available)

    def check_accelerator(self, served: ServedModel) -> None:
        """``degraded: accelerator_unavailable`` while the model serves on a provider other
        than the one the node prefers (its class's first); it keeps serving on the fallback."""
        rt = served.runtime
        missing = self._hardware.accelerator_missing(served.path, rt.name, rt.provider)
        if missing and "accelerator_unavailable" not in self._status.reasons:
            log.warning(
                "%s serves on %s, not on %s (hardware class %s): the accelerator is missing or"
                " failed",
                rt.name,
                rt.provider,
                self._hardware.preferred_for(served.path, rt.name),
                self._hardware.name,
            )
        self._status.set("accelerator_unavailable", missing)

    def model_changed(self, new: ServedModel) -> None:
        """A new release serves: the status says it, whether or not the reasons change."""
        missing = self._hardware.accelerator_missing(
            new.path, new.runtime.name, new.runtime.provider
        )
        if missing == ("accelerator_unavailable" in self._status.reasons):
            self._status.republish()  # the release changed, the reasons did not
        self.check_accelerator(new)

    async def run(self) -> None:
        """Once a second: is the uplink down or stalled; is the session due for a recycle."""
        grace_s = self._config.uplink_grace_s
        loaded_at = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            bad = not self._uplink.connected or self.oldest_in_flight_s() > grace_s
            if not bad:
                self._uplink_bad_since = None
                self._status.set("uplink_down", False)
            elif self._uplink_bad_since is None:
                self._uplink_bad_since = now
            elif now - self._uplink_bad_since >= grace_s:
                self._status.set("uplink_down", True)
            self.sync_conflict()
            if self._e2e.enabled:  # nobody confirms what the broker took (ADR 0078)
                waited = self._results_to_uplink.oldest_unconfirmed_s
                self._status.set("awaiting_consumer", waited > self._e2e.degraded_after_s)
            if self._recycle_s > 0 and now - loaded_at >= self._recycle_s and not self._draining():
                await self._recycle()
                loaded_at = time.monotonic()
