"""A node uses its hardware class against a real Mosquitto: without its accelerator it serves on
the fallback provider and says ``degraded: accelerator_unavailable``; the reason clears when a
later load serves on the preferred provider; a model the class cannot run is refused at start."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from edge_node.config import NodeConfig
from edge_node.errors import ConfigError, ModelRefused
from edge_node.node import EdgeNode
from edgewise.assets import bundled_asset
from edgewise.local_broker import BrokerInfo
from edgewise.serving.model import ServedModel
from edgewise.serving.runtime import Runtime
from schemas import Status, decode_results, decode_status, decode_telemetry
from tests.nodeharness import Harness, frame_bytes, running_node
from tests.updatekit import HOLDOUT

pytestmark = pytest.mark.timeout(60)
JETSON = "jetson-vision-standard"
CPU = "CPUExecutionProvider"


def _statuses(h: Harness) -> list[Status]:
    return [decode_status(m.payload) for m in h.messages("status")]


def _answered(h: Harness) -> int:
    return sum(len(decode_results(m.payload).results) for m in h.messages("results"))


async def _serve(h: Harness, start: int, n: int) -> None:
    before = _answered(h)
    for i in range(start, start + n):
        await h.send(frame_bytes(i, HOLDOUT.images[i % len(HOLDOUT.images)]))
    await h.seen.wait_for(lambda: _answered(h) >= before + n, 20)


def test_jetson_node_without_its_accelerator_serves_on_cpu_and_says_so(
    mosquitto: BrokerInfo,
) -> None:
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has TensorRT: the node would not fall back here")

    async def scenario() -> None:
        # The class's 50 ms latency envelope is switched off (health.latency_slo_p99_ms = 0
        # wins over the class) so a slow shared machine cannot add latency_slo to the reasons.
        async with running_node(
            mosquitto,
            hardware_class=JETSON,
            health={"latency_slo_p99_ms": 0.0},
            telemetry={"window_s": 0.3},
        ) as h:
            first = _statuses(h)[0]
            assert (first.state, first.reasons) == ("degraded", ["accelerator_unavailable"])
            assert (first.runtime, first.provider, first.hardware_class) == (
                "onnxruntime",
                CPU,
                JETSON,
            )
            assert h.node.model.runtime.provider == CPU
            await _serve(h, 0, 60)
            results = [r for m in h.messages("results") for r in decode_results(m.payload).results]
            assert len(results) == 60 and {r.source for r in results} == {"edge"}
            labels = np.array([r.label for r in sorted(results, key=lambda r: r.frame_seq)])
            assert np.mean(labels == HOLDOUT.labels[:60]) > 0.8  # really served, on the CPU
            await h.seen.wait_for(lambda: bool(h.messages("telemetry")), 10)
            window = decode_telemetry(h.messages("telemetry")[-1].payload)
            assert (window.provider, window.hardware_class) == (CPU, JETSON)
            assert "accelerator_unavailable" in window.reasons
            assert _statuses(h)[-1].reasons == ["accelerator_unavailable"]

    asyncio.run(scenario())


class _ServesOn:
    """The real ONNX Runtime session reporting another provider: stands in for a later load
    that got the accelerator, which this machine does not have."""

    def __init__(self, inner: Runtime, provider: str) -> None:
        self._inner = inner
        self.name = inner.name
        self.provider = provider
        self.input_spec = inner.input_spec
        self.output_spec = inner.output_spec

    def run(self, batch: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return self._inner.run(batch)

    def close(self) -> None:
        self._inner.close()


def _digits(reporting: str | None = None) -> ServedModel:
    """A fresh, real session of the digits model; ``reporting`` another provider, as release 2."""
    served = ServedModel.load(
        str(bundled_asset("digits_edge.onnx")),
        name="digits",
        release=1,
        output="probabilities",
        providers=(CPU,),
        intra_op_threads=1,
    )
    if reporting is None:
        return served
    wrapped = _ServesOn(served.runtime, reporting)
    return ServedModel(wrapped, name="digits", release=2, output="probabilities")


def test_accelerator_reason_clears_when_a_later_load_serves_on_the_preferred_provider(
    mosquitto: BrokerInfo,
) -> None:
    async def scenario() -> None:
        async with running_node(
            mosquitto, hardware_class=JETSON, health={"latency_slo_p99_ms": 0.0}
        ) as h:
            assert h.node.reasons == ["accelerator_unavailable"]
            first = h.node.swap_model(_digits("TensorrtExecutionProvider"))
            await h.seen.wait_for(lambda: _statuses(h)[-1].state == "online", 10)
            last = _statuses(h)[-1]
            assert (last.reasons, last.provider, last.release) == (
                [],
                "TensorrtExecutionProvider",
                2,
            )
            await _serve(h, 0, 20)
            # The accelerator fails again (a later load lands on the CPU): degraded again.
            second = h.node.swap_model(_digits())
            await h.seen.wait_for(lambda: _statuses(h)[-1].state == "degraded", 10)
            assert _statuses(h)[-1].reasons == ["accelerator_unavailable"]
            assert _statuses(h)[-1].provider == CPU
            await _serve(h, 20, 20)
            first.close()
            second.close()

    asyncio.run(scenario())


def test_cpu_class_is_never_degraded_for_its_provider(mosquitto: BrokerInfo) -> None:
    async def scenario() -> None:
        async with running_node(mosquitto, hardware_class="generic-cpu") as h:
            await _serve(h, 0, 10)
            assert (_statuses(h)[-1].state, h.node.reasons) == ("online", [])
            assert _statuses(h)[-1].hardware_class == "generic-cpu"

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- refused at start
def _classes_file(tmp_path: Path, **changes: Any) -> Path:
    """The shipped generic-cpu class as ``small-cpu``, with some keys changed."""
    lines = [
        "[small-cpu]",
        'runtime = "onnxruntime"',
        'providers = ["CPUExecutionProvider"]',
        'formats = ["onnx"]',
        "intra_op_threads = 1",
        "max_model_bytes = 1000000",
        "max_input_elements = 1000",
        "latency_slo_p99_ms = 0.0",
    ]
    table = {line.split(" = ")[0]: line for line in lines[1:]}
    table.update({k: f"{k} = {v}" for k, v in changes.items()})
    path = tmp_path / "hardware_classes.toml"
    path.write_text("\n".join([lines[0], *table.values()]) + "\n", encoding="utf-8")
    return path


async def _start(config: NodeConfig) -> None:
    async with EdgeNode(config):
        pytest.fail("the node started with a model its class cannot run")


@pytest.mark.parametrize(
    ("settings", "reason", "says"),
    [
        ({"hardware_class": "rpi5-coral"}, "unsupported_format", "accepts tflite"),
        ({"hardware_class": "small-cpu", "max_model_bytes": 1024}, "model_too_large", "1024"),
        ({"hardware_class": "small-cpu", "max_input_elements": 63}, "input_too_large", "64"),
    ],
    ids=["onnx_model_on_a_tflite_class", "model_over_max_model_bytes", "input_over_the_envelope"],
)
def test_model_the_class_cannot_run_is_refused_at_start(
    tmp_path: Path, settings: dict[str, Any], reason: str, says: str
) -> None:
    settings = dict(settings)
    name = settings.pop("hardware_class")
    file = _classes_file(tmp_path, **settings) if settings else None
    config = NodeConfig(
        node_id="gw-refuse",
        hardware_class=name,
        hardware_classes_file=file,
        storage={"state_dir": tmp_path / "state"},
        model={"path": bundled_asset("digits_edge.onnx")},
    )
    with pytest.raises(ModelRefused) as info:
        asyncio.run(_start(config))
    assert info.value.reason == reason
    assert says in str(info.value) and name in str(info.value)
    assert not (tmp_path / "state").exists()  # refused before anything was written


def test_unknown_class_stops_the_node_at_start_listing_the_known_ones() -> None:
    config = NodeConfig(hardware_class="jetson-nano-typo")
    with pytest.raises(ConfigError) as info:
        EdgeNode(config)
    text = str(info.value)
    assert "hardware_class" in text and "jetson-nano-typo" in text
    assert "jetson-vision-standard" in text and "generic-cpu" in text
