"""The node's outbox on disk: within its bound at every instant, and back to work after a full
volume (issue 16, point 6; ADR 0075).

The node runs in-process against a real Mosquitto; its uplink goes through a TCP proxy the test
cuts. Sizes are taken from the file system by a sampler thread, independently of the outbox's
own accounting, and compared with the outbox's exact peak (taken at each commit and checkpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_node.node import EdgeNode
from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo, MqttProbe, TcpProxy
from tests.nodeharness import Harness, frame_bytes, running_node, uplink_through
from tests.waiting import eventually

HOLDOUT = load_holdout()
MiB = 1024 * 1024
ProbeFactory = Callable[..., MqttProbe]


def _outbox_path(node: EdgeNode) -> Path:
    return node.config.storage.outbox_config(node.config.node_id).path


class SizeSampler:
    """Every ``period_s``, the size of the database file plus its WAL, on its own thread."""

    def __init__(self, db: Path, period_s: float = 0.05) -> None:
        self.files = (db, db.with_name(db.name + "-wal"))
        self.period_s = period_s
        self.samples = 0
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _size(self) -> int:
        total = 0
        for path in self.files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(path).st_size
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.largest = max(self.largest, self._size())
            self.samples += 1
            self._stop.wait(self.period_s)

    def __enter__(self) -> SizeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def _at_least(count: Callable[[], int], n: int, what: str) -> None:
    await eventually(lambda: count() >= n, f"{n} {what}", timeout_s=60)


async def _feed(sensor: MqttProbe, start: int, n: int) -> None:
    frames = [
        frame_bytes(i, HOLDOUT.images[i % len(HOLDOUT.images)]) for i in range(start, start + n)
    ]
    await asyncio.to_thread(sensor.publish_many, "sensors/cam-1/digits", frames)


@pytest.mark.slow
def test_db_and_wal_never_pass_105_percent_of_a_1mib_bound_through_a_4mib_outage_and_drain(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    bound = MiB

    async def scenario() -> None:
        with TcpProxy(mosquitto.host, mosquitto.port) as proxy:
            async with running_node(
                mosquitto,
                uplink=uplink_through(proxy),
                storage={"outbox_max_bytes": bound, "synchronous": "NORMAL"},
                health={"uplink_grace_s": 0.3},
            ) as h:
                node = h.node
                sensor = mqtt_probe()
                with SizeSampler(_outbox_path(node)) as sampler:
                    proxy.cut()
                    await eventually(
                        lambda: "uplink_down" in node.reasons, "uplink_down", timeout_s=20
                    )
                    sent = 0
                    while node.outbox.stats().appended_bytes < 4 * bound:  # 4 MiB produced
                        await _feed(sensor, sent, 1000)
                        sent += 1000
                        await _at_least(lambda: node.stats.results_stored, sent, "stored")
                    assert node.outbox.stats().evicted_total > 0  # the bound was reached
                    proxy.restore()  # the drain deletes and vacuums: sampled too
                    await eventually(
                        lambda: node.outbox.stats().rows == 0, "the drain", timeout_s=60
                    )
                peak = node.outbox.stats().peak_file_bytes
        assert sampler.samples >= 40
        assert sampler.largest <= 1.05 * bound, f"{sampler.largest} > 105 % of {bound}"
        # The outbox's own peak (each commit and checkpoint) sees at least what the sampler saw.
        assert sampler.largest <= peak <= 1.05 * bound
        assert sampler.largest > 0.7 * bound  # the file did fill its bound

    asyncio.run(scenario())


def _reasons(h: Harness) -> list[str]:
    return list(h.node.reasons)


def _fill(path: Path) -> None:
    """Take every free byte of the file system (the last write or the close fails)."""
    try:
        with path.open("ab") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass


@pytest.mark.slow
def test_a_2mib_volume_with_the_default_bound_is_never_filled_by_the_wal_and_recovers_when_freed(
    mosquitto: BrokerInfo,
    mqtt_probe: ProbeFactory,
    small_filesystem: Callable[[str], Path],
) -> None:
    """The default bound (256 MiB) on a 2 MiB volume, 1 MiB of it another file's. Before
    ADR 0075 the node's own WAL (checkpointed only at 4 MiB) filled the volume and the node
    stayed ``storage_full`` for good, even after the other file was removed."""
    state = small_filesystem("2m")
    filler = state / "filler"
    filler.write_bytes(b"\0" * MiB)

    async def scenario() -> None:
        with TcpProxy(mosquitto.host, mosquitto.port) as proxy:
            async with running_node(
                mosquitto,
                uplink=uplink_through(proxy),
                storage={"state_dir": str(state)},
                health={"uplink_grace_s": 0.3},
            ) as h:
                node = h.node
                sensor = mqtt_probe()
                # 1. Uplink up: results are stored and delivered, ~3x what the volume has free
                # goes through the outbox, its answered keys and its WAL.
                sent = 0
                while node.outbox.stats().appended_bytes < 3 * MiB:
                    await _feed(sensor, sent, 1000)
                    sent += 1000
                    await _at_least(lambda: node.stats.results_stored, sent, "stored")
                assert node.stats.results_stored == sent
                assert node.outbox.stats().storage_full == 0
                assert "storage_full" not in _reasons(h)

                # 2. Uplink down: the results wait on the volume until it is full.
                proxy.cut()
                await eventually(lambda: "uplink_down" in node.reasons, "uplink_down", timeout_s=20)
                while "storage_full" not in _reasons(h):
                    before = node.stats.results_out
                    await _feed(sensor, sent, 200)
                    sent += 200
                    await _at_least(lambda: node.stats.results_out, before + 200, "answered")
                stored = node.stats.results_stored

                # 3. Space is freed: the node stores results again within 60 s (a telemetry
                # window, 10 s, or the next frame finds out).
                filler.unlink()
                await _feed(sensor, sent, 10)
                sent += 10
                await eventually(
                    lambda: "storage_full" not in _reasons(h), "storage_full to clear", timeout_s=60
                )
                await eventually(
                    lambda: node.stats.results_stored > stored, "results stored", timeout_s=60
                )

                # 4. The uplink is back: what waited is delivered and the outbox empties.
                proxy.restore()
                await eventually(lambda: node.outbox.stats().rows == 0, "the drain", timeout_s=60)
                assert _reasons(h) == []

    asyncio.run(scenario())
