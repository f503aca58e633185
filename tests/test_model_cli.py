"""`edgewise keys | model | cmd` against a real broker: keys on disk, signed payloads that verify,
promote refusing a failing cohort, rollback as a higher release, status, gc."""

from __future__ import annotations

import hashlib
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from edgewise.local_broker import BrokerInfo, MqttProbe
from edgewise.releases import (
    Command,
    KeySet,
    Manifest,
    UpdateEvent,
    decode_document,
    decode_envelope,
    encode_event,
    verify_command,
    verify_key_set,
    verify_manifest,
)
from edgewise.releases.signing import load_public, raw_public
from tests.cli_harness import init_keys, run
from tests.updatekit import CLOUD_MODEL, EDGE_MODEL, HOLDOUT, now

ProbeFactory = Callable[..., MqttProbe]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return init_keys(tmp_path / "keys")


@pytest.fixture
def roots() -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return ["--fleet-root", f"fleet-{tag}", "--models-root", f"models-{tag}"]


def _root(keys: Path) -> bytes:
    return raw_public(load_public((keys / "root.pub").read_bytes()))


def test_keys_init_writes_private_keys_0600_and_never_prints_them(tmp_path: Path) -> None:
    out = run("keys", "init", "--out-dir", str(tmp_path / "k"))
    private = sorted((tmp_path / "k").glob("*.key"))
    assert len(private) == 2
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        body = path.read_text().splitlines()[1]
        assert body not in out
    assert "PRIVATE" not in out
    assert "updates.root_key" in out
    # A second init into the same place refuses instead of overwriting the root key.
    again = run("keys", "init", "--out-dir", str(tmp_path / "k"), code=2)
    assert "already holds keys" in again


def test_key_set_versions_grow_with_rotate_and_revoke(keys: Path, tmp_path: Path) -> None:
    sets: list[KeySet] = []
    held = None
    for step in (["publish-set"], ["rotate"], ["revoke", "REPLACE"]):
        if step[-1] == "REPLACE":
            step[-1] = sets[-1].keys[0].id
        out_file = tmp_path / f"set-{len(sets)}.bin"
        run("keys", *step, "-k", str(keys), "--out", str(out_file))
        verdict = verify_key_set(
            out_file.read_bytes(), root_public=_root(keys), held=held, now=now()
        )
        held = verdict.key_set
        sets.append(held)
    assert [s.version for s in sets] == [1, 2, 3]
    assert len(sets[1].keys) == 2
    assert [k.id for k in sets[2].keys] == [sets[1].keys[1].id]
    assert sets[2].revoked == [sets[1].keys[0].id]


def test_model_publish_out_writes_verifiable_payloads(keys: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(CLOUD_MODEL)
    run("keys", "publish-set", "-k", str(keys), "--out", str(tmp_path / "set.bin"))
    key_set = verify_key_set((tmp_path / "set.bin").read_bytes(), root_public=_root(keys),
                             held=None, now=now()).key_set  # fmt: skip
    out = tmp_path / "out"
    run("model", "publish", str(model), "--name", "digits", "--release", "4", "--hw-class",
        "generic-cpu", "--hw-class", "x86-cpu-gateway", "--rollout", "100", "--threshold",
        "escalate_below=0.8",
        "-k", str(keys), "--out", str(out), "--chunk-kib", "64")  # fmt: skip
    verdict = verify_manifest(
        (out / "manifest-x86-cpu-gateway.bin").read_bytes(), keys=key_set, node_id="n1",
        hw_class="x86-cpu-gateway",
        floor=1, installed_sha256=None, now=now(),
    )  # fmt: skip
    m = verdict.manifest
    assert (m.release, m.size, m.hw_classes) == (
        4,
        len(CLOUD_MODEL),
        ["generic-cpu", "x86-cpu-gateway"],
    )
    assert m.format == "onnx"  # from the file's suffix
    assert m.thresholds == {"escalate_below": 0.8}
    assert (m.input.dtype, m.input.shape, m.output.shape) == ("float32", [-1, 8, 8], [-1, 10])
    joined = b"".join((out / "chunks" / f"{i}.bin").read_bytes() for i in range(m.chunks))
    assert hashlib.sha256(joined).hexdigest() == m.sha256
    assert os.access(out / "publish.sh", os.X_OK)


def test_model_publish_refuses_a_file_that_is_not_a_model(keys: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    out = run("model", "publish", str(bad), "--name", "d", "--release", "2", "--hw-class",
              "generic-cpu",
              "-k", str(keys), "--out", str(tmp_path / "o"), code=2)  # fmt: skip
    assert "not a model a node can load" in out


def test_model_publish_refuses_a_file_whose_suffix_names_no_format(
    keys: Path, tmp_path: Path
) -> None:
    model = tmp_path / "digits.model"  # an ONNX model under a name that says nothing
    model.write_bytes(CLOUD_MODEL)
    out = run("model", "publish", str(model), "--name", "d", "--release", "2", "--hw-class",
              "generic-cpu", "-k", str(keys), "--out", str(tmp_path / "o"), code=2)  # fmt: skip
    assert "end in .onnx or .tflite" in out
    assert not (tmp_path / "o").exists()


def test_publish_promote_rollback_status_gc_against_a_broker(
    keys: Path,
    tmp_path: Path,
    mosquitto: BrokerInfo,
    mqtt_probe: ProbeFactory,
    roots: list[str],
) -> None:
    broker = ["--broker", mosquitto.url]
    first, second = tmp_path / "r2.onnx", tmp_path / "r3.onnx"
    first.write_bytes(EDGE_MODEL)
    second.write_bytes(CLOUD_MODEL)
    golden = tmp_path / "golden.npz"
    import numpy as np

    np.savez(golden, images=HOLDOUT.images[:50], labels=HOLDOUT.labels[:50])
    common = ["--name", "digits", "--hw-class", "generic-cpu", "-k", str(keys), *broker, *roots]
    run("model", "publish", str(first), "--release", "2", "--golden", str(golden), *common)
    out = run("model", "publish", str(second), "--release", "3", "--rollout", "10", *common)
    assert "rollout 10%" in out
    fleet_root, models_root = roots[1], roots[3]
    watcher = mqtt_probe()
    watcher.subscribe(f"{fleet_root}/generic-cpu/models/digits")
    (retained,) = watcher.wait_for(lambda m: m.retain, 5)
    current = decode_document(decode_envelope(retained.payload), Manifest)
    assert (current.release, current.rollout_percent) == (3, 10.0)

    # A node of the cohort rolled release 3 back: promote refuses, then --force goes through.
    edge_root = f"edge-{uuid.uuid4().hex[:6]}"
    reporter = mqtt_probe()
    failed = UpdateEvent(id="e1", node="gw-9", ts=now(), kind="rolled_back", model="digits",
                         release=3, running_release=2, reason="probation_failed")  # fmt: skip
    reporter.publish(f"{edge_root}/gw-9/events", encode_event(failed), retain=True)
    promote = ["model", "promote", "--name", "digits", "--rollout", "50", "-k", str(keys),
               *broker, *roots[:2], "--edge-root", edge_root, "--settle-s", "0.5"]  # fmt: skip
    refused = run(*promote, code=1)
    assert "failure rate 100%" in refused
    run(*promote, "--force")
    watcher.wait_for(
        lambda m: decode_document(decode_envelope(m.payload), Manifest).rollout_percent == 50.0, 5
    )

    table = run("model", "status", "--name", "digits", *broker, "--edge-root", edge_root,
                "--settle-s", "0.5")  # fmt: skip
    assert "gw-9" in table and "probation_failed" in table

    # Rollback: a higher release with the old bytes.
    run("model", "rollback", "--name", "digits", "-k", str(keys), *broker, *roots)
    rolled = watcher.wait_for(
        lambda m: decode_document(decode_envelope(m.payload), Manifest).release == 4, 5
    )
    back = decode_document(decode_envelope(rolled[-1].payload), Manifest)
    assert back.sha256 == hashlib.sha256(EDGE_MODEL).hexdigest()
    assert back.golden is not None  # the old release's validation data came along

    # gc: release 4 (= release 2's bytes) is current and release 3's bytes its rollback target;
    # an orphan artifact's chunks go.
    orphan = "ab" * 32
    reporter.publish(f"{models_root}/{orphan}/0", b"junk", retain=True)
    out = run("model", "gc", "-k", str(keys), *broker, *roots, "--settle-s", "0.5")
    assert "clearing " + orphan in out
    assert hashlib.sha256(EDGE_MODEL).hexdigest() not in out.split("artifacts in use")[0]
    late = mqtt_probe()
    late.subscribe(f"{models_root}/+/+")
    kept = late.wait_for(lambda m: m.retain, 5, count=3)  # 1 + 2 chunks of 128 KiB
    assert {m.topic.split("/")[1] for m in kept} == {
        hashlib.sha256(EDGE_MODEL).hexdigest(),
        hashlib.sha256(CLOUD_MODEL).hexdigest(),
    }


def test_cmd_send_out_is_a_signed_command_for_that_node(keys: Path, tmp_path: Path) -> None:
    run("keys", "publish-set", "-k", str(keys), "--out", str(tmp_path / "set.bin"))
    key_set = verify_key_set((tmp_path / "set.bin").read_bytes(), root_public=_root(keys),
                             held=None, now=now()).key_set  # fmt: skip
    out = run("cmd", "send", "--node", "gw-3", "set_threshold", "escalate_below=0.8",
              "-k", str(keys), "--out", str(tmp_path / "cmd.bin"))  # fmt: skip
    assert "mosquitto_pub" in out
    cmd = verify_command((tmp_path / "cmd.bin").read_bytes(), keys=key_set, node_id="gw-3",
                         hw_class="cpu", seen_ids=set(), now=now())  # fmt: skip
    assert isinstance(cmd, Command)
    assert (cmd.name, cmd.args, cmd.target.node) == (
        "set_threshold",
        {"escalate_below": "0.8"},
        "gw-3",
    )
    assert "exactly one" in run("cmd", "send", "recycle_session", "-k", str(keys), code=2)
    assert "unknown command" in run("cmd", "send", "--node", "x", "reboot", "-k", str(keys), code=2)


def test_cmd_send_reaches_the_node_topic(
    keys: Path, mosquitto: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    edge_root = f"edge-{uuid.uuid4().hex[:6]}"
    probe = mqtt_probe()
    probe.subscribe(f"{edge_root}/gw-4/cmd")
    run("cmd", "send", "--node", "gw-4", "recycle_session", "-k", str(keys), "--broker",
        mosquitto.url, "--edge-root", edge_root)  # fmt: skip
    (msg,) = probe.wait_for(lambda m: True, 5)
    assert not msg.retain
    assert decode_document(decode_envelope(msg.payload), Command).name == "recycle_session"
