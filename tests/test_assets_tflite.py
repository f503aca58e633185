"""The committed .tflite models agree with tflite.json and with the ONNX edge model they were made
from (checked with real LiteRT interpreters; TensorFlow is not needed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import edgewise.assets
from edgewise.serving.runtime.litert import LiteRtRuntime
from edgewise.serving.runtime.onnx import OnnxRuntime

ASSETS = Path(edgewise.assets.__file__).parent
REPO = ASSETS.parents[1]
MANIFEST: dict[str, Any] = json.loads((ASSETS / "tflite.json").read_text(encoding="utf-8"))
MODELS: dict[str, Any] = MANIFEST["models"]
ONNX_MANIFEST: dict[str, Any] = json.loads((ASSETS / "models.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def holdout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(ASSETS / "digits_holdout.npz") as data:
        return np.asarray(data["images"]), np.asarray(data["labels"])


def test_manifest_names_the_script_and_the_onnx_model_it_was_made_from() -> None:
    assert MANIFEST["generated_by"] == "python scripts/build_digits_tflite.py"
    assert (REPO / "scripts" / "build_digits_tflite.py").is_file()
    assert set(MANIFEST["versions"]) >= {"tensorflow", "ai-edge-litert", "onnx", "numpy"}
    assert set(MODELS) == {"float", "uint8"}
    source = MANIFEST["source"]
    assert source["file"] == "digits_edge.onnx"
    assert source["sha256"] == ONNX_MANIFEST["models"]["edge"]["sha256"]
    assert MANIFEST["heldout_frames"] == ONNX_MANIFEST["dataset"]["split"]["heldout"]


@pytest.mark.parametrize(
    "entry",
    [*(dict(m, path=f"edgewise/assets/{m['file']}") for m in MODELS.values()),
     dict(MANIFEST["fixtures"]["edgetpu_stub"], path=MANIFEST["fixtures"]["edgetpu_stub"]["file"])],
    ids=lambda e: e["path"],
)  # fmt: skip
def test_files_match_their_recorded_digest_and_size(entry: dict[str, Any]) -> None:
    data = (REPO / entry["path"]).read_bytes()
    assert len(data) == entry["bytes"]
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]


@pytest.mark.parametrize("key", ["float", "uint8"])
def test_recorded_tensors_are_what_litert_sees(key: str) -> None:
    entry = MODELS[key]
    interpreter = Interpreter(model_path=str(ASSETS / entry["file"]))
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    for detail, recorded in ((inp, entry["input"]), (out, entry["output"])):
        assert detail["name"] == recorded["name"]
        assert np.dtype(detail["dtype"]).name == recorded["dtype"]
        assert [None if d < 0 else int(d) for d in detail["shape_signature"]] == recorded["shape"]
        scale, zero = detail["quantization"]
        if entry["quantized"]:
            assert scale == pytest.approx(recorded["quantization"]["scale"])
            assert zero == recorded["quantization"]["zero_point"]
        else:
            assert scale == 0.0 and "quantization" not in recorded


@pytest.mark.parametrize("key", ["float", "uint8"])
def test_labels_agree_with_the_onnx_edge_model_as_recorded(
    key: str, holdout: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = holdout
    entry = MODELS[key]
    with OnnxRuntime.load(ASSETS / "digits_edge.onnx") as ref:
        expected = ref.run(images).argmax(axis=1)
    with LiteRtRuntime.load(ASSETS / entry["file"]) as rt:
        predicted = rt.run(images).argmax(axis=1)
    agree = int((predicted == expected).sum())
    agreement = agree / len(images)
    accuracy = float((predicted == labels).mean())
    n = len(images)
    print(f"{entry['file']}: agrees with digits_edge.onnx on {agree}/{n} ({agreement:.2%})", end="")
    print(f"; accuracy {accuracy:.2%}")
    assert agreement >= 0.98
    assert agree == entry["agreeing_frames"]
    assert int((predicted == labels).sum()) == entry["heldout_correct"]
