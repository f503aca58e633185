"""Build a small conv net and its data files, to try ``edgewise model quantize`` and ``check`` on.

Run from the repository root (needs ``onnx``, in the ``quantize`` and ``test`` extras)::

    python scripts/build_conv_example.py --out /tmp/conv

writes ``conv.onnx`` (float32), ``calibration.npz`` (``x`` only) and ``labelled.npz`` (``x`` and
``y``). Nothing is downloaded and nothing is trained by gradient descent: the frames are 16x16
single-channel images, each one of ten random binary templates (its class) with Gaussian noise;
the two convolutions have fixed random weights and the final dense layer is the least-squares
fit of one-hot labels on the convolutional features, computed with numpy from features that
ONNX Runtime itself produces. The graph is::

    image [N, 1, 16, 16] -> Conv 3x3 (16) -> Relu -> MaxPool 2 -> Conv 3x3 (32) -> Relu
        -> Flatten -> Gemm (2048 x 10) -> Softmax -> probabilities [N, 10]

about 25,000 weights (~100 KB as float32), so int8 weights make a real difference. The same
seed gives the same files. The tests build it the same way (tests/test_quantize.py).
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SIDE = 16
CLASSES = 10
CONV1 = 16
CONV2 = 32
FEATURES = CONV2 * (SIDE // 2) * (SIDE // 2)
OPSET = 17
IR_VERSION = 8
# Noise and ridge chosen so the float model is good but not perfect (~97 % on the test frames).
NOISE = 1.2
RIDGE = 100.0
SEED = 20261202

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


@dataclass(frozen=True)
class Example:
    model: bytes  # the float32 ONNX model
    calibration_x: npt.NDArray[np.float32]  # [n, 1, 16, 16]
    test_x: npt.NDArray[np.float32]  # [m, 1, 16, 16]
    test_y: npt.NDArray[np.int64]  # [m]


def frames(
    rng: np.random.Generator, templates: npt.NDArray[np.float32], n: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``n`` noisy frames, classes balanced then shuffled."""
    labels = rng.permutation(np.arange(n, dtype=np.int64) % CLASSES)
    noise = rng.normal(0.0, NOISE, size=(n, 1, SIDE, SIDE))
    x = (templates[labels] + noise).astype(np.float32)
    return x, labels


def _graph(
    w1: npt.NDArray[np.float32],
    w2: npt.NDArray[np.float32],
    dense: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None,
) -> onnx.ModelProto:
    """The conv net; without ``dense``, only its feature extractor (output ``features``)."""
    inits = [
        numpy_helper.from_array(w1, "conv1_w"),
        numpy_helper.from_array(np.zeros(CONV1, np.float32), "conv1_b"),
        numpy_helper.from_array(w2, "conv2_w"),
        numpy_helper.from_array(np.zeros(CONV2, np.float32), "conv2_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv1_w", "conv1_b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2_w", "conv2_b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["features"], axis=1),
    ]
    out_name, out_width = "features", FEATURES
    if dense is not None:
        weights, bias = dense
        inits += [numpy_helper.from_array(weights, "fc_w"), numpy_helper.from_array(bias, "fc_b")]
        nodes += [
            helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=1),
        ]
        out_name, out_width = OUTPUT_NAME, CLASSES
    graph = helper.make_graph(
        nodes,
        "edgewise_conv_example",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 1, SIDE, SIDE])],
        outputs=[helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", out_width])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgewise build_conv_example.py",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build(seed: int = SEED, train: int = 2000, calibration: int = 200, test: int = 500) -> Example:
    rng = np.random.default_rng(seed)
    templates = (rng.random((CLASSES, 1, SIDE, SIDE)) > 0.5).astype(np.float32)
    w1 = (rng.normal(0.0, 1.0, (CONV1, 1, 3, 3)) / 3.0).astype(np.float32)
    w2 = (rng.normal(0.0, 1.0, (CONV2, CONV1, 3, 3)) / 12.0).astype(np.float32)

    # The dense layer: least squares of one-hot labels on the features ONNX Runtime computes.
    train_x, train_y = frames(rng, templates, train)
    extractor = ort.InferenceSession(
        _graph(w1, w2, None).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (features,) = extractor.run(None, {INPUT_NAME: train_x})
    design = np.hstack([features, np.ones((train, 1), np.float32)]).astype(np.float64)
    onehot = np.eye(CLASSES)[train_y] * 4.0  # a scale that gives confident softmax outputs
    # Ridge-regularised: fewer training frames than features would fit the noise.
    gram = design.T @ design + RIDGE * np.eye(design.shape[1])
    solution = np.linalg.solve(gram, design.T @ onehot)
    # Gemm computes features @ fc_w + fc_b.
    fc_w = np.ascontiguousarray(solution[:-1], dtype=np.float32)
    fc_b = np.ascontiguousarray(solution[-1], dtype=np.float32)

    model = _graph(w1, w2, (fc_w, fc_b)).SerializeToString()
    calibration_x, _ = frames(rng, templates, calibration)
    test_x, test_y = frames(rng, templates, test)
    return Example(model, calibration_x, test_x, test_y)


def write(example: Example, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "model": out_dir / "conv.onnx",
        "calibration": out_dir / "calibration.npz",
        "labelled": out_dir / "labelled.npz",
    }
    paths["model"].write_bytes(example.model)
    for key, arrays in (
        ("calibration", {"x": example.calibration_x}),
        ("labelled", {"x": example.test_x, "y": example.test_y}),
    ):
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        paths[key].write_bytes(buffer.getvalue())
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for key, path in write(build(args.seed), args.out).items():
        print(f"{key:<12} {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
