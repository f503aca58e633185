"""Build the LiteRT (``.tflite``) variants of the bundled digits edge model.

Run from the repository root with a Python that has TensorFlow (the ``build-tflite`` extra)::

    python scripts/build_digits_tflite.py

Nothing is trained here and nothing is downloaded: the weights are read from the committed
``edgewise/assets/digits_edge.onnx`` (made by ``scripts/build_digits_models.py``), so the
``.tflite`` files compute the same function as the ONNX edge model. The graph is written as a
``tf.function`` with those weights as constants (reshape [N, 8, 8] -> [N, 64], dense + ReLU,
dense + softmax) and converted with TensorFlow's LiteRT converter. Three files come out:

* ``edgewise/assets/digits_edge.tflite``       float32 ``image`` [N, 8, 8] -> float32
  ``probabilities`` [N, 10]; the batch dimension is dynamic.
* ``edgewise/assets/digits_edge_uint8.tflite`` the same model fully integer-quantized (int8
  kernels, uint8 input and output, the layout a Coral Edge TPU model has before
  ``edgetpu_compiler``); calibrated on the training frames of the same split.
* ``tests/data/edgetpu_stub.tflite``            a test fixture: the uint8 model with its operators
  replaced by one custom operator named ``edgetpu-custom-op`` (what ``edgetpu_compiler`` emits).
  Its payload is not an Edge TPU program; it only lets the tests check that such a model is
  refused with a clear message when no Edge TPU delegate is present.

``tflite.json`` next to ``models.json`` records each file's sha256 and size, its tensors (with
quantization parameters), the digest of the ONNX model it was made from, how often its labels
agree with the ONNX model's on the held-out frames (measured with the LiteRT interpreter) and the
library versions. Rerunning with the same library versions gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from onnx import numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "edgewise" / "assets"
FIXTURES = REPO / "tests" / "data"
COMMAND = "python scripts/build_digits_tflite.py"

SOURCE = "digits_edge.onnx"
FLOAT_FILE = "digits_edge.tflite"
UINT8_FILE = "digits_edge_uint8.tflite"
STUB_FILE = "edgetpu_stub.tflite"
EDGETPU_OP = "edgetpu-custom-op"

# The split of scripts/build_digits_models.py (kept in step by the check in main()).
SPLIT_SEED = 20261122
TEST_SIZE = 0.3
SIDE = 8
CLASSES = 10
CALIBRATION_FRAMES = 300


def mlp_weights(onnx_path: Path) -> dict[str, npt.NDArray[np.float32]]:
    """The two dense layers of the skl2onnx MLP graph, checked against the expected topology."""
    model = onnx.load(onnx_path)
    ops = [n.op_type for n in model.graph.node]
    want = ["Reshape", "Cast", "MatMul", "Add", "Relu", "MatMul", "Add", "Softmax", "Identity"]
    if ops != want:
        raise SystemExit(f"{onnx_path}: expected the MLP graph {want}, found {ops}")
    weights = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}
    return {
        "w1": weights["coefficient"],
        "b1": weights["intercepts"].reshape(-1),
        "w2": weights["coefficient1"],
        "b2": weights["intercepts1"].reshape(-1),
    }


def concrete_function(weights: dict[str, npt.NDArray[np.float32]]) -> Any:
    w1, b1, w2, b2 = (tf.constant(weights[k]) for k in ("w1", "b1", "w2", "b2"))

    @tf.function(input_signature=[tf.TensorSpec([None, SIDE, SIDE], tf.float32, name="image")])
    def digits_edge(image: tf.Tensor) -> dict[str, tf.Tensor]:
        flat = tf.reshape(image, [-1, SIDE * SIDE])
        hidden = tf.nn.relu(tf.matmul(flat, w1) + b1)
        return {"probabilities": tf.nn.softmax(tf.matmul(hidden, w2) + b2)}

    return digits_edge.get_concrete_function()


def training_frames() -> npt.NDArray[np.float32]:
    digits = load_digits()
    x = (np.asarray(digits.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    train_x, _, _, _ = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=SPLIT_SEED
    )
    return np.ascontiguousarray(train_x.reshape(-1, SIDE, SIDE))


def convert(function: Any, *, quantize: bool) -> bytes:
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function])
    if quantize:
        frames = training_frames()[:CALIBRATION_FRAMES]

        def representative() -> Iterator[list[npt.NDArray[np.float32]]]:
            for frame in frames:
                yield [frame[np.newaxis]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    return name_outputs(converter.convert())


def name_outputs(blob: bytes) -> bytes:
    """Name the output tensor ``probabilities`` like the ONNX model's (the converter calls it
    ``Identity``; a concrete function keeps no signature to carry the name)."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))
    (graph,) = model.subgraphs
    (output,) = graph.outputs
    graph.tensors[output].name = b"probabilities"
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def edgetpu_stub(quantized: bytes) -> bytes:
    """The quantized model with all its operators replaced by one ``edgetpu-custom-op``."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(quantized))
    code = schema.OperatorCodeT()
    code.builtinCode = schema.BuiltinOperator.CUSTOM
    code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = EDGETPU_OP
    code.version = 1
    model.operatorCodes = [code]
    (graph,) = model.subgraphs
    op = schema.OperatorT()
    op.opcodeIndex = 0
    op.inputs = list(graph.inputs)
    op.outputs = list(graph.outputs)
    op.customOptions = list(b"edgewise test fixture: not an Edge TPU program")
    graph.operators = [op]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def litert_scores(blob: bytes, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Probabilities from the LiteRT interpreter, (de)quantizing a quantized model's IO."""
    interpreter = Interpreter(model_content=blob, num_threads=1)
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], list(images.shape))
    interpreter.allocate_tensors()
    scale, zero = inp["quantization"]
    feed: npt.NDArray[Any] = images
    if scale:
        info = np.iinfo(inp["dtype"])
        feed = np.clip(np.round(images / scale) + zero, info.min, info.max).astype(inp["dtype"])
    interpreter.set_tensor(inp["index"], feed)
    interpreter.invoke()
    raw = interpreter.get_tensor(out["index"])
    scale, zero = out["quantization"]
    if scale:
        return ((raw.astype(np.float32) - zero) * scale).astype(np.float32)
    return np.asarray(raw, dtype=np.float32)


def tensors(blob: bytes) -> dict[str, Any]:
    interpreter = Interpreter(model_content=blob)

    def one(d: dict[str, Any]) -> dict[str, Any]:
        scale, zero = d["quantization"]
        entry: dict[str, Any] = {
            "name": d["name"],
            "dtype": np.dtype(d["dtype"]).name,
            "shape": [None if s < 0 else int(s) for s in d["shape_signature"]],
        }
        if scale:
            entry["quantization"] = {"scale": float(scale), "zero_point": int(zero)}
        return entry

    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    return {"input": one(inp), "output": one(out)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(assets: Path, fixtures: Path) -> dict[str, Any]:
    manifest_onnx = json.loads((assets / "models.json").read_text(encoding="utf-8"))
    split = manifest_onnx["dataset"]["split"]
    if split["random_state"] != SPLIT_SEED or split["test_size"] != TEST_SIZE:
        raise SystemExit("models.json names another split than this script; update SPLIT_SEED")
    source = assets / SOURCE
    source_blob = source.read_bytes()
    if sha256(source_blob) != manifest_onnx["models"]["edge"]["sha256"]:
        raise SystemExit(f"{source} does not match models.json; rerun build_digits_models.py")

    with np.load(assets / "digits_holdout.npz") as data:
        images = np.asarray(data["images"], dtype=np.float32)
        labels = np.asarray(data["labels"])
    session = ort.InferenceSession(source_blob, providers=["CPUExecutionProvider"])
    (onnx_scores,) = session.run(["probabilities"], {"image": images})
    onnx_labels = np.asarray(onnx_scores).argmax(axis=1)

    function = concrete_function(mlp_weights(source))
    blobs = {"float": convert(function, quantize=False), "uint8": convert(function, quantize=True)}
    stub = edgetpu_stub(blobs["uint8"])

    files = {"float": assets / FLOAT_FILE, "uint8": assets / UINT8_FILE}
    models: dict[str, Any] = {}
    for key, blob in blobs.items():
        files[key].write_bytes(blob)
        written = files[key].read_bytes()
        scores = litert_scores(written, images)
        predicted = scores.argmax(axis=1)
        agree = int((predicted == onnx_labels).sum())
        correct = int((predicted == labels).sum())
        models[key] = {
            "file": files[key].name,
            "sha256": sha256(written),
            "bytes": len(written),
            "quantized": key == "uint8",
            "agreement_with_onnx": round(agree / len(labels), 6),
            "agreeing_frames": agree,
            "heldout_accuracy": round(correct / len(labels), 6),
            "heldout_correct": correct,
            "max_probability_gap": round(float(np.abs(scores - onnx_scores).max()), 6),
            **tensors(written),
        }
    fixtures.mkdir(parents=True, exist_ok=True)
    stub_path = fixtures / STUB_FILE
    stub_path.write_bytes(stub)

    manifest: dict[str, Any] = {
        "generated_by": COMMAND,
        "requires": "pip install -e '.[build-tflite]' (tensorflow-cpu, ai-edge-litert, onnx, "
        "onnxruntime, scikit-learn); no downloads",
        "source": {"file": SOURCE, "sha256": sha256(source_blob)},
        "heldout_frames": len(labels),
        "calibration": {
            "frames": CALIBRATION_FRAMES,
            "from": "the first training frames of the split in models.json",
        },
        "models": models,
        "fixtures": {
            "edgetpu_stub": {
                "file": f"tests/data/{STUB_FILE}",
                "sha256": sha256(stub),
                "bytes": len(stub),
                "custom_op": EDGETPU_OP,
                "note": "the uint8 model with its operators replaced by one custom op; "
                "not an Edge TPU program",
            }
        },
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "tensorflow": tf.__version__,
            "ai-edge-litert": _version("ai-edge-litert"),
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
    }
    (assets / "tflite.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def print_summary(manifest: dict[str, Any], assets: Path) -> None:
    n = manifest["heldout_frames"]
    header = f"{'model':<6} {'file':<26} {'bytes':>6} {'agrees':>8} {'accuracy':>9}  sha256"
    print(header)
    print("-" * len(header))
    for key, m in manifest["models"].items():
        print(
            f"{key:<6} {m['file']:<26} {m['bytes']:>6} {m['agreement_with_onnx']:>8.2%} "
            f"{m['heldout_accuracy']:>9.2%}  {m['sha256'][:16]}"
        )
    stub = manifest["fixtures"]["edgetpu_stub"]
    print(f"fixture {stub['file']} ({stub['bytes']} bytes, {stub['sha256'][:16]})")
    print(
        f"agreement measured with LiteRT on {n} held-out frames; manifest: {assets / 'tflite.json'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--assets", type=Path, default=ASSETS, help="assets directory (default: edgewise/assets)"
    )
    parser.add_argument(
        "--fixtures",
        type=Path,
        default=FIXTURES,
        help="test fixture directory (default: tests/data)",
    )
    args = parser.parse_args(argv)
    manifest = build(args.assets, args.fixtures)
    print_summary(manifest, args.assets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
