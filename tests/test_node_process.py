"""`edgewise node` as a real process: start, serve, SIGTERM drain, kill -9 will, bad config."""

from __future__ import annotations

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

from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo, Message, MqttProbe
from schemas import decode_results, decode_status
from tests.nodeharness import frame_bytes

HOLDOUT = load_holdout()


def _node_env(broker: BrokerInfo, node_id: str, state_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
    env.update(
        EDGEWISE_NODE_ID=node_id,
        EDGEWISE_MQTT__HOST=broker.host,
        EDGEWISE_MQTT__PORT=str(broker.port),
        EDGEWISE_LOG_LEVEL="INFO",
        EDGEWISE_STORAGE__STATE_DIR=str(state_dir),
        **extra,
    )
    return env


def _status(m: Message) -> str:
    return decode_status(m.payload).state


@pytest.fixture
def node_process(
    mosquitto: BrokerInfo, tmp_path: Path
) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], str]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        *args: str, node_id: str | None = None, **env: str
    ) -> tuple[subprocess.Popen[bytes], str]:
        node_id = node_id or f"proc-{uuid.uuid4().hex[:8]}"
        log = open(tmp_path / f"{node_id}-{len(procs)}.log", "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            [sys.executable, "-m", "edgewise.cli.app", "node", *args],
            env=_node_env(mosquitto, node_id, tmp_path, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(p)
        return p, node_id

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_sigterm_drains_and_exits_zero(
    node_process: Callable[..., tuple[subprocess.Popen[bytes], str]],
    mqtt_probe: Callable[..., MqttProbe],
) -> None:
    proc, node_id = node_process()
    probe = mqtt_probe()
    probe.subscribe(f"edge/{node_id}/#")
    probe.wait_for(lambda m: m.topic.endswith("/status") and _status(m) == "online", 20)
    sensor = mqtt_probe()
    sensor.publish_many(
        "sensors/cam-9/digits", [frame_bytes(i, HOLDOUT.images[i]) for i in range(50)]
    )
    probe.wait_for(lambda m: m.topic.endswith("/results"), 10)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    probe.wait_for(lambda m: m.topic.endswith("/status") and _status(m) == "offline", 5)
    first_run = _frame_seqs(probe.messages)
    assert first_run
    # A newcomer sees the retained offline status with the reason.
    late = mqtt_probe()
    late.subscribe(f"edge/{node_id}/status")
    (retained,) = late.wait_for(lambda m: m.retain, 5)
    assert decode_status(retained.payload).reasons == ["shutdown"]

    # Frames that reached the broker after the drain began were left unacknowledged, so the
    # persistent session hands them to the node's next run; frames the first run had in hand
    # were answered and acknowledged, so none of them comes back as a duplicate.
    probe.clear()
    again, _ = node_process(node_id=node_id)
    missing = set(range(50)) - set(first_run)
    answered: set[int] = set()

    def covers_the_rest(m: Message) -> bool:
        answered.update(_frame_seqs([m]))
        return answered >= missing

    probe.wait_for(covers_the_rest, 20)
    assert sorted(first_run + _frame_seqs(probe.messages)) == list(range(50))
    again.send_signal(signal.SIGTERM)
    assert again.wait(20) == 0


def _frame_seqs(messages: list[Message]) -> list[int]:
    return [
        r.frame_seq
        for m in messages
        if m.topic.endswith("/results")
        for r in decode_results(m.payload).results
    ]


def test_kill_9_leaves_the_will_as_retained_offline_status(
    node_process: Callable[..., tuple[subprocess.Popen[bytes], str]],
    mqtt_probe: Callable[..., MqttProbe],
) -> None:
    proc, node_id = node_process()
    probe = mqtt_probe()
    probe.subscribe(f"edge/{node_id}/status")
    probe.wait_for(lambda m: _status(m) == "online", 20)
    proc.kill()
    proc.wait(10)
    probe.wait_for(lambda m: _status(m) == "offline", 10)
    late = mqtt_probe()
    late.subscribe(f"edge/{node_id}/status")
    (retained,) = late.wait_for(lambda m: m.retain, 5)
    status = decode_status(retained.payload)
    assert (status.state, status.reasons) == ("offline", ["connection_lost"])


def test_bad_config_fails_at_start_naming_the_key(tmp_path: Path, mosquitto: BrokerInfo) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text("[batching]\nmax_batch_size = -3\n", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", "node", "--config", str(cfg)],
        env=_node_env(mosquitto, "bad-config", tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "batching.max_batch_size" in out.stderr
    assert "EDGEWISE_BATCHING__MAX_BATCH_SIZE" in out.stderr


def test_mosquitto_pub_json_frame_and_mosquitto_sub_result(
    node_process: Callable[..., tuple[subprocess.Popen[bytes], str]],
    mqtt_probe: Callable[..., MqttProbe],
    mosquitto: BrokerInfo,
) -> None:
    """The plain-tools example of docs/getting-started.md, run with the real mosquitto_pub and
    mosquitto_sub."""
    pub, sub = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
    assert pub and sub, "mosquitto-clients must be installed (./dev.sh test installs them)"
    _, node_id = node_process(EDGEWISE_RESULTS_ENCODING="json")
    probe = mqtt_probe()
    probe.subscribe(f"edge/{node_id}/status")
    probe.wait_for(lambda m: _status(m) == "online", 20)
    host, port = mosquitto.host, str(mosquitto.port)
    watcher = subprocess.Popen(
        [sub, "-h", host, "-p", port, "-t", f"edge/{node_id}/results", "-C", "1", "-W", "20"],
        stdout=subprocess.PIPE,
        text=True,
    )
    # mosquitto_sub prints nothing when subscribed; wait until the broker has its subscription
    # by publishing probes until it answers (each probe is a real frame it will report).
    frame = json.dumps(
        {
            "v": 1,
            "seq": 7,
            "dtype": "float32",
            "shape": [8, 8],
            "data": [round(float(x), 4) for x in HOLDOUT.images[3].ravel()],
        }
    )
    seen = mqtt_probe()
    seen.subscribe(f"edge/{node_id}/results")
    for _ in range(50):
        subprocess.run(
            [pub, "-h", host, "-p", port, "-q", "1", "-t", "sensors/cam-1/digits", "-m", frame],
            check=True,
            timeout=10,
        )
        seen.wait_for(lambda m: True, 10)
        try:
            out, _ = watcher.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            seen.clear()
    else:
        pytest.fail("mosquitto_sub never printed a result")
    assert watcher.returncode == 0
    batch = json.loads(out)
    (result,) = batch["results"]
    assert (result["frame_seq"], result["device"], result["sensor"]) == (7, "cam-1", "digits")
    assert result["label"] == int(HOLDOUT.labels[3])
