"""Updates inside a running node: a good release rolls out under load with no gap and no failed
inference; a failing one rolls back; status reports the release served."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgewise.local_broker import BrokerInfo
from edgewise.releases import decode_event, sign
from edgewise.releases.signing import public_pem
from schemas import decode_results, decode_status
from tests.nodeharness import Harness, frame_bytes, running_node
from tests.updatekit import (
    CLOUD_MODEL,
    EDGE_MODEL,
    HOLDOUT,
    Fleet,
    chunks,
    collapsed_model,
    manifest,
    now,
    retagged,
    run_async,
)
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(90)


def _settings(tmp_path: Path, fleet: Fleet, **updates: Any) -> dict[str, Any]:
    root = tmp_path / "root.pub"
    root.write_bytes(public_pem(fleet.root))
    tag = uuid.uuid4().hex[:8]
    return {
        "hardware_class": "generic-cpu",
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


async def _publish_release(
    h: Harness, fleet: Fleet, artifact: bytes, release: int, **manifest_fields: Any
) -> None:
    topics = h.node.topics
    await h.sensor.publish(topics.fleet_keys(), fleet.signed_key_set(now=now()), retain=True)
    fields: dict[str, Any] = {"hw_classes": ("generic-cpu",), **manifest_fields}
    m = manifest(artifact, release=release, now=now(), **fields)
    for i, part in enumerate(chunks(artifact, m.chunk_bytes)):
        await h.sensor.publish(topics.model_chunk(m.sha256, i), part, retain=True)
    await h.sensor.publish(
        topics.fleet_model("generic-cpu", "digits"), sign(m, fleet.release), retain=True
    )


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


def _edge_confidence() -> np.ndarray:
    import onnxruntime as ort

    (probs,) = ort.InferenceSession(EDGE_MODEL).run(None, {"image": HOLDOUT.images})
    return np.asarray(probs).max(axis=1)


@run_async
async def test_manifest_thresholds_and_set_threshold_command_steer_escalation(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    from edgewise.releases import Command, Target

    conf = _edge_confidence()
    # Unsure under the node's own policy (< 0.95), confident under the release's (< 0.5).
    middle = int(np.flatnonzero((conf >= 0.6) & (conf < 0.9))[0])
    fleet = Fleet()
    settings = _settings(tmp_path, fleet, probation_s=0.2, probation_min_inferences=0)
    escalation = {"enabled": True, "policy": {"max_softmax_below": 0.95, "deadline_ms": 300}}
    async with running_node(mosquitto, escalation=escalation, **settings) as h:
        esc = h.node.escalator
        assert esc is not None
        assert esc.policy("digits").max_softmax_below == 0.95

        async def answer(seq: int) -> str:
            await h.send(frame_bytes(seq, HOLDOUT.images[middle]))
            await h.seen.wait_for(lambda: any(s == seq for _, s, _ in _results(h)), 20)
            (source,) = {
                r.source
                for m in h.messages("results")
                for r in decode_results(m.payload).results
                if r.frame_seq == seq
            }
            return source

        assert await answer(1) != "edge"  # escalated (no worker here: a fallback)
        artifact = retagged(EDGE_MODEL, "same weights, release 2")
        await _publish_release(h, fleet, artifact, 2, thresholds={"escalate_below": 0.5})
        await h.seen.wait_for(lambda: "committed" in _kinds(h), 40)
        assert h.node.model.release == 2
        assert esc.policy("digits").max_softmax_below == 0.5
        assert await answer(2) == "edge"

        def command(**args: str) -> bytes:
            t = now()
            cmd = Command(id=uuid.uuid4().hex, name="set_threshold", args=args, issued_at=t,
                          expires_at=t + 60, target=Target(node=h.node_id))  # fmt: skip
            return sign(cmd, fleet.release)

        await h.sensor.publish(h.node.topics.cmd(h.node_id), command(escalate_below="0.99"))
        await h.seen.wait_for(lambda: "command_done" in _kinds(h), 20)
        assert esc.policy("digits").max_softmax_below == 0.99
        assert await answer(3) != "edge"
        # A bad one is refused with the reason and changes nothing.
        await h.sensor.publish(h.node.topics.cmd(h.node_id), command(escalate_above="0.1"))
        await h.seen.wait_for(lambda: "command_rejected:command_failed" in _kinds(h), 20)
        (refused,) = [
            e for m in h.messages("events") if not m.retain
            for e in [decode_event(m.payload)] if e.kind == "command_rejected"
        ]  # fmt: skip
        assert "unknown threshold 'escalate_above'" in refused.detail
        assert esc.policy("digits").max_softmax_below == 0.99


@run_async
async def test_pause_inference_holds_frames_and_resume_answers_each_once(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    from edgewise.releases import Command, Target

    fleet = Fleet()
    async with running_node(mosquitto, **_settings(tmp_path, fleet)) as h:
        await h.sensor.publish(
            h.node.topics.fleet_keys(), fleet.signed_key_set(now=now()), retain=True
        )
        await h.seen.wait_for(lambda: "keys_updated" in _kinds(h), 20)

        async def command(name: str) -> None:
            t = now()
            cmd = Command(id=uuid.uuid4().hex, name=name, issued_at=t, expires_at=t + 60,
                          target=Target(node=h.node_id))  # fmt: skip
            before = _kinds(h).count("command_done")
            await h.sensor.publish(h.node.topics.cmd(h.node_id), sign(cmd, fleet.release))
            await h.seen.wait_for(lambda: _kinds(h).count("command_done") > before, 20)

        def status() -> tuple[str, list[str]]:
            st = decode_status(h.messages("status")[-1].payload)
            return st.state, list(st.reasons)

        await command("pause_inference")
        await h.seen.wait_for(lambda: status() == ("degraded", ["inference_paused"]), 10)
        frames_before = h.node.stats.frames_in
        for seq in range(40):
            await h.send(frame_bytes(seq, HOLDOUT.images[seq]))
        # Nothing announces a frame taken in: poll the node's count.
        await eventually(
            lambda: h.node.stats.frames_in >= frames_before + 40, "40 frames in", timeout_s=20
        )
        assert _results(h) == []  # held, not answered
        assert h.node.inference_paused
        await command("resume_inference")
        await h.seen.wait_for(lambda: len({s for _, s, _ in _results(h)}) >= 40, 20)
        assert sorted(s for _, s, _ in _results(h)) == list(range(40))  # each once
        await h.seen.wait_for(lambda: status() == ("online", []), 10)
        assert h.node.stats.inference_errors == 0
        done = [decode_event(m.payload) for m in h.messages("events") if not m.retain]
        details = [e.detail for e in done if e.kind == "command_done"]
        assert details[-2].startswith("pause_inference: inference paused")
        assert details[-1].startswith("resume_inference: inference resumed")


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


def test_a_root_key_file_whose_path_is_64_characters_long_is_read_as_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 64-character value is hex only when it is 64 hex digits and names no file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge_node.updates.config import read_root_key

    root = Ed25519PrivateKey.generate()
    raw = root.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    monkeypatch.chdir(tmp_path)
    pem = Path("d" * (64 - len("/root.pub"))) / "root.pub"
    pem.parent.mkdir()
    pem.write_bytes(public_pem(root))
    assert len(str(pem)) == 64
    assert read_root_key(str(pem)) == raw
    assert read_root_key(raw.hex()) == raw
