"""The edge node serving the committed .tflite models with LiteRT, in-process against a real
Mosquitto: results, status and telemetry name the backend and what serves."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

import edgewise.assets
from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo
from edgewise.serving.runtime.litert import LiteRtRuntime
from schemas import decode_deadletter, decode_results, decode_status, decode_telemetry
from tests.nodeharness import Harness, frame_bytes, running_node

ASSETS = Path(edgewise.assets.__file__).parent
HOLDOUT = load_holdout()


def _results(h: Harness) -> list:
    return [r for m in h.messages("results") for r in decode_results(m.payload).results]


@pytest.mark.parametrize(
    ("file", "hardware_class", "fell_back"),
    [
        ("digits_edge.tflite", "x86-cpu-gateway", False),
        ("digits_edge_uint8.tflite", "rpi5-coral", True),
    ],
    ids=["float-cpu", "uint8-edgetpu-falls-back"],
)
def test_the_node_serves_a_tflite_model_and_reports_litert_on_cpu(
    mosquitto: BrokerInfo, file: str, hardware_class: str, fell_back: bool
) -> None:
    """On x86-cpu-gateway LiteRT's CPU is what the class wants; on rpi5-coral the Edge TPU is,
    and without its delegate here the node serves on the CPU and says it is degraded."""
    path = ASSETS / file
    total = 80
    with LiteRtRuntime.load(path) as rt:
        expected = rt.run(HOLDOUT.images[:total]).argmax(axis=1)

    async def scenario() -> None:
        async with running_node(
            mosquitto,
            hardware_class=hardware_class,
            model={"path": str(path)},
            batching={"max_batch_size": 16, "max_wait_ms": 10},
            telemetry={"window_s": 0.3},
        ) as h:
            status = decode_status(h.messages("status")[-1].payload)
            if fell_back:
                assert status.state == "degraded"
                assert "accelerator_unavailable" in status.reasons
            else:
                assert status.state == "online"
            assert (status.runtime, status.provider) == ("litert", "cpu")
            assert status.hardware_class == hardware_class
            assert h.node.model is not None
            assert h.node.model.runtime.provider == "cpu"
            await asyncio.gather(*(h.send(frame_bytes(i, HOLDOUT.images[i])) for i in range(total)))
            await h.seen.wait_for(lambda: len(_results(h)) >= total, 20)
            results = _results(h)
            assert sorted(r.frame_seq for r in results) == list(range(total))
            # The node's labels are the model's own, frame by frame.
            assert all(r.label == int(expected[r.frame_seq]) for r in results)
            assert all(0.0 <= r.confidence <= 1.0 for r in results)
            correct = sum(r.label == int(HOLDOUT.labels[r.frame_seq]) for r in results)
            assert correct / total > 0.8
            await h.seen.wait_for(
                lambda: (
                    sum(
                        decode_telemetry(m.payload).counts.get("results", 0)
                        for m in h.messages("telemetry")
                    )
                    >= total
                ),
                20,
            )
            windows = [decode_telemetry(m.payload) for m in h.messages("telemetry")]
            assert {(t.runtime, t.provider) for t in windows} == {("litert", "cpu")}
            assert h.node.stats.inference_errors == 0

    asyncio.run(scenario())


def test_frames_that_do_not_fit_a_tflite_model_are_dead_lettered(mosquitto: BrokerInfo) -> None:
    bad_dtype = msgspec.msgpack.encode(
        {"v": 1, "seq": 1, "dtype": "uint8", "shape": [8, 8], "data": bytes(64)}
    )
    bad_shape = msgspec.msgpack.encode(
        {
            "v": 1,
            "seq": 2,
            "dtype": "float32",
            "shape": [4, 4],
            "data": np.zeros(16, np.float32).tobytes(),
        }
    )

    async def scenario() -> None:
        # The uint8 model still takes float32 frames: a uint8 frame is refused, not cast.
        async with running_node(
            mosquitto,
            hardware_class="x86-cpu-gateway",
            model={"path": str(ASSETS / "digits_edge_uint8.tflite")},
        ) as h:
            await h.send(bad_dtype)
            await h.send(bad_shape)
            await h.send(frame_bytes(99, HOLDOUT.images[0]))
            await h.seen.wait_for(
                lambda: len(h.messages("deadletter")) >= 2 and len(_results(h)) >= 1
            )
            letters = [decode_deadletter(m.payload) for m in h.messages("deadletter")]
            assert [d.reason for d in letters] == ["bad_dtype", "bad_shape"]
            assert _results(h)[0].frame_seq == 99
            assert h.node.stats.inference_errors == 0

    asyncio.run(scenario())


def test_edgewise_node_refuses_an_edgetpu_compiled_model_without_the_delegate(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    stub = Path(__file__).parent / "data" / "edgetpu_stub.tflite"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
    env.update(
        EDGEWISE_NODE_ID="gw-coral",
        EDGEWISE_MQTT__HOST=mosquitto.host,
        EDGEWISE_MQTT__PORT=str(mosquitto.port),
        EDGEWISE_STORAGE__STATE_DIR=str(tmp_path),
        EDGEWISE_MODEL__PATH=str(stub),
        EDGEWISE_HARDWARE_CLASS="rpi5-coral",
    )
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", "node"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    message = " ".join(done.stderr.split())
    assert f"cannot load model {stub}" in message
    assert "compiled for the Edge TPU (edgetpu-custom-op)" in message
    assert "ship a CPU variant" in message
