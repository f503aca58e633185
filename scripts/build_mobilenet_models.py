"""Build the MobileNetV3-Small benchmark models (random weights) for ``bench/mobilenet.py``.

Dev-only, never run by the tests or CI. It needs TensorFlow, tf2onnx, onnx, onnxruntime and
ai-edge-litert, which the project's runtime does not depend on; from the repository root::

    python3 -m venv /tmp/tf && /tmp/tf/bin/pip install -e '.[build-tflite]' tf2onnx   # once
    /tmp/tf/bin/python scripts/build_mobilenet_models.py

Nothing is downloaded. The graph is ``keras.applications.MobileNetV3Small(weights=None)``: the
architecture built in code with random initial weights (1000 classes, ~2.55 M parameters, its
own preprocessing layer that scales pixels to [-1, 1]). In front of it an input layer takes
``image`` uint8 [N, 224, 224, 3] (one frame is 150,528 bytes) and casts it to float32.

Random weights make the activations vanish with depth (each random conv shrinks them, and the
batch norms start as the identity), so every image would give the same uniform scores and the
int8 versions would quantize near-zero tensors. Before converting, each batch norm's moving
mean and variance are set to those of its input on a batch of random images (a data-dependent
initialisation), so every block sees unit-scale activations as in a trained network, and the
classifier is scaled to logits of standard deviation 3 (a softmax that prefers one class, which
an int8 output can resolve). The figures are timings only: the model classifies nothing.

Outputs, in ``bench/.models/`` (gitignored; ``--out`` to change):

* ``mobilenet_v3_small_fp32.tflite``  TFLite float32 (input uint8, output float32 [1, 1000])
* ``mobilenet_v3_small_int8.tflite``  TFLite full-integer int8 (representative dataset of
  random images); input uint8 (scale ~1, zero point ~0: raw pixels), output uint8
* ``mobilenet_v3_small_fp32.onnx``    ONNX float32 from tf2onnx (opset 17), then onnxruntime's
  quantization pre-processing (shape inference and basic graph optimisation: tf2onnx leaves
  a Transpose around every NHWC op, which this folds)
* ``mobilenet_v3_small_int8.onnx``    ONNX int8 QDQ from ``onnxruntime.quantization
  .quantize_static`` (per-channel int8 weights, uint8 activations, calibrated on the same
  random images)
* ``models.json``                      sizes, sha256, tensor specs, versions and how each file
  agrees with the Keras model on a few random images

The four files together are ~26 MB: do not commit them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / ".models"
COMMAND = "/tmp/tf/bin/python scripts/build_mobilenet_models.py"

SIDE = 224
CHANNELS = 3
CLASSES = 1000
SEED = 20261202
OPSET = 17
INPUT_NAME = "image"
CALIBRATION_IMAGES = 64
"""random images for the int8 calibration (TFLite's representative dataset, ORT's reader)"""
BN_INIT_IMAGES = 16
LOGIT_STD = 3.0
CHECK_IMAGES = 4

FILES = {
    "tflite_fp32": "mobilenet_v3_small_fp32.tflite",
    "tflite_int8": "mobilenet_v3_small_int8.tflite",
    "onnx_fp32": "mobilenet_v3_small_fp32.onnx",
    "onnx_int8": "mobilenet_v3_small_int8.onnx",
}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def random_images(n: int, seed: int) -> npt.NDArray[np.uint8]:
    """Uniform random pixels, [n, 224, 224, 3] uint8."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, SIDE, SIDE, CHANNELS), dtype=np.uint8)


# ---------------------------------------------------------------------------- Keras
def build_keras(seed: int) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    image = keras.Input((SIDE, SIDE, CHANNELS), dtype="uint8", name=INPUT_NAME)
    # Rescaling casts to float32; a scale of 1 leaves the values (MobileNetV3's own
    # preprocessing layer, inside the application model, maps 0..255 to [-1, 1]).
    pixels = keras.layers.Rescaling(1.0, name="to_float")(image)
    base = keras.applications.MobileNetV3Small(
        input_shape=(SIDE, SIDE, CHANNELS),
        weights=None,
        include_top=True,
        classes=CLASSES,
    )
    return keras.Model(image, base(pixels), name="mobilenet_v3_small_uint8")


def data_dependent_init(model: Any, images: npt.NDArray[np.uint8]) -> int:
    """Give the random network a trained network's scale of activations; returns the batch
    norms set.

    Each batch norm's moving mean and variance become those of its input on ``images``, in
    graph order (so each sees the earlier ones already set); then the classifier's kernel and
    bias are scaled so that its logits have a standard deviation of ``LOGIT_STD`` (a softmax
    that prefers a class, rather than ~1/1000 everywhere, which an int8 output cannot tell
    apart).
    """
    import keras

    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    floats = images.astype(np.float32)
    for bn in norms:
        probe = keras.Model(base.input, bn.input)
        acts = np.asarray(probe(floats, training=False))
        axes = tuple(range(acts.ndim - 1))
        gamma, beta, _, _ = bn.get_weights()
        bn.set_weights([gamma, beta, acts.mean(axis=axes), acts.var(axis=axes)])
    logits = base.get_layer("logits")
    std = float(np.std(np.asarray(keras.Model(base.input, logits.output)(floats))))
    logits.set_weights([w * (LOGIT_STD / std) for w in logits.get_weights()])
    return len(norms)


def keras_function(model: Any) -> Any:
    import tensorflow as tf

    spec = tf.TensorSpec([None, SIDE, SIDE, CHANNELS], tf.uint8, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def serve(image: Any) -> Any:
        return model(image, training=False)

    return serve


# ---------------------------------------------------------------------------- TFLite
def to_tflite(model: Any, int8: bool, calibration: npt.NDArray[np.uint8]) -> bytes:
    """Convert a frozen graph (the int8 calibrator cannot read a live function's variables).

    Full integer: the converter quantizes a float graph; a float32 input calibrated on 0..255
    pixels and declared uint8 takes raw pixels (scale ~1, zero point ~0).
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    dtype = tf.float32 if int8 else tf.uint8
    spec = tf.TensorSpec([None, SIDE, SIDE, CHANNELS], dtype, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def serve(image: Any) -> Any:
        return model(image, training=False)

    frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
    conv = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    if int8:

        def representative() -> Iterator[list[npt.NDArray[np.float32]]]:
            for img in calibration:
                yield [img[None].astype(np.float32)]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.uint8
        conv.inference_output_type = tf.uint8
    return bytes(conv.convert())


# ---------------------------------------------------------------------------- ONNX
def to_onnx(model: Any, path: Path) -> None:
    import tf2onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fn = keras_function(model)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        tf2onnx.convert.from_function(
            fn, input_signature=fn.input_signature, opset=OPSET, output_path=str(raw)
        )
        quant_pre_process(str(raw), str(path), skip_symbolic_shape=True)
    _rename_output(path, "probabilities")


def _rename_output(path: Path, name: str) -> None:
    import onnx

    m = onnx.load(str(path))
    old = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
    m.graph.output[0].name = name
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over our random images."""

    def __init__(self, images: npt.NDArray[np.uint8]) -> None:
        self._it = iter(images)

    def get_next(self) -> dict[str, npt.NDArray[np.uint8]] | None:
        img = next(self._it, None)
        return None if img is None else {INPUT_NAME: img[None]}


def quantize_onnx(fp32: Path, int8: Path, calibration: npt.NDArray[np.uint8]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        str(fp32),
        str(int8),
        _Calibration(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


# ---------------------------------------------------------------------------- checks
def _tflite_outputs(path: Path, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    rows = []
    for img in images:
        it.set_tensor(inp["index"], img[None].astype(inp["dtype"]))
        it.invoke()
        y = it.get_tensor(out["index"]).astype(np.float32)
        scale, zero = out["quantization"]
        rows.append((y - zero) * scale if scale else y)
    return np.concatenate(rows)


def _onnx_outputs(path: Path, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(s.run(None, {INPUT_NAME: images})[0], dtype=np.float32)


def agreement(ref: npt.NDArray[np.float32], got: npt.NDArray[np.float32]) -> dict[str, float]:
    """How a converted model's scores compare with the Keras model's on the same images."""
    return {
        "max_abs_diff": float(f"{np.abs(ref - got).max():.3g}"),
        "top1_agreement": float(np.mean(ref.argmax(1) == got.argmax(1))),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    out["ai-edge-litert"] = md.version("ai-edge-litert")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python scripts/build_mobilenet_models.py",
        description="Build MobileNetV3-Small (random weights, uint8 224x224x3 input) as TFLite "
        "fp32/int8 and ONNX fp32/int8 QDQ for bench/mobilenet.py. Downloads nothing.",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    p.add_argument("--seed", type=int, default=SEED, help="weights and images seed")
    args = p.parse_args(argv)
    try:
        import ai_edge_litert  # noqa: F401
        import onnxruntime  # noqa: F401
        import tensorflow  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as exc:
        print(
            f"missing {exc.name}: run this with a Python that has tensorflow-cpu, tf2onnx, onnx,"
            f" onnxruntime and ai-edge-litert, e.g. {COMMAND}",
            file=sys.stderr,
        )
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    calibration = random_images(CALIBRATION_IMAGES, args.seed + 1)
    check = random_images(CHECK_IMAGES, args.seed + 2)

    log("building MobileNetV3Small(weights=None) with a uint8 224x224x3 input")
    model = build_keras(args.seed)
    n_bn = data_dependent_init(model, random_images(BN_INIT_IMAGES, args.seed + 3))
    ref = np.asarray(model(check, training=False), dtype=np.float32)
    log(
        f"{model.count_params():,} parameters; {n_bn} batch norms and the classifier's scale"
        " set from random images"
    )

    paths = {k: out / v for k, v in FILES.items()}
    log("converting to TFLite fp32")
    paths["tflite_fp32"].write_bytes(to_tflite(model, False, calibration))
    log(f"converting to TFLite int8 (calibrating on {CALIBRATION_IMAGES} random images)")
    paths["tflite_int8"].write_bytes(to_tflite(model, True, calibration))
    log("converting to ONNX fp32 (tf2onnx, then onnxruntime's quantization pre-processing)")
    to_onnx(model, paths["onnx_fp32"])
    log(f"quantizing ONNX to int8 QDQ (calibrating on {CALIBRATION_IMAGES} random images)")
    quantize_onnx(paths["onnx_fp32"], paths["onnx_int8"], calibration)

    report: dict[str, Any] = {
        "command": COMMAND,
        "seed": args.seed,
        "input": f"{INPUT_NAME} uint8 [N, {SIDE}, {SIDE}, {CHANNELS}]",
        "parameters": int(model.count_params()),
        "versions": _versions(),
        "files": {},
    }
    for key, path in paths.items():
        got = (_tflite_outputs if path.suffix == ".tflite" else _onnx_outputs)(path, check)
        info = {
            "file": path.name,
            "bytes": path.stat().st_size,
            "sha256": _sha256(path),
            "vs_keras": agreement(ref, got),
        }
        report["files"][key] = info
        log(f"{path.name}: {info['bytes'] / 1e6:.1f} MB, vs Keras {info['vs_keras']}")
    (out / "models.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {len(paths)} models and models.json to {out} in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
