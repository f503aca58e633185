"""Updates in `edgewise node` as a real process: kill -9 at each update step, and a release
published with nothing but `edgewise ... --out` files and `mosquitto_pub -r -f`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgewise.local_broker import BrokerInfo, Message, MqttProbe
from edgewise.releases import sign
from edgewise.releases.signing import public_pem
from schemas import decode_results, decode_status
from tests.nodeharness import frame_bytes
from tests.nodeprocs import EnrolledNodes, event_kind, is_event, online
from tests.updatekit import CLOUD_MODEL, HOLDOUT, Fleet, chunks, manifest, now
from tests.waiting import eventually_sync

pytestmark = pytest.mark.timeout(120)
Start = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def roots() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"fleet": f"fleet-{tag}", "models": f"models-{tag}"}


@pytest.fixture
def start_node(
    mosquitto: BrokerInfo, tmp_path: Path, roots: dict[str, str]
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    nodes = EnrolledNodes(mosquitto, tmp_path, roots["fleet"], roots["models"])
    yield nodes.start
    nodes.kill_all()


def _check_one_complete_model(state_dir: Path) -> int:
    """The persisted state names at most one active artifact, complete and hashing right;
    return its release (1: the configured model)."""
    state_file = state_dir / "state.json"
    if not state_file.exists():
        return 1
    state = json.loads(state_file.read_bytes())
    assert state.get("probation") is None
    active = state.get("active")
    if active is None:
        return 1
    data = Path(active["path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == active["sha256"]
    return int(active["release"])


def _serves(probe: MqttProbe, sensor: MqttProbe, node_id: str, seq: int) -> int:
    """Send a frame; return the release that answered it."""
    sensor.publish("sensors/cam-1/digits", frame_bytes(seq, HOLDOUT.images[seq % 100]))

    def answers(m: Message) -> bool:
        if not m.topic.endswith("/results"):
            return False
        return any(r.frame_seq == seq for r in decode_results(m.payload).results)

    (m,) = probe.wait_for(answers, 20)[-1:]
    (r,) = [r for r in decode_results(m.payload).results if r.frame_seq == seq]
    return r.release


@pytest.mark.parametrize("step", ["downloading", "verified", "validating", "activated"])
def test_kill_9_at_each_update_step(
    step: str,
    start_node: Start,
    mqtt_probe: Callable[..., MqttProbe],
    tmp_path: Path,
    roots: dict[str, str],
) -> None:
    fleet = Fleet()
    root_pub = tmp_path / "root.pub"
    root_pub.write_bytes(public_pem(fleet.root))
    node_id = f"kill-{uuid.uuid4().hex[:6]}"
    in_probation = step == "activated"
    settings = {
        "EDGEWISE_UPDATES__PROBATION_S": "60" if in_probation else "0.5",
        "EDGEWISE_UPDATES__PROBATION_MIN_INFERENCES": "1000000" if in_probation else "0",
    }
    probe = mqtt_probe()
    probe.subscribe(f"edge/{node_id}/#")
    operator = mqtt_probe()
    proc = start_node(node_id, root_pub, **settings)
    probe.wait_for(online, 30)

    m = manifest(CLOUD_MODEL, release=2, now=now(), hw_classes=("generic-cpu",))
    parts = chunks(CLOUD_MODEL, m.chunk_bytes)
    operator.publish(f"{roots['fleet']}/keys", fleet.signed_key_set(now=now()), retain=True)
    first = 1 if step == "downloading" else len(parts)
    for i in range(first):
        operator.publish(f"{roots['models']}/{m.sha256}/{i}", parts[i], retain=True)
    operator.publish(
        f"{roots['fleet']}/generic-cpu/models/digits", sign(m, fleet.release), retain=True
    )
    probe.wait_for(is_event(step), 30)
    if step == "downloading":
        partial = tmp_path / "state" / f"{node_id}.updates" / "partial" / m.sha256
        eventually_sync(  # no message says so: poll
            lambda: partial.exists() and any(partial.iterdir()),
            "the first chunk to reach the disk",
            timeout_s=10,
            every_s=0.02,
        )
    proc.kill()  # SIGKILL
    proc.wait(10)
    probe.clear()

    again = start_node(node_id, root_pub, **settings)
    probe.wait_for(online, 30)
    if step == "downloading":
        probe.wait_for(is_event("abandoned"), 20)
        for i in range(first, len(parts)):
            operator.publish(f"{roots['models']}/{m.sha256}/{i}", parts[i], retain=True)
    if in_probation:
        probe.wait_for(is_event("rolled_back:crashed_in_probation"), 20)
        expected = 1
    else:
        # Wherever the kill landed before activation the update was abandoned and restarts
        # from the retained manifest; had it landed after, probation would have rolled it back.
        probe.wait_for(
            lambda m: is_event("committed")(m) or is_event("rolled_back:crashed_in_probation")(m),
            40,
        )
        expected = 2 if any(is_event("committed")(x) for x in probe.messages) else 1
    reports = [
        event_kind(x) for x in probe.messages if x.topic.endswith("/events") and not x.retain
    ]
    assert {"abandoned", "rolled_back:crashed_in_probation"} & set(reports), reports
    state_dir = tmp_path / "state" / f"{node_id}.updates"
    assert _check_one_complete_model(state_dir) == expected
    sensor = mqtt_probe()
    assert _serves(probe, sensor, node_id, 900) == expected
    assert (
        decode_status(
            [x for x in probe.messages if x.topic.endswith("/status")][-1].payload
        ).release
        == expected
    )
    again.kill()
    again.wait(10)


@pytest.mark.parametrize(
    ("point", "expected"),
    [
        ("updates.swap.before_move", None),
        ("updates.swap.after_move", None),
        ("updates.swap.after_state", 1),
    ],
)
def test_kill_9_inside_the_swap(
    point: str,
    expected: int | None,
    start_node: Start,
    mqtt_probe: Callable[..., MqttProbe],
    tmp_path: Path,
    roots: dict[str, str],
) -> None:
    """The swap is a few file-system steps, too quick to hit with a kill from outside: the
    node kills itself there (EDGEWISE_CRASHPOINT) and must restart serving exactly one
    complete, verified model. Before the activating state write the update is abandoned and
    redone from the retained manifest (it ends committed: release 2); after it the node was in
    probation and rolls back to release 1."""
    fleet = Fleet()
    root_pub = tmp_path / "root.pub"
    root_pub.write_bytes(public_pem(fleet.root))
    node_id = f"swap-{uuid.uuid4().hex[:6]}"
    settings = {
        "EDGEWISE_UPDATES__PROBATION_S": "0.5",
        "EDGEWISE_UPDATES__PROBATION_MIN_INFERENCES": "0",
    }
    probe = mqtt_probe()
    probe.subscribe(f"edge/{node_id}/#")
    operator = mqtt_probe()
    doomed = start_node(node_id, root_pub, EDGEWISE_CRASHPOINT=point, **settings)
    probe.wait_for(online, 30)
    m = manifest(CLOUD_MODEL, release=2, now=now(), hw_classes=("generic-cpu",))
    operator.publish(f"{roots['fleet']}/keys", fleet.signed_key_set(now=now()), retain=True)
    for i, part in enumerate(chunks(CLOUD_MODEL, m.chunk_bytes)):
        operator.publish(f"{roots['models']}/{m.sha256}/{i}", part, retain=True)
    operator.publish(
        f"{roots['fleet']}/generic-cpu/models/digits", sign(m, fleet.release), retain=True
    )
    assert doomed.wait(60) == -signal.SIGKILL
    assert not any(is_event("activated")(x) for x in probe.messages)
    probe.clear()

    again = start_node(node_id, root_pub, **settings)
    probe.wait_for(online, 30)
    if expected is None:
        probe.wait_for(is_event("committed"), 40)
        expected = 2
    else:
        probe.wait_for(is_event("rolled_back:crashed_in_probation"), 20)
    reports = [
        event_kind(x) for x in probe.messages if x.topic.endswith("/events") and not x.retain
    ]
    assert {"abandoned", "rolled_back:crashed_in_probation"} & set(reports), reports
    state_dir = tmp_path / "state" / f"{node_id}.updates"
    assert _check_one_complete_model(state_dir) == expected
    assert _serves(probe, mqtt_probe(), node_id, 901) == expected
    again.kill()
    again.wait(10)


def _cli(*args: str, cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_mosquitto_pub_from_out_files_end_to_end(
    start_node: Start,
    mqtt_probe: Callable[..., MqttProbe],
    mosquitto: BrokerInfo,
    tmp_path: Path,
    roots: dict[str, str],
) -> None:
    pub = shutil.which("mosquitto_pub")
    assert pub, "mosquitto-clients must be installed (./dev.sh test installs them)"
    keys = tmp_path / "keys"
    printed = _cli("keys", "init", "--out-dir", str(keys), cwd=tmp_path)
    assert "PRIVATE" not in printed
    assert (keys / "root.key").stat().st_mode & 0o777 == 0o600
    model = tmp_path / "digits_cloud.onnx"
    model.write_bytes(CLOUD_MODEL)
    np_golden = tmp_path / "golden.npz"
    import numpy as np

    np.savez(np_golden, images=HOLDOUT.images[:100], labels=HOLDOUT.labels[:100])
    _cli("keys", "publish-set", "-k", str(keys), "--out", str(tmp_path / "keyset.bin"),
         "--fleet-root", roots["fleet"], cwd=tmp_path)  # fmt: skip
    out_dir = tmp_path / "release"
    _cli("model", "publish", str(model), "--name", "digits", "--release", "2", "--hw-class",
         "generic-cpu", "--golden", str(np_golden), "--min-agreement", "0.9", "-k", str(keys),
         "--out", str(out_dir), "--chunk-kib", "64", "--fleet-root", roots["fleet"],
         "--models-root", roots["models"], cwd=tmp_path)  # fmt: skip

    node_id = f"plain-{uuid.uuid4().hex[:6]}"
    probe = mqtt_probe()
    probe.subscribe(f"edge/{node_id}/#")
    start_node(node_id, keys / "root.pub", EDGEWISE_UPDATES__PROBATION_S="0.2",
               EDGEWISE_UPDATES__PROBATION_MIN_INFERENCES="0")  # fmt: skip
    probe.wait_for(online, 30)
    host, port = mosquitto.host, str(mosquitto.port)

    def mosquitto_pub(topic: str, path: Path) -> None:
        subprocess.run([pub, "-h", host, "-p", port, "-q", "1", "-r", "-t", topic, "-f", str(path)],
                       check=True, timeout=10)  # fmt: skip

    mosquitto_pub(f"{roots['fleet']}/keys", tmp_path / "keyset.bin")
    # The script `--out` writes: mosquitto_pub -r -f for each chunk, then the manifest.
    script = (out_dir / "publish.sh").read_text()
    assert script.count("mosquitto_pub") == 4 + 1 and " -r " in script
    subprocess.run(["sh", "publish.sh"], cwd=out_dir, check=True, timeout=30,
                   env={**os.environ, "MQTT_HOST": host, "MQTT_PORT": port})  # fmt: skip
    probe.wait_for(is_event("committed"), 40)
    sensor = mqtt_probe()
    assert _serves(probe, sensor, node_id, 5) == 2
    # A signed command from `cmd send --out`, published by hand, runs once; its outcome is an
    # event; the same file again is a replay.
    _cli("cmd", "send", "--node", node_id, "publish_telemetry", "-k",
         str(keys), "--out", str(tmp_path / "cmd.bin"), cwd=tmp_path)  # fmt: skip
    subprocess.run([pub, "-h", host, "-p", port, "-q", "1", "-t", f"edge/{node_id}/cmd", "-f",
                    str(tmp_path / "cmd.bin")], check=True, timeout=10)  # fmt: skip
    probe.wait_for(is_event("command_done"), 20)
    subprocess.run([pub, "-h", host, "-p", port, "-q", "1", "-t", f"edge/{node_id}/cmd", "-f",
                    str(tmp_path / "cmd.bin")], check=True, timeout=10)  # fmt: skip
    probe.wait_for(is_event("command_rejected:replayed"), 20)
