"""Updates inside a running node: a good release rolls out under load with no gap and no failed
inference; a failing one rolls back; status reports the release served."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from pathlib import Path
from typing import Any

import pytest

from local_broker import BrokerInfo
from releases import decode_event, sign
from releases.signing import public_pem
from schemas import decode_results, decode_status
from tests.nodeharness import Harness, frame_bytes, running_node
from tests.updatekit import (
    CLOUD_MODEL,
    HOLDOUT,
    Fleet,
    chunks,
    collapsed_model,
    manifest,
    now,
    run_async,
)

pytestmark = pytest.mark.timeout(90)


def _settings(tmp_path: Path, fleet: Fleet, **updates: Any) -> dict[str, Any]:
    root = tmp_path / "root.pub"
    root.write_bytes(public_pem(fleet.root))
    tag = uuid.uuid4().hex[:8]
    return {
        "hardware_class": "cpu",
        "topics": {"fleet_root": f"fleet-{tag}", "models_root": f"models-{tag}"},
        "updates": {"root_key": str(root), **updates},
        "batching": {"max_wait_ms": 2.0},
    }


def _kinds(h: Harness) -> list[str]:
    out = []
    for m in h.messages("events"):
        if m.retain:
            continue
        e = decode_event(m.payload)
        out.append(e.kind if e.reason is None else f"{e.kind}:{e.reason}")
    return out


async def _publish_release(h: Harness, fleet: Fleet, artifact: bytes, release: int) -> None:
    topics = h.node.topics
    await h.sensor.publish(topics.fleet_keys(), fleet.signed_key_set(now=now()), retain=True)
    m = manifest(artifact, release=release, now=now())
    for i, part in enumerate(chunks(artifact, m.chunk_bytes)):
        await h.sensor.publish(topics.model_chunk(m.sha256, i), part, retain=True)
    await h.sensor.publish(topics.fleet_model("cpu", "digits"), sign(m, fleet.release), retain=True)


async def _traffic(h: Harness, stop: asyncio.Event, sent: list[int]) -> None:
    """20 frames per second until ``stop``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    seq = 0
    while not stop.is_set():
        await h.send(frame_bytes(seq, HOLDOUT.images[seq % len(HOLDOUT)]))
        sent.append(seq)
        seq += 1
        await asyncio.sleep(max(0.0, start + seq * 0.05 - loop.time()))


def _results(h: Harness) -> list[tuple[float, int, int]]:
    """(arrival time, frame seq, release) of every result, in arrival order."""
    got = []
    for m in h.messages("results"):
        for r in decode_results(m.payload).results:
            got.append((m.received_at, r.frame_seq, r.release))
    return got


@run_async
async def test_good_update_under_load_has_no_gap_and_no_failed_inference(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    fleet = Fleet()
    settings = _settings(tmp_path, fleet, probation_s=1.0, probation_min_inferences=10)
    async with running_node(mosquitto, **settings) as h:
        stop = asyncio.Event()
        sent: list[int] = []
        traffic = asyncio.create_task(_traffic(h, stop, sent))
        await h.seen.wait_for(lambda: len(_results(h)) >= 20)
        await _publish_release(h, fleet, CLOUD_MODEL, release=2)
        await h.seen.wait_for(lambda: "committed" in _kinds(h), 40)
        mark = len(_results(h))
        await h.seen.wait_for(lambda: len(_results(h)) >= mark + 20)
        stop.set()
        await traffic
        await h.seen.wait_for(lambda: {s for _, s, _ in _results(h)} >= set(sent), 20)
        results = _results(h)
        assert sorted(s for _, s, _ in results) == sent  # one result per frame, none failed
        assert h.node.stats.inference_errors == 0
        assert not h.messages("deadletter")
        times = [t for t, _, _ in results]
        gap = max(b - a for a, b in itertools.pairwise(times))
        print(f"largest gap between results during the update: {gap * 1000:.0f} ms")
        assert gap <= 1.0
        releases = [r for _, _, r in results]
        assert releases[0] == 1 and releases[-1] == 2
        assert releases == sorted(releases)  # no flapping back
        assert _kinds(h)[-5:] == ["downloading", "verified", "validating", "activated", "committed"]
        # Every event went through the node's outbox (issue 3: everything upstream does).
        assert h.node.outbox.stats().appended.get("event", 0) >= 5
        status = decode_status(h.messages("status")[-1].payload)
        assert status.release == 2


@run_async
async def test_model_that_fails_probation_in_the_node_rolls_back(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    fleet = Fleet()
    settings = _settings(tmp_path, fleet, probation_s=30.0, probation_min_inferences=20)
    async with running_node(mosquitto, **settings) as h:
        stop = asyncio.Event()
        sent: list[int] = []
        traffic = asyncio.create_task(_traffic(h, stop, sent))
        await _publish_release(h, fleet, collapsed_model(), release=2)
        await h.seen.wait_for(lambda: "rolled_back:probation_failed" in _kinds(h), 40)
        stop.set()
        await traffic
        await h.seen.wait_for(lambda: {s for _, s, _ in _results(h)} >= set(sent), 20)
        assert h.node.model.release == 1
        assert h.node.stats.inference_errors == 0
        assert decode_status(h.messages("status")[-1].payload).release == 1


def test_an_unloadable_root_key_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    from edge_node.config import NodeConfig
    from edge_node.errors import ConfigError

    bad = tmp_path / "root.pub"
    bad.write_text("not a key")
    for value in (str(bad), str(tmp_path / "missing.pub"), "ab" * 31):
        with pytest.raises(ConfigError) as info:
            NodeConfig.load(updates={"root_key": value})
        assert "updates.root_key" in str(info.value)
        assert "EDGEWISE_UPDATES__ROOT_KEY" in str(info.value)
