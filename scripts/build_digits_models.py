"""Build the bundled digits models and held-out frames in ``edgewise/assets``.

Run from the repository root (needs the ``build-models`` extra: scikit-learn, skl2onnx, onnx)::

    python scripts/build_digits_models.py

Nothing is downloaded: the data is scikit-learn's bundled copy of the UCI 8x8 digits
(``sklearn.datasets.load_digits``, 1,797 images). Pixels (0..16) are scaled to [0, 1] as float32,
then split 70/30, stratified by digit, with a fixed seed. The 30 % never seen in training is
written to ``digits_holdout.npz``; both models are trained on the 70 %:

* ``digits_edge.onnx``  a deliberately small MLP (one hidden layer of 6 units, ~600 weights), good
  but clearly imperfect, so that escalating its unsure frames to the cloud model pays off;
* ``digits_cloud.onnx`` an RBF support vector machine with sigmoid-calibrated class probabilities.

Both graphs take ``image`` float32 [N, 8, 8] (a Reshape to [N, 64] is prepended to what skl2onnx
emits) and give one output, ``probabilities`` float32 [N, 10] (the label output is removed).
``models.json`` records each file's sha256 and size, its held-out accuracy measured with
onnxruntime, the tensor specs, the split and the library versions.

Rerunning gives the same held-out set and the same model bytes for the same library versions
(the npz archive is written with fixed timestamps so its hash is stable too).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import skl2onnx
import sklearn
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.svm import SVC

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "edgewise" / "assets"
COMMAND = "python scripts/build_digits_models.py"

SPLIT_SEED = 20261122
TEST_SIZE = 0.3
EDGE_SEED = 0
# ONNX default-domain opset 17 and ai.onnx.ml opset 3 with IR version 8: loadable by every
# onnxruntime the project supports (>= 1.17; 1.17 reads IR <= 9 and opset <= 20).
OPSET = 17
ML_OPSET = 3
IR_VERSION = 8

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
SIDE = 8
CLASSES = 10
# skl2onnx's own names for the flat input and its two outputs.
_FLAT = "features"
_SKL_LABEL = "label"
_SKL_PROBA = "probabilities"


@dataclass(frozen=True)
class Split:
    train_x: npt.NDArray[np.float32]  # [n, 64]
    train_y: npt.NDArray[np.int64]
    test_x: npt.NDArray[np.float32]  # [m, 64]
    test_y: npt.NDArray[np.int64]


@dataclass(frozen=True)
class Built:
    key: str
    file: str
    estimator: str
    model: onnx.ModelProto
    blob: bytes


def load_split(seed: int = SPLIT_SEED) -> Split:
    """The bundled digits, scaled to [0, 1] float32, split 70/30 stratified by label."""
    digits = load_digits()
    x = (np.asarray(digits.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=seed
    )
    return Split(
        np.ascontiguousarray(train_x),
        np.ascontiguousarray(train_y),
        np.ascontiguousarray(test_x),
        np.ascontiguousarray(test_y),
    )


def edge_estimator() -> MLPClassifier:
    # Trained to convergence. 6 hidden units land in the low-to-mid 90s on the held-out set;
    # 12-16 units already reach ~96-97 %, which would leave little for the cloud model to fix.
    return MLPClassifier(hidden_layer_sizes=(6,), alpha=1e-3, max_iter=3000, random_state=EDGE_SEED)


def cloud_estimator() -> CalibratedClassifierCV:
    # One RBF SVC on all training data; per-class sigmoid calibrators fitted on 5-fold
    # out-of-fold decisions (unshuffled folds, so no randomness is involved).
    return CalibratedClassifierCV(
        SVC(C=5.0, gamma="scale", kernel="rbf"), method="sigmoid", ensemble=False, cv=5
    )


def to_onnx(estimator: ClassifierMixin, graph_name: str, doc: str) -> onnx.ModelProto:
    """Convert, then give the graph an [N, 8, 8] ``image`` input and only the probabilities."""
    converted = convert_sklearn(
        estimator,
        name=graph_name,
        initial_types=[(_FLAT, FloatTensorType([None, SIDE * SIDE]))],
        options={id(estimator): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
    )
    graph = converted.graph
    outputs = [o.name for o in graph.output]
    if outputs != [_SKL_LABEL, _SKL_PROBA]:
        raise SystemExit(f"unexpected skl2onnx outputs {outputs} for {graph_name}")

    # Keep only the nodes the probabilities depend on (drops the label's nodes).
    needed = {_SKL_PROBA}
    kept: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    initializers = [t for t in graph.initializer if t.name in needed]

    shape_const = numpy_helper.from_array(
        np.array([-1, SIDE * SIDE], dtype=np.int64), name="edgewise_flat_shape"
    )
    reshape = helper.make_node(
        "Reshape", [INPUT_NAME, shape_const.name], [_FLAT], name="edgewise_flatten_image"
    )
    new_graph = helper.make_graph(
        [reshape, *kept],
        graph_name,
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", SIDE, SIDE])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", CLASSES])],
        initializer=[shape_const, *initializers],
    )
    used_domains = {node.domain for node in new_graph.node}
    model = helper.make_model(
        new_graph,
        opset_imports=[o for o in converted.opset_import if o.domain in used_domains],
        producer_name="edgewise build_digits_models.py",
        producer_version=f"skl2onnx {skl2onnx.__version__}",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            "edgewise.output": "probabilities",
            "edgewise.classes": ",".join(str(c) for c in range(CLASSES)),
            "edgewise.input": "8x8 digit image, pixel/16 in [0, 1]",
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_probabilities(blob: bytes, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    (probabilities,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
    return np.asarray(probabilities, dtype=np.float32)


def spec_of(model: onnx.ModelProto) -> dict[str, Any]:
    def one(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        return {"name": value.name, "dtype": dtype, "shape": dims}

    (inp,) = model.graph.input
    (out,) = model.graph.output
    return {"input": one(inp), "output": one(out)}


def npz_bytes(arrays: dict[str, npt.NDArray[Any]]) -> bytes:
    """An ``np.load``-able archive with fixed member timestamps (np.savez stamps the clock)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(out_dir: Path) -> dict[str, Any]:
    split = load_split()
    images = split.test_x.reshape(-1, SIDE, SIDE)
    labels = split.test_y

    candidates: list[tuple[str, str, ClassifierMixin, str]] = [
        (
            "edge",
            "digits_edge.onnx",
            edge_estimator(),
            "edgewise edge model: small MLP on 8x8 digits (pixel/16); output class probabilities",
        ),
        (
            "cloud",
            "digits_cloud.onnx",
            cloud_estimator(),
            "edgewise cloud model: RBF SVC with sigmoid calibration on 8x8 digits (pixel/16); "
            "output class probabilities",
        ),
    ]
    built: list[Built] = []
    with warnings.catch_warnings():
        # skl2onnx's SVC converter reads SVC.probA_/probB_, which scikit-learn >= 1.9 flags as
        # deprecated (they belong to SVC(probability=True), which is not used here).
        warnings.filterwarnings(
            "ignore", message=r"Attribute `prob[AB]_` was deprecated", category=FutureWarning
        )
        for key, file, estimator, doc in candidates:
            estimator.fit(split.train_x, split.train_y)
            model = to_onnx(estimator, f"digits_{key}", doc)
            built.append(Built(key, file, _describe(estimator), model, model.SerializeToString()))
            # The converted graph must agree with scikit-learn on every held-out frame.
            skl = np.asarray(estimator.predict_proba(split.test_x), dtype=np.float64)
            ours = ort_probabilities(built[-1].blob, images).astype(np.float64)
            gap = float(np.abs(skl - ours).max())
            if gap > 1e-4 or not np.array_equal(skl.argmax(1), ours.argmax(1)):
                raise SystemExit(f"{file}: onnxruntime disagrees with scikit-learn (max gap {gap})")

    out_dir.mkdir(parents=True, exist_ok=True)
    holdout = npz_bytes({"images": images.astype(np.float32), "labels": labels.astype(np.int64)})
    (out_dir / "digits_holdout.npz").write_bytes(holdout)

    models: dict[str, Any] = {}
    for b in built:
        (out_dir / b.file).write_bytes(b.blob)
        # Accuracy is measured on the written bytes, with the runtime the edge node uses.
        predicted = ort_probabilities((out_dir / b.file).read_bytes(), images).argmax(axis=1)
        correct = int((predicted == labels).sum())
        models[b.key] = {
            "file": b.file,
            "sha256": sha256(b.blob),
            "bytes": len(b.blob),
            "estimator": b.estimator,
            "output_kind": "probabilities",
            "heldout_accuracy": round(correct / len(labels), 6),
            "heldout_correct": correct,
            "opset": {o.domain or "ai.onnx": o.version for o in b.model.opset_import},
            "ir_version": b.model.ir_version,
            **spec_of(b.model),
        }

    manifest: dict[str, Any] = {
        "generated_by": COMMAND,
        "requires": "pip install -e '.[build-models]' (scikit-learn, skl2onnx, onnx); no downloads",
        "dataset": {
            "source": "sklearn.datasets.load_digits (bundled with scikit-learn)",
            "samples": int(len(split.train_y) + len(labels)),
            "scaling": "pixel / 16 -> [0, 1], float32",
            "split": {
                "method": "sklearn.model_selection.train_test_split, stratified by label",
                "test_size": TEST_SIZE,
                "random_state": SPLIT_SEED,
                "train": len(split.train_y),
                "heldout": len(labels),
            },
        },
        "holdout": {
            "file": "digits_holdout.npz",
            "sha256": sha256(holdout),
            "bytes": len(holdout),
            "images": {"dtype": "float32", "shape": list(images.shape)},
            "labels": {"dtype": "int64", "shape": list(labels.shape)},
            "per_class": np.bincount(labels, minlength=CLASSES).tolist(),
        },
        "models": models,
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
            "skl2onnx": skl2onnx.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
    }
    text = json.dumps(manifest, indent=2) + "\n"
    (out_dir / "models.json").write_text(text, encoding="utf-8")
    return manifest


def _describe(estimator: ClassifierMixin) -> str:
    if isinstance(estimator, MLPClassifier):
        return (
            f"MLPClassifier(hidden_layer_sizes={estimator.hidden_layer_sizes}, "
            f"alpha={estimator.alpha}, random_state={estimator.random_state}); "
            f"{estimator.n_iter_} epochs"
        )
    if isinstance(estimator, CalibratedClassifierCV):
        svc = estimator.estimator
        assert isinstance(svc, SVC)
        n_sv = int(estimator.calibrated_classifiers_[0].estimator.support_.shape[0])
        return (
            f"CalibratedClassifierCV(SVC(kernel={svc.kernel!r}, C={svc.C}, gamma={svc.gamma!r}), "
            f"method={estimator.method!r}, ensemble=False, cv={estimator.cv}); "
            f"{n_sv} support vectors"
        )
    return type(estimator).__name__


def print_summary(manifest: dict[str, Any], out_dir: Path) -> None:
    holdout = manifest["holdout"]
    len_holdout = holdout["images"]["shape"][0]
    print(f"held-out frames: {holdout['images']['shape'][0]} -> {out_dir / holdout['file']}")
    header = f"{'model':<6} {'file':<18} {'bytes':>8} {'accuracy':>9}  {'correct':>7}  sha256"
    print(header)
    print("-" * len(header))
    for key, m in manifest["models"].items():
        print(
            f"{key:<6} {m['file']:<18} {m['bytes']:>8} {m['heldout_accuracy']:>9.2%}  "
            f"{m['heldout_correct']:>3}/{len_holdout:<3}  {m['sha256'][:16]}"
        )
    print(f"manifest: {out_dir / 'models.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ASSETS,
        help=f"output directory (default: {ASSETS.relative_to(REPO)})",
    )
    args = parser.parse_args(argv)
    manifest = build(args.out)
    print_summary(manifest, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
