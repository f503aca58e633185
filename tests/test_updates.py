"""The node's updater against a real Mosquitto: each attack refused with its reason, the active
model and the trusted state on disk byte-identical afterwards; good updates activate and commit;
failed probation rolls back; commands are verified and not replayed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_node.hardware import NodeHardware
from edge_node.updates import UpdateManager, UpdatesConfig
from edgewise.assets import bundled_asset
from edgewise.local_broker import BrokerInfo, MosquittoProcess
from edgewise.mqtt import MqttSession
from edgewise.releases import Command, Manifest, Target, UpdateEvent, decode_event, generate, sign
from edgewise.releases.cohort import cohort_point
from edgewise.releases.signing import public_pem
from edgewise.serving.model import ServedModel
from schemas import Topics
from tests.nodeharness import Recorder, mqtt_for
from tests.updatekit import (
    CLOUD_MODEL,
    DAY,
    HOLDOUT,
    NOW,
    Fleet,
    chunks,
    collapsed_model,
    constant_model,
    hardware,
    manifest,
    nan_model,
    retagged,
    run_async,
    unloadable_model,
    wrong_input_model,
)
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(60)
CONFIG_MODEL = bundled_asset("digits_edge.onnx")


def state_digest(state_dir: Path) -> dict[str, str]:
    """The trusted state and the active model: keys.signed, state.json and artifacts/*."""
    out: dict[str, str] = {}
    artifacts = sorted((state_dir / "artifacts").glob("*"))
    for path in [state_dir / "keys.signed", state_dir / "state.json", *artifacts]:
        if path.exists():
            out[str(path.relative_to(state_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclass
class Updater:
    manager: UpdateManager
    operator: MqttSession
    seen: Recorder
    topics: Topics
    node_id: str
    served: list[ServedModel]
    fleet: Fleet
    state_dir: Path

    def events(self) -> list[UpdateEvent]:
        # The last event is retained: what an earlier run said is not news.
        got = self.seen.by_topic[self.topics.events(self.node_id)]
        return [decode_event(m.payload) for m in got if not m.retain]

    def kinds(self) -> list[str]:
        return [e.kind if e.reason is None else f"{e.kind}:{e.reason}" for e in self.events()]

    async def wait_kind(self, kind: str, timeout_s: float = 20.0, count: int = 1) -> UpdateEvent:
        await self.seen.wait_for(lambda: self.kinds().count(kind) >= count, timeout_s)
        return [e for e in self.events() if kind.startswith(e.kind)][-1]

    async def publish_keys(self, data: bytes) -> None:
        await self.operator.publish(self.topics.fleet_keys(), data, retain=True)

    async def publish_manifest(self, data: bytes, hw_class: str = "cpu") -> None:
        await self.operator.publish(self.topics.fleet_model(hw_class, "digits"), data, retain=True)

    async def publish_chunks(self, sha256: str, parts: list[bytes]) -> None:
        await asyncio.gather(
            *(
                self.operator.publish(self.topics.model_chunk(sha256, i), part, retain=True)
                for i, part in enumerate(parts)
            )
        )

    async def release(self, m: Manifest, artifact: bytes, key: Any = None) -> bytes:
        data = sign(m, key or self.fleet.release)
        await self.publish_chunks(m.sha256, chunks(artifact, m.chunk_bytes))
        await self.publish_manifest(data)
        return data

    async def send_command(self, data: bytes) -> None:
        await self.operator.publish(self.topics.cmd(self.node_id), data)

    def feed(self, n: int = 1) -> None:
        """n batches of 16 holdout images through the served model, into probation."""
        for i in range(n):
            batch = HOLDOUT.images[(i * 16) % 500 : (i * 16) % 500 + 16]
            self.manager.observe(self.served[0].predict(batch), count=16, latency_s=0.001)


def _config(root_pem: Path, **kw: Any) -> UpdatesConfig:
    settings: dict[str, Any] = {
        "root_key": str(root_pem),
        "probation_s": 0.3,
        "probation_min_inferences": 0,
        "download_timeout_s": 20.0,
    }
    settings.update(kw)
    return UpdatesConfig(**settings)


@contextlib.asynccontextmanager
async def running_updater(
    broker: BrokerInfo,
    tmp_path: Path,
    fleet: Fleet,
    *,
    topics: Topics | None = None,
    node_id: str | None = None,
    clock: Callable[[], float] = lambda: NOW,
    publish_keys: bool = True,
    hw: NodeHardware | None = None,
    **cfg: Any,
) -> AsyncIterator[Updater]:
    node_id = node_id or f"gw-{uuid.uuid4().hex[:6]}"
    if topics is None:
        tag = uuid.uuid4().hex[:8]
        topics = Topics(
            fleet_root=f"fleet-{tag}", models_root=f"models-{tag}", edge_root=f"edge-{tag}"
        )
    root_pem = tmp_path / "root.pub"
    root_pem.write_bytes(public_pem(fleet.root))
    mqtt = mqtt_for(broker)
    state_dir = tmp_path / "updates"
    served: list[ServedModel] = []

    def swap(new: ServedModel) -> ServedModel:
        old = served[0]
        served[0] = new
        return old

    manager = UpdateManager(
        _config(root_pem, **cfg),
        node_id=node_id,
        hardware=hw or hardware(),
        mqtt=mqtt,
        topics=topics,
        state_dir=state_dir,
        model_name="digits",
        model_release=1,
        model_path=CONFIG_MODEL,
        swap=swap,
        clock=clock,
    )
    booted = manager.boot()
    served.append(
        booted
        or ServedModel.load(
            str(CONFIG_MODEL),
            name="digits",
            release=1,
            output="probabilities",
            providers=("CPUExecutionProvider",),
            intra_op_threads=1,
        )
    )
    seen = Recorder()
    async with (
        MqttSession(
            mqtt, client_id=f"probe-{node_id}", on_message=seen, manual_ack=False, persistent=False
        ) as probe,
        MqttSession(mqtt, client_id=f"op-{node_id}", persistent=False) as operator,
    ):
        subscribed = probe.subscribe(topics.events(node_id))
        await probe.wait_connected(5)
        await operator.wait_connected(5)
        await subscribed  # the probe's SUBACK: the events that follow are seen
        u = Updater(manager, operator, seen, topics, node_id, served, fleet, state_dir)
        if publish_keys:
            await u.publish_keys(fleet.signed_key_set())
        async with manager:
            if publish_keys:
                await u.wait_kind("keys_updated") if manager.held.keys is None else None
            yield u
    for m in served:
        m.close()


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


def _release_of(u: Updater) -> int:
    return u.served[0].release


# ----------------------------------------------------------------------------- good updates
@run_async
async def test_good_update_downloads_validates_swaps_and_commits(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    async with running_updater(mosquitto, tmp_path, fleet) as u:
        m = manifest(CLOUD_MODEL, release=2)
        assert m.chunks == 4
        await u.release(m, CLOUD_MODEL)
        await u.wait_kind("committed")
        assert u.kinds() == [
            "keys_updated",
            "downloading",
            "verified",
            "validating",
            "activated",
            "committed",
        ]
        assert _release_of(u) == 2
        artifact = u.state_dir / "artifacts" / f"{m.sha256}.onnx"
        assert artifact.read_bytes() == CLOUD_MODEL
        assert u.manager.active is not None and u.manager.active.release == 2
        assert not (u.state_dir / "pending.json").exists()
        assert not list((u.state_dir / "partial").iterdir())


@run_async
async def test_replay_after_restart_rejected(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    topics = Topics(fleet_root=f"f{uuid.uuid4().hex[:6]}", models_root=f"m{uuid.uuid4().hex[:6]}")
    node_id = f"gw-{uuid.uuid4().hex[:6]}"
    old = manifest(CLOUD_MODEL, release=2)
    new_artifact = retagged(CLOUD_MODEL, "release three")
    newer = manifest(new_artifact, release=3)
    async with running_updater(mosquitto, tmp_path, fleet, topics=topics, node_id=node_id) as u:
        old_signed = await u.release(old, CLOUD_MODEL)
        await u.wait_kind("committed")
        await u.release(newer, new_artifact)
        await u.wait_kind("committed", count=2)
    before = state_digest(tmp_path / "updates")
    async with running_updater(
        mosquitto, tmp_path, fleet, topics=topics, node_id=node_id, publish_keys=False
    ) as u:
        assert _release_of(u) == 3  # booted from the persisted active artifact
        await u.publish_manifest(old_signed)  # the attacker replays release 2, retained
        event = await u.wait_kind("rejected:older_release")
        assert event.release is None
        assert _release_of(u) == 3
        assert state_digest(u.state_dir) == before


@run_async
async def test_manifest_thresholds_go_with_the_model_across_a_restart(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    topics = Topics(fleet_root=f"f{uuid.uuid4().hex[:6]}", models_root=f"m{uuid.uuid4().hex[:6]}")
    node_id = f"gw-{uuid.uuid4().hex[:6]}"
    m = manifest(CLOUD_MODEL, thresholds={"escalate_below": 0.6, "margin_below": 0.2})
    async with running_updater(mosquitto, tmp_path, fleet, topics=topics, node_id=node_id) as u:
        await u.release(m, CLOUD_MODEL)
        await u.wait_kind("committed")
        assert u.served[0].thresholds == {"escalate_below": 0.6, "margin_below": 0.2}
    async with running_updater(
        mosquitto, tmp_path, fleet, topics=topics, node_id=node_id, publish_keys=False
    ) as u:
        assert _release_of(u) == 2
        assert u.served[0].thresholds == {"escalate_below": 0.6, "margin_below": 0.2}


# ----------------------------------------------------------------------------- attacks
def _signed(f: Fleet, m: Manifest, key: Any = None) -> bytes:
    return sign(m, key or f.release)


def _other_bytes(f: Fleet) -> bytes:
    from edgewise.releases import decode_envelope, encode
    from edgewise.releases.wire import Envelope

    good = decode_envelope(_signed(f, manifest(CLOUD_MODEL, release=2)))
    other = decode_envelope(_signed(f, manifest(CLOUD_MODEL, release=7)))
    return encode(Envelope(kind="manifest", payload=other.payload, sigs=good.sigs))


def _truncated(f: Fleet) -> bytes:
    import msgspec

    from edgewise.releases import decode_envelope

    env = decode_envelope(_signed(f, manifest(CLOUD_MODEL)))
    return msgspec.msgpack.encode(
        {
            "kind": "manifest",
            "payload": env.payload,
            "sigs": [[env.sigs[0].k, env.sigs[0].s[:32]]],
            "v": 1,
        }
    )


def _outside_cohort(f: Fleet, node_id: str) -> bytes:
    point = cohort_point(node_id, "digits", 2)
    return _signed(f, manifest(CLOUD_MODEL, rollout_percent=point))


ATTACKS: dict[str, tuple[Callable[[Fleet, str], bytes], str]] = {
    "unknown_key": (lambda f, n: _signed(f, manifest(CLOUD_MODEL), generate()), "unknown_key"),
    "signature_over_other_bytes": (lambda f, n: _other_bytes(f), "bad_signature"),
    "truncated_signature": (lambda f, n: _truncated(f), "malformed"),
    "older_release": (lambda f, n: _signed(f, manifest(CLOUD_MODEL, release=0)), "older_release"),
    "same_release": (lambda f, n: _signed(f, manifest(CLOUD_MODEL, release=1)), "same_release"),
    "expired_manifest": (
        lambda f, n: _signed(f, manifest(CLOUD_MODEL, now=NOW - 8 * DAY)),
        "expired",
    ),
    "wrong_hardware_class": (
        lambda f, n: _signed(f, manifest(CLOUD_MODEL, hw_classes=("edgetpu",))),
        "wrong_hardware_class",
    ),
    "outside_the_cohort": (_outside_cohort, "outside_cohort"),
    "declared_size_over_the_node_cap": (
        lambda f, n: _signed(f, manifest(CLOUD_MODEL + b"\x00" * 300_000)),
        "size_exceeded",
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@run_async
async def test_attack_rejected_and_state_unchanged(
    attack: str, mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    build, reason = ATTACKS[attack]
    async with running_updater(mosquitto, tmp_path, fleet, max_artifact_bytes=400_000) as u:
        before = state_digest(u.state_dir)
        await u.publish_chunks(manifest(CLOUD_MODEL).sha256, chunks(CLOUD_MODEL))
        await u.publish_manifest(build(fleet, u.node_id))
        await u.wait_kind(f"rejected:{reason}")
        assert state_digest(u.state_dir) == before
        assert _release_of(u) == 1
        assert "downloading" not in u.kinds()


@run_async
async def test_revoked_key_rejected(mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet) -> None:
    async with running_updater(mosquitto, tmp_path, fleet) as u:
        rotated = generate()
        await u.publish_keys(fleet.signed_key_set(rotated, version=2, revoked=[fleet.release]))
        await u.wait_kind("keys_updated", count=2)
        before = state_digest(u.state_dir)
        await u.release(manifest(CLOUD_MODEL), CLOUD_MODEL, key=fleet.release)
        await u.wait_kind("rejected:revoked_key")
        assert state_digest(u.state_dir) == before
        assert _release_of(u) == 1


@run_async
async def test_key_set_rollback_and_forgery_rejected(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    async with running_updater(mosquitto, tmp_path, fleet) as u:
        await u.publish_keys(fleet.signed_key_set(version=5))
        await u.wait_kind("keys_updated", count=2)
        before = state_digest(u.state_dir)
        await u.publish_keys(fleet.signed_key_set(generate(), version=4))
        await u.wait_kind("keys_rejected:key_set_rollback")
        forged = sign(fleet.key_set(generate(), version=9), fleet.release)
        await u.publish_keys(forged)
        await u.wait_kind("keys_rejected:key_set_bad_signature")
        assert state_digest(u.state_dir) == before


@run_async
async def test_expired_key_set_rejected(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    now = [NOW]
    async with running_updater(mosquitto, tmp_path, fleet, clock=lambda: now[0]) as u:
        now[0] = NOW + 31 * DAY  # the held set (30 days) has expired
        before = state_digest(u.state_dir)
        m = manifest(CLOUD_MODEL, now=now[0])
        await u.release(m, CLOUD_MODEL)
        await u.wait_kind("rejected:key_set_expired")
        expired = fleet.signed_key_set(version=2, now=NOW, expires_at=NOW + DAY)
        await u.publish_keys(expired)
        await u.wait_kind("keys_rejected:key_set_expired")
        assert state_digest(u.state_dir) == before
        assert _release_of(u) == 1


# ----------------------------------------------------------------------------- download
@run_async
async def test_tampered_chunk_rejected(mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet) -> None:
    async with running_updater(mosquitto, tmp_path, fleet) as u:
        before = state_digest(u.state_dir)
        m = manifest(CLOUD_MODEL)
        parts = chunks(CLOUD_MODEL)
        bad = bytearray(parts[1])
        bad[100] ^= 0xFF
        parts[1] = bytes(bad)
        await u.publish_chunks(m.sha256, parts)
        await u.publish_manifest(sign(m, fleet.release))
        await u.wait_kind("rejected:hash_mismatch")
        assert state_digest(u.state_dir) == before
        assert _release_of(u) == 1
        assert not list((u.state_dir / "staged").iterdir())


@run_async
async def test_artifact_swapped_for_another_validly_hashed_one_rejected(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    a = retagged(CLOUD_MODEL, "artifact-A")
    b = retagged(CLOUD_MODEL, "artifact-B")  # same length, valid model, its own hash
    assert len(a) == len(b) and a != b
    async with running_updater(mosquitto, tmp_path, fleet) as u:
        before = state_digest(u.state_dir)
        m = manifest(a)
        await u.publish_chunks(m.sha256, chunks(b))  # B's bytes where A's should be
        await u.publish_manifest(sign(m, fleet.release))
        await u.wait_kind("rejected:hash_mismatch")
        assert state_digest(u.state_dir) == before
        assert _release_of(u) == 1


@pytest.mark.parametrize("how", ["longer_chunk", "endless_chunks"])
@run_async
async def test_declared_size_exceeded_rejected(
    how: str, mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    async with running_updater(mosquitto, tmp_path, fleet) as u:
        before = state_digest(u.state_dir)
        m = manifest(CLOUD_MODEL)
        parts = chunks(CLOUD_MODEL)
        if how == "longer_chunk":
            parts[-1] = parts[-1] + b"\x00" * 70_000
        else:
            parts += [b"\x00" * m.chunk_bytes] * 5  # data past the declared size
            parts = parts[1:2] + parts[4:]  # some real chunks missing: only the excess can finish
        if how == "endless_chunks":
            for i, part in enumerate(parts):
                index = 1 if i == 0 else i + 3
                await u.operator.publish(u.topics.model_chunk(m.sha256, index), part, retain=True)
        else:
            await u.publish_chunks(m.sha256, parts)
        await u.publish_manifest(sign(m, fleet.release))
        await u.wait_kind("rejected:size_exceeded")
        assert state_digest(u.state_dir) == before
        assert _release_of(u) == 1


@run_async
async def test_download_resumes_after_broker_restart(
    persistent_mosquitto: MosquittoProcess, tmp_path: Path, fleet: Fleet
) -> None:
    broker = persistent_mosquitto.info
    async with running_updater(broker, tmp_path, fleet) as u:
        m = manifest(CLOUD_MODEL)
        parts = chunks(CLOUD_MODEL)
        await u.operator.publish(u.topics.model_chunk(m.sha256, 0), parts[0], retain=True)
        await u.operator.publish(u.topics.model_chunk(m.sha256, 1), parts[1], retain=True)
        await u.publish_manifest(sign(m, fleet.release))
        await u.wait_kind("downloading")
        partial = u.state_dir / "partial" / m.sha256
        await eventually(
            lambda: partial.exists() and len(list(partial.iterdir())) >= 2,
            "partial.exists() and len(list(partial.iterdir())) >= 2",
            timeout_s=20,
        )
        persistent_mosquitto.restart()
        async with asyncio.timeout(10):
            await u.operator.wait_disconnected()
        await u.operator.wait_connected(20)
        await u.operator.publish(u.topics.model_chunk(m.sha256, 2), parts[2], retain=True)
        await u.operator.publish(u.topics.model_chunk(m.sha256, 3), parts[3], retain=True)
        await u.wait_kind("committed", timeout_s=40)
        assert _release_of(u) == 2


# ----------------------------------------------------------------------------- validation
VALIDATION: dict[str, tuple[Callable[[], bytes], str]] = {
    "input_spec_mismatch": (wrong_input_model, "spec_mismatch"),
    "model_fails_to_load": (unloadable_model, "load_failed"),
    "model_outputs_nan": (nan_model, "non_finite_output"),
    "model_fails_the_golden_set": (constant_model, "golden_failed"),
}


@pytest.mark.parametrize("case", sorted(VALIDATION))
@run_async
async def test_validation_rejects(
    case: str, mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    build, reason = VALIDATION[case]
    artifact = build()
    async with running_updater(mosquitto, tmp_path, fleet) as u:
        before = state_digest(u.state_dir)
        # The manifest declares the spec the node serves; the artifact does not keep it.
        await u.release(manifest(artifact), artifact)
        await u.wait_kind(f"rejected:{reason}")
        assert state_digest(u.state_dir) == before
        assert _release_of(u) == 1
        assert not list((u.state_dir / "staged").iterdir())


@run_async
async def test_rejected_manifest_not_retried_or_reported_on_reconnect(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    topics = Topics(fleet_root=f"f{uuid.uuid4().hex[:6]}", models_root=f"m{uuid.uuid4().hex[:6]}")
    node_id = f"gw-{uuid.uuid4().hex[:6]}"
    artifact = constant_model()
    async with running_updater(mosquitto, tmp_path, fleet, topics=topics, node_id=node_id) as u:
        await u.release(manifest(artifact), artifact)
        await u.wait_kind("rejected:golden_failed")
    async with running_updater(
        mosquitto, tmp_path, fleet, topics=topics, node_id=node_id, publish_keys=False
    ) as u:
        # The retained manifest arrives again and is looked at, then skipped.
        await eventually(
            lambda: u.manager.stats.manifests_skipped >= 1,
            "u.manager.stats.manifests_skipped >= 1",
            timeout_s=20,
        )
        # A marker event after it: anything the manifest caused would have come before.
        cmd = Command(id=uuid.uuid4().hex, name="recycle_session", issued_at=NOW,
                      expires_at=NOW + 60, target=Target(node=node_id))  # fmt: skip
        await u.send_command(sign(cmd, fleet.release))
        await u.wait_kind("command_rejected:unsupported_command")
        assert [k for k in u.kinds() if k.startswith("rejected") or k == "downloading"] == []


# ----------------------------------------------------------------------------- probation
@run_async
async def test_model_fails_probation_rolls_back(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    artifact = collapsed_model()
    async with running_updater(
        mosquitto, tmp_path, fleet, probation_s=30.0, probation_min_inferences=64
    ) as u:
        original = u.served[0]
        before = state_digest(u.state_dir)
        await u.release(manifest(artifact), artifact)
        await u.wait_kind("activated")
        assert _release_of(u) == 2
        u.feed(4)  # 64 inferences at ~0.12 mean confidence
        event = await u.wait_kind("rolled_back:probation_failed")
        assert "confidence" in event.detail
        assert u.served[0] is original
        assert u.manager.active is None
        assert sorted(p.name for p in (u.state_dir / "artifacts").iterdir()) == []
        # Keys and artifacts byte-identical; the state names no model, only the floor moved
        # (release 2 was activated once: anti-rollback keeps it, `model rollback` goes above).
        after = state_digest(u.state_dir)
        assert {k: v for k, v in after.items() if k != "state.json"} == {
            k: v for k, v in before.items() if k != "state.json"
        }
        state = json.loads((u.state_dir / "state.json").read_bytes())
        assert state == {
            "active": None,
            "previous": None,
            "floor": {"digits": 2},
            "probation": None,
        }


def test_probation_judges_errors_non_finite_outputs_confidence_and_p99() -> None:
    from edge_node.updates.probation import ProbationWindow

    cfg = UpdatesConfig(
        probation_max_error_rate=0.1,
        probation_max_non_finite_rate=0.0,
        probation_min_mean_confidence=0.3,
        probation_max_p99_ms=50.0,
    )

    def window(**outcome: Any) -> ProbationWindow:
        w = ProbationWindow(cfg)
        w.observe(count=100, confidence_sum=90.0, latency_s=0.005)
        w.observe(**outcome)
        return w

    assert window(count=0).verdict() is None
    assert window(count=10).verdict() is None  # healthy
    assert "error rate" in str(window(count=30, failed=30).verdict())
    assert "non-finite" in str(window(count=1, non_finite=1, confidence_sum=0.0).verdict())
    assert "confidence collapsed" in str(window(count=400, confidence_sum=4.0).verdict())
    assert "p99 latency" in str(window(count=10, confidence_sum=9.0, latency_s=0.2).verdict())


@run_async
async def test_failed_inferences_in_probation_roll_back(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    async with running_updater(
        mosquitto, tmp_path, fleet, probation_s=30.0, probation_min_inferences=32
    ) as u:
        original = u.served[0]
        await u.release(manifest(CLOUD_MODEL), CLOUD_MODEL)
        await u.wait_kind("activated")
        u.feed(1)
        u.manager.observe(None, count=16, latency_s=0.001)  # a batch the new session failed
        event = await u.wait_kind("rolled_back:probation_failed")
        assert "error rate 16/32" in event.detail
        assert u.served[0] is original
        assert _release_of(u) == 1


@run_async
async def test_good_update_passes_probation_on_traffic(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    async with running_updater(
        mosquitto, tmp_path, fleet, probation_s=0.2, probation_min_inferences=32
    ) as u:
        await u.release(manifest(CLOUD_MODEL), CLOUD_MODEL)
        await u.wait_kind("activated")
        u.feed(2)
        await u.wait_kind("committed")
        assert _release_of(u) == 2
        assert np.all(u.served[0].predict(HOLDOUT.images[:4]).finite)


# ----------------------------------------------------------------------------- commands
def _command(node_id: str, **kw: Any) -> Command:
    args: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "name": "set_threshold",
        "args": {"escalate_below": "0.7"},
        "issued_at": NOW,
        "expires_at": NOW + 600,
        "target": Target(node=node_id),
    }
    args.update(kw)
    return Command(**args)


@run_async
async def test_command_runs_once_and_replay_is_rejected(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    calls: list[dict[str, str]] = []
    async with running_updater(mosquitto, tmp_path, fleet) as u:
        u.manager.commands["set_threshold"] = lambda args: calls.append(dict(args)) or "ok"
        data = sign(_command(u.node_id), fleet.release)
        await u.send_command(data)
        await u.wait_kind("command_done")
        await u.send_command(data)
        await u.wait_kind("command_rejected:replayed")
        await u.send_command(sign(_command("someone-else"), fleet.release))
        await u.wait_kind("command_rejected:wrong_target")
        await u.send_command(sign(_command(u.node_id), generate()))
        await u.wait_kind("command_rejected:unknown_key")
        assert calls == [{"escalate_below": "0.7"}]


@run_async
async def test_command_for_the_hardware_class_runs_from_the_fleet_topic(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    calls: list[str] = []
    async with running_updater(mosquitto, tmp_path, fleet) as u:
        u.manager.commands["publish_telemetry"] = lambda args: calls.append("now") or "ok"
        cmd = _command("-", name="publish_telemetry", args={}, target=Target(hw_class="cpu"))
        await u.operator.publish(u.topics.fleet_cmd("cpu"), sign(cmd, fleet.release))
        await u.wait_kind("command_done")
        other = _command("-", target=Target(hw_class="edgetpu"))
        await u.operator.publish(u.topics.fleet_cmd("cpu"), sign(other, fleet.release))
        await u.wait_kind("command_rejected:wrong_target")
        assert calls == ["now"]


@run_async
async def test_download_timeout_is_reported_and_retried_after_a_reconnect(
    persistent_mosquitto: MosquittoProcess, tmp_path: Path, fleet: Fleet
) -> None:
    broker = persistent_mosquitto.info
    async with running_updater(broker, tmp_path, fleet, download_timeout_s=0.5) as u:
        before = state_digest(u.state_dir)
        m = manifest(CLOUD_MODEL)
        await u.publish_manifest(sign(m, fleet.release))  # no chunks anywhere
        await u.wait_kind("rejected:download_timeout")
        assert state_digest(u.state_dir) == before
        assert "seen.json" not in {p.name for p in u.state_dir.iterdir()}  # not remembered
        await u.publish_chunks(m.sha256, chunks(CLOUD_MODEL))
        persistent_mosquitto.restart()  # the next connect brings the retained manifest again
        await u.wait_kind("committed", timeout_s=40)
        assert _release_of(u) == 2


@run_async
async def test_corrupted_active_artifact_falls_back_at_boot(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    topics = Topics(fleet_root=f"f{uuid.uuid4().hex[:6]}", models_root=f"m{uuid.uuid4().hex[:6]}")
    node_id = f"gw-{uuid.uuid4().hex[:6]}"
    m = manifest(CLOUD_MODEL)
    async with running_updater(mosquitto, tmp_path, fleet, topics=topics, node_id=node_id) as u:
        await u.release(m, CLOUD_MODEL)
        await u.wait_kind("committed")
    artifact = tmp_path / "updates" / "artifacts" / f"{m.sha256}.onnx"
    artifact.write_bytes(artifact.read_bytes()[:-10])  # a bad sector, a half-written restore
    async with running_updater(
        mosquitto, tmp_path, fleet, topics=topics, node_id=node_id, publish_keys=False
    ) as u:
        assert _release_of(u) == 1
        assert u.manager.active is None
        await u.wait_kind("rolled_back:load_failed")


@run_async
async def test_widening_the_rollout_reaches_a_node_outside_the_first_cohort(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    async with running_updater(mosquitto, tmp_path, fleet) as u:
        point = cohort_point(u.node_id, "digits", 2)
        await u.release(manifest(CLOUD_MODEL, rollout_percent=point), CLOUD_MODEL)
        await u.wait_kind("rejected:outside_cohort")
        # `model promote`: the same release re-signed with a wider percent is a new manifest.
        await u.publish_manifest(sign(manifest(CLOUD_MODEL, rollout_percent=100.0), fleet.release))
        await u.wait_kind("committed")
        assert _release_of(u) == 2


@run_async
async def test_rollback_release_reuses_the_kept_previous_artifact(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    three = retagged(CLOUD_MODEL, "release three")
    async with running_updater(mosquitto, tmp_path, fleet) as u:
        await u.release(manifest(CLOUD_MODEL, release=2), CLOUD_MODEL)
        await u.wait_kind("committed")
        await u.release(manifest(three, release=3), three)
        await u.wait_kind("committed", count=2)
        kept = sorted(p.name for p in (u.state_dir / "artifacts").iterdir())
        assert len(kept) == 2  # active and previous
        # `model rollback`: release 4 = release 2's bytes. Its chunks are gone from the broker;
        # the node has them.
        old = manifest(CLOUD_MODEL, release=4)
        for i in range(old.chunks):
            await u.operator.publish(u.topics.model_chunk(old.sha256, i), b"", retain=True)
        await u.publish_manifest(sign(old, fleet.release))
        await u.wait_kind("committed", count=3)
        assert _release_of(u) == 4
        assert u.manager.active is not None and u.manager.active.sha256 == old.sha256


# ----------------------------------------------------------------------------- hardware class
async def _refused_before_download(
    u: Updater, m: Manifest, artifact: bytes, reason: str
) -> UpdateEvent:
    """Publish ``m`` with its chunks; it must be refused with ``reason`` before a chunk is
    fetched, leave the state on disk byte-identical, and be reported once only."""
    before = state_digest(u.state_dir)
    signed = await u.release(m, artifact)
    event = await u.wait_kind(f"rejected:{reason}")
    assert u.manager.stats.downloads == 0
    assert "downloading" not in u.kinds()
    assert not list((u.state_dir / "partial").iterdir())
    assert not list((u.state_dir / "staged").iterdir())
    assert state_digest(u.state_dir) == before
    assert _release_of(u) == 1
    await u.publish_manifest(signed)  # the same retained manifest again (as on a reconnect)
    await eventually(
        lambda: u.manager.stats.manifests_skipped >= 1,
        "u.manager.stats.manifests_skipped >= 1",
        timeout_s=20,
    )
    assert u.kinds().count(f"rejected:{reason}") == 1
    assert u.manager.stats.downloads == 0
    return event


@run_async
async def test_oversized_model_rejected_before_download(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    hw = hardware(max_model_bytes=len(CLOUD_MODEL) - 1)
    async with running_updater(mosquitto, tmp_path, fleet, hw=hw) as u:
        m = manifest(CLOUD_MODEL)
        event = await _refused_before_download(u, m, CLOUD_MODEL, "model_too_large")
        assert f"{len(CLOUD_MODEL)} bytes > max_model_bytes" in event.detail


@run_async
async def test_oversized_input_rejected_before_download(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    async with running_updater(mosquitto, tmp_path, fleet, hw=hardware(max_input_elements=63)) as u:
        event = await _refused_before_download(
            u, manifest(CLOUD_MODEL), CLOUD_MODEL, "input_too_large"
        )
        assert "64 input elements" in event.detail


@run_async
async def test_unbounded_input_dimension_rejected_before_download(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    async with running_updater(mosquitto, tmp_path, fleet) as u:
        m = manifest(CLOUD_MODEL, input_shape=(-1, -1, 8))
        event = await _refused_before_download(u, m, CLOUD_MODEL, "input_too_large")
        assert "dynamic dimension" in event.detail


@run_async
async def test_format_the_class_cannot_run_rejected_before_download(
    mosquitto: BrokerInfo, tmp_path: Path, fleet: Fleet
) -> None:
    async with running_updater(mosquitto, tmp_path, fleet) as u:  # generic-cpu: onnx only
        m = manifest(CLOUD_MODEL, format="tflite")
        event = await _refused_before_download(u, m, CLOUD_MODEL, "unsupported_format")
        assert "accepts onnx" in event.detail


def test_stored_artifacts_keep_the_suffix_their_runtime_is_picked_by(tmp_path: Path) -> None:
    from edge_node.updates.state import StateStore
    from edgewise.releases import MODEL_FORMATS, format_of

    store = StateStore(tmp_path)
    sha = "ab" * 32
    for fmt in MODEL_FORMATS:
        assert format_of(store.artifact_path(sha, fmt)) == fmt
        assert format_of(store.staged_path(sha, fmt)) == fmt
        assert store.artifact_path(sha, fmt).stem == sha  # what pruning keeps by
