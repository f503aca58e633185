"""The bundled models and held-out frames agree with models.json, and the models are what the
node and the cloud worker expect (checked with real onnxruntime sessions)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edgewise.assets
from edgewise.serving.runtime import TensorSpec
from edgewise.serving.runtime.onnx import OnnxRuntime

ASSETS = Path(edgewise.assets.__file__).parent
REPO = ASSETS.parents[1]
MANIFEST: dict[str, Any] = json.loads((ASSETS / "models.json").read_text(encoding="utf-8"))
MODELS = MANIFEST["models"]


@pytest.fixture(scope="module")
def holdout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(ASSETS / "digits_holdout.npz") as data:
        return np.asarray(data["images"]), np.asarray(data["labels"])


def test_manifest_names_the_command_and_versions() -> None:
    assert MANIFEST["generated_by"] == "python scripts/build_digits_models.py"
    assert (REPO / "scripts" / "build_digits_models.py").is_file()
    assert set(MANIFEST["versions"]) >= {"numpy", "scikit-learn", "skl2onnx", "onnx", "onnxruntime"}
    assert set(MODELS) == {"edge", "cloud"}


@pytest.mark.parametrize("entry", [*MODELS.values(), MANIFEST["holdout"]], ids=lambda e: e["file"])
def test_files_match_their_recorded_hash_and_size(entry: dict[str, Any]) -> None:
    data = (ASSETS / entry["file"]).read_bytes()
    assert len(data) == entry["bytes"]
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]


def test_holdout_frames(holdout: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = holdout
    assert images.dtype == np.float32
    assert labels.dtype == np.int64
    assert images.shape == (540, 8, 8)
    assert labels.shape == (540,)
    assert images.min() >= 0.0
    assert images.max() <= 1.0
    assert len(labels) == MANIFEST["dataset"]["split"]["heldout"]
    counts = np.bincount(labels, minlength=10)
    assert counts.tolist() == MANIFEST["holdout"]["per_class"]
    assert counts.min() >= 50  # stratified: every digit is there about equally often
    # Scaled from 0..16 integers: every pixel is a multiple of 1/16.
    np.testing.assert_array_equal(images * 16, np.round(images * 16))


@pytest.mark.parametrize("key", ["edge", "cloud"])
def test_recorded_spec_is_what_onnxruntime_sees(key: str) -> None:
    entry = MODELS[key]
    assert entry["input"] == {"name": "image", "dtype": "float32", "shape": [None, 8, 8]}
    assert entry["output"] == {"name": "probabilities", "dtype": "float32", "shape": [None, 10]}
    with OnnxRuntime.load(ASSETS / entry["file"]) as rt:
        assert rt.input_spec == TensorSpec("image", np.dtype(np.float32), (None, 8, 8))
        assert rt.output_spec == TensorSpec("probabilities", np.dtype(np.float32), (None, 10))


def test_heldout_accuracy_matches_manifest_and_cloud_beats_edge(
    holdout: tuple[np.ndarray, np.ndarray],
) -> None:
    images, labels = holdout
    correct: dict[str, int] = {}
    for key, entry in MODELS.items():
        with OnnxRuntime.load(ASSETS / entry["file"]) as rt:
            predicted = rt.run(images).argmax(axis=1)
        correct[key] = int((predicted == labels).sum())
        assert correct[key] == entry["heldout_correct"], key
        assert correct[key] / len(labels) == pytest.approx(entry["heldout_accuracy"], abs=1e-6)
    edge, cloud = correct["edge"] / len(labels), correct["cloud"] / len(labels)
    assert 0.88 <= edge <= 0.96, f"the edge model should be small and imperfect, got {edge:.3f}"
    assert cloud >= 0.98, f"the cloud model should be strong, got {cloud:.3f}"
    assert cloud - edge >= 0.02, "the cloud model must be clearly better than the edge model"


@pytest.mark.parametrize("key", ["edge", "cloud"])
def test_graphs_are_valid_and_loadable_by_onnxruntime_1_17(key: str) -> None:
    import onnx  # the graph checker; onnxruntime alone cannot validate a model this way

    model = onnx.load(ASSETS / MODELS[key]["file"])
    onnx.checker.check_model(model, full_check=True)
    # onnxruntime 1.17 (the oldest the project supports) reads IR <= 9 and opset <= 20.
    assert model.ir_version <= 9
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    assert opsets == MODELS[key]["opset"]
    assert opsets["ai.onnx"] <= 20
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["probabilities"]


def test_the_build_script_reproduces_the_heldout_split(
    holdout: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regenerate the split the way the build script does (scikit-learn is in the test extra)."""
    spec = importlib.util.spec_from_file_location(
        "build_digits_models", REPO / "scripts" / "build_digits_models.py"
    )
    assert spec is not None
    assert spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # dataclasses look their module up
    spec.loader.exec_module(script)
    split = script.load_split()
    images, labels = holdout
    np.testing.assert_array_equal(split.test_x.reshape(-1, 8, 8), images)
    np.testing.assert_array_equal(split.test_y, labels)
    assert len(split.train_y) == MANIFEST["dataset"]["split"]["train"]
