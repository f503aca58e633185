"""`edgewise model quantize | check` with real ONNX Runtime sessions on real files: the bundled
digits MLP (dynamic), a small conv net built here (static QDQ), the check's figures recomputed
from the same files, and hostile or mistaken inputs that must fail cleanly and leave nothing."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from edgewise.assets import bundled_asset
from edgewise.cli.app import app
from edgewise.compress import QuantizeError, SampleFileError
from edgewise.compress.quantize import choose_mode, quantize_model
from edgewise.compress.samples import read_samples
from edgewise.serving.runtime import TensorSpec, load_runtime

REPO = Path(__file__).resolve().parent.parent
EDGE = bundled_asset("digits_edge.onnx")
HOLDOUT = bundled_asset("digits_holdout.npz")
runner = CliRunner()


def run(*args: str, code: int = 0, stdout_only: bool = False) -> str:
    """The command's output; with ``stdout_only`` without what went to stderr (logs, progress),
    as a program reading ``--json`` from a pipe sees it."""
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == code, result.output
    return result.stdout if stdout_only else result.output


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_conv_example", REPO / "scripts" / "build_conv_example.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def conv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The example conv net with its calibration and labelled frames, written by the script."""
    script = _script()
    return dict(script.write(script.build(), tmp_path_factory.mktemp("conv")))


def _labels(path: Path, x: np.ndarray) -> np.ndarray:
    """Arg-max labels straight from an onnxruntime session (not through edgewise)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (scores,) = session.run(None, {session.get_inputs()[0].name: x})
    return np.asarray(scores).argmax(axis=1)


def _holdout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(HOLDOUT) as data:
        return data["images"], data["labels"]


def _initializer_bytes(path: Path) -> dict[int, int]:
    """Bytes of weight data by ONNX element type."""
    got: dict[int, int] = {}
    for t in onnx.load(str(path)).graph.initializer:
        n = onnx.numpy_helper.to_array(t).nbytes
        got[t.data_type] = got.get(t.data_type, 0) + n
    return got


def _spec(path: Path) -> TensorSpec:
    rt = load_runtime(path)
    rt.close()
    return rt.input_spec


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- quantize
def test_digits_mlp_is_quantized_dynamically_and_keeps_its_labels(tmp_path: Path) -> None:
    out = tmp_path / "edge-int8.onnx"
    text = run("model", "quantize", str(EDGE), str(out), "--calibration", str(HOLDOUT))
    assert "dynamic int8" in text
    assert "auto: no convolution in the graph" in text

    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert "MatMul" not in ops
    # The weights are int8 now: a quarter of the float bytes (the biases stay float32).
    before, after = _initializer_bytes(EDGE), _initializer_bytes(out)
    float_bytes = before[onnx.TensorProto.FLOAT]
    int8_bytes = after.get(onnx.TensorProto.INT8, 0)
    print(f"digits MLP weights: float {float_bytes} B -> int8 {int8_bytes} B")
    assert 0 < int8_bytes * 4 <= float_bytes
    # The file itself: this MLP has ~600 weights, so the quantization nodes can outweigh what
    # int8 saves; the command must say so when it happens rather than claim a saving.
    size_in, size_out = EDGE.stat().st_size, out.stat().st_size
    print(f"digits MLP file: {size_in} B -> {size_out} B")
    assert ("not smaller" in text) == (size_out >= size_in)
    assert f"{size_in:,} -> {size_out:,} bytes" in text

    x, _ = _holdout()
    assert _spec(out).describe() == "image float32 (?, 8, 8)"
    agree = float((_labels(EDGE, x) == _labels(out, x)).mean())
    print(f"digits MLP, dynamic int8: labels agree with float on {agree:.2%} of {len(x)}")
    assert agree >= 0.98  # measured 99.63 % (538/540) with onnxruntime 1.2x-1.3x
    assert f"({agree:.2%})" in text


def test_conv_net_is_quantized_static_qdq_and_shrinks(
    conv: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "conv-int8.onnx"
    text = run(
        "model", "quantize", str(conv["model"]), str(out), "--calibration", str(conv["calibration"])
    )
    assert "static int8 (QDQ, per-channel weights" in text
    assert "auto: the graph has Conv" in text
    assert "not smaller" not in text

    graph = onnx.load(str(out)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Conv") == 2
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(ops)
    assert onnx.TensorProto.INT8 in _initializer_bytes(out)
    size_in, size_out = conv["model"].stat().st_size, out.stat().st_size
    print(f"conv net: {size_in} B -> {size_out} B ({size_in / size_out:.2f}x smaller)")
    assert size_out * 3 < size_in  # measured 3.32x

    with np.load(conv["labelled"]) as data:
        x, y = data["x"], data["y"]
    float_labels, int8_labels = _labels(conv["model"], x), _labels(out, x)
    agree = float((float_labels == int8_labels).mean())
    acc_float, acc_int8 = float((float_labels == y).mean()), float((int8_labels == y).mean())
    print(f"conv net: agreement {agree:.2%}, accuracy {acc_float:.2%} -> {acc_int8:.2%}")
    assert agree >= 0.98  # measured 99.80 % (499/500)
    assert acc_int8 >= acc_float - 0.01


def test_static_calibration_reports_one_progress_step_per_batch(
    conv: dict[str, Path], tmp_path: Path
) -> None:
    totals: list[int] = []
    steps: list[None] = []
    result = quantize_model(
        conv["model"],
        tmp_path / "q.onnx",
        conv["calibration"],
        mode="static",
        batch=16,
        on_total=totals.append,
        on_batch=lambda: steps.append(None),
    )
    with np.load(conv["calibration"]) as data:
        n = len(data["x"])
    assert totals == [math.ceil(n / 16)]
    assert len(steps) == totals[0]
    assert result.samples == n
    assert result.output_bytes == (tmp_path / "q.onnx").stat().st_size


def test_static_mode_also_quantizes_the_mlp(tmp_path: Path) -> None:
    out = tmp_path / "edge-static.onnx"
    text = run(
        "model", "quantize", str(EDGE), str(out), "--calibration", str(HOLDOUT), "--mode", "static"
    )
    assert "static int8 (QDQ, per-tensor weights" in text
    assert "--mode static" in text
    assert {"QuantizeLinear", "DequantizeLinear"} <= {
        n.op_type for n in onnx.load(str(out)).graph.node
    }


def test_auto_mode_follows_the_graph() -> None:
    assert choose_mode("auto", {"Conv", "Relu", "Gemm"})[0] == "static"
    assert choose_mode("auto", {"ConvTranspose"})[0] == "static"
    assert choose_mode("auto", {"MatMul", "Add", "Relu", "Softmax"})[0] == "dynamic"
    assert choose_mode("static", {"MatMul"}) == ("static", "--mode static")
    mode, why = choose_mode("dynamic", {"Conv"})
    assert mode == "dynamic"
    assert "slow" in why


def test_a_model_with_nothing_to_quantize_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "cloud-int8.onnx"
    text = run(
        "model",
        "quantize",
        str(bundled_asset("digits_cloud.onnx")),
        str(out),
        "--calibration",
        str(HOLDOUT),
        code=2,
    )
    assert "was quantized" in text
    assert "SVMClassifier" in text
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- hostile input
def _write_npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    x, y = _holdout()
    not_a_model = tmp / "junk.onnx"
    not_a_model.write_bytes(b"\x08\x01 this is not protobuf \xff\xfe" * 10)
    text_calibration = tmp / "calib.npz"
    text_calibration.write_text("x,y\n1,2\n")
    zero_bytes = tmp / "zero.npz"
    zero_bytes.write_bytes(b"")
    out = str(tmp / "out" / "q.onnx")
    hol = str(HOLDOUT)
    return {
        "in_is_out": (
            [str(EDGE), str(EDGE.parent / ".." / "assets" / EDGE.name), "--calibration", hol],
            "is the input model",
        ),
        "wrong_shape": (
            [str(EDGE), out, "--calibration", str(_write_npz(tmp / "s.npz", x=x.reshape(-1, 64)))],
            "x is float32 (540, 64), which does not fit: the model's input 'image' wants x as "
            "float32 [N, 8, 8]",
        ),
        "wrong_dtype": (
            [str(EDGE), out, "--calibration", str(_write_npz(tmp / "d.npz", x=x.astype("f8")))],
            "x is float64 (540, 8, 8), which does not fit: the model's input 'image' wants x as "
            "float32 [N, 8, 8]",
        ),
        "empty": (
            [str(EDGE), out, "--calibration", str(_write_npz(tmp / "e.npz", x=x[:0]))],
            "no samples (x is float32 (0, 8, 8))",
        ),
        "no_x": (
            [str(EDGE), out, "--calibration", str(_write_npz(tmp / "n.npz", pixels=x))],
            "no array x / images / inputs (it has: pixels)",
        ),
        "nan": (
            [str(EDGE), out, "--calibration", str(_write_npz(tmp / "nan.npz", x=x * np.nan))],
            "x has NaN or infinite values",
        ),
        "pickled": (
            [str(EDGE), out, "--calibration", str(_write_npz(tmp / "p.npz", x=np.array([{}, 1])))],
            "x holds Python objects",
        ),
        "not_npz": ([str(EDGE), out, "--calibration", str(text_calibration)], "not an .npz"),
        "zero_bytes": ([str(EDGE), out, "--calibration", str(zero_bytes)], "not an .npz"),
        "missing_calibration": (
            [str(EDGE), out, "--calibration", str(tmp / "nope.npz")],
            "no such file",
        ),
        "not_a_model": (
            [str(not_a_model), out, "--calibration", hol],
            "not an ONNX model (the file does not parse)",
        ),
        "missing_model": (
            [str(tmp / "none.onnx"), out, "--calibration", hol],
            "none.onnx does not exist",
        ),
        "out_is_a_directory": (
            [str(EDGE), str(tmp / "out" / "sub.onnx"), "--calibration", hol],
            "it is a directory",
        ),
        "out_dir_missing": (
            [str(EDGE), str(tmp / "out" / "no" / "q.onnx"), "--calibration", hol],
            "does not exist",
        ),
        "out_not_onnx": ([str(EDGE), str(tmp / "out" / "q.bin"), "--calibration", hol], ".onnx"),
        "bad_mode": ([str(EDGE), out, "--calibration", hol, "--mode", "fast"], "--mode must be"),
        "labels_out_of_range": (
            [str(EDGE), out, "--calibration", str(_write_npz(tmp / "y.npz", x=x, y=y + 10))],
            "labels outside [0, 10)",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "in_is_out",
        "wrong_shape",
        "wrong_dtype",
        "empty",
        "no_x",
        "nan",
        "pickled",
        "not_npz",
        "zero_bytes",
        "missing_calibration",
        "not_a_model",
        "missing_model",
        "out_is_a_directory",
        "out_dir_missing",
        "out_not_onnx",
        "bad_mode",
        "labels_out_of_range",
    ],
)
def test_bad_input_fails_with_a_clear_message_and_writes_nothing(case: str, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    if case == "out_is_a_directory":
        (tmp_path / "out" / "sub.onnx").mkdir()
    args, message = _cases(tmp_path)[case]
    before = _sha(EDGE)
    text = run("model", "quantize", *args, code=2)
    assert message in " ".join(text.split()), text
    assert "Traceback" not in text
    left = {p.name for p in (tmp_path / "out").iterdir()}
    assert left == ({"sub.onnx"} if case == "out_is_a_directory" else set())  # no OUT, no temp
    assert _sha(EDGE) == before


def test_in_equal_out_through_a_hard_link_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(EDGE.read_bytes())
    link = tmp_path / "link.onnx"
    link.hardlink_to(model)
    text = run("model", "quantize", str(model), str(link), "--calibration", str(HOLDOUT), code=2)
    assert "is the input model" in text
    assert model.read_bytes() == EDGE.read_bytes()


def test_sample_files_are_size_capped_before_decompressing(tmp_path: Path) -> None:
    # 4 MB of zeros compress to a few KB: the cap must apply to the array, not to the file.
    path = _write_npz(tmp_path / "big.npz", x=np.zeros((16384, 8, 8), np.float32))
    np.savez_compressed(path, x=np.zeros((16384, 8, 8), np.float32))
    assert path.stat().st_size < 100_000
    spec = _spec(EDGE)
    with pytest.raises(SampleFileError, match=r"4,194,304 bytes uncompressed, more than the"):
        read_samples(path, spec, role="--calibration", max_bytes=1_000_000)
    assert len(read_samples(path, spec, role="--calibration")) == 16384


def test_the_bundled_holdout_is_read_as_it_is() -> None:
    samples = read_samples(HOLDOUT, _spec(EDGE), role="--labelled", need_labels=True)
    x, y = _holdout()
    assert samples.y is not None
    np.testing.assert_array_equal(samples.x, x)
    np.testing.assert_array_equal(samples.y, y)


def test_quantize_error_is_raised_by_the_library(tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="is the input model"):
        quantize_model(EDGE, EDGE, HOLDOUT)


# ----------------------------------------------------------------------------- check
def test_check_json_matches_the_files(conv: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "conv-int8.onnx"
    run(
        "model", "quantize", str(conv["model"]), str(out), "--calibration", str(conv["calibration"])
    )
    text = run(
        "model",
        "check",
        str(out),
        "--reference",
        str(conv["model"]),
        "--labelled",
        str(conv["labelled"]),
        "--json",
        "--runs",
        "25",
        "--warmup",
        "3",
        stdout_only=True,
    )
    report = json.loads(text)
    with np.load(conv["labelled"]) as data:
        x, y = data["x"], data["y"]
    mine, ref = _labels(out, x), _labels(conv["model"], x)
    assert report["samples"] == len(y)
    assert report["model"]["bytes"] == out.stat().st_size
    assert report["reference"]["bytes"] == conv["model"].stat().st_size
    assert report["size_ratio"] == pytest.approx(conv["model"].stat().st_size / out.stat().st_size)
    assert report["model"]["correct"] == int((mine == y).sum())
    assert report["model"]["accuracy"] == pytest.approx(float((mine == y).mean()))
    assert report["reference"]["accuracy"] == pytest.approx(float((ref == y).mean()))
    assert report["agreeing"] == int((mine == ref).sum())
    assert report["agreement"] == pytest.approx(float((mine == ref).mean()))
    for figures in (report["model"], report["reference"]):
        assert figures["backend"] == "onnxruntime"
        assert [lat["batch"] for lat in figures["latency"]] == [1, 32]
        for lat in figures["latency"]:
            assert lat["runs"] == 25
            assert 0 < lat["p50_ms"] <= lat["p99_ms"]
    print(json.dumps({k: report[k] for k in ("size_ratio", "agreement")}))


def test_check_table_shows_the_figures_at_a_glance() -> None:
    text = run(
        "model",
        "check",
        str(EDGE),
        "--reference",
        str(EDGE),
        "--labelled",
        str(HOLDOUT),
        "--runs",
        "20",
    )
    x, y = _holdout()
    correct = int((_labels(EDGE, x) == y).sum())
    size = EDGE.stat().st_size
    assert f"{size:,} B (1.00x smaller)" in text
    assert f"{correct / len(y):.2%} ({correct}/{len(y)}), +0.00 pt" in text
    assert "same label as reference" in text
    assert f"100.00% ({len(y)}/{len(y)})" in text
    assert re.search(r"latency batch 1 \(p50 / p99\)\s*│\s*[\d.]+ / [\d.]+ ms", text)
    assert "latency batch 32 (p50 / p99)" in text
    assert "onnxruntime CPUExecutionProvider" in text
    assert f"{len(y)} labelled samples from {HOLDOUT}" in " ".join(text.split())


def test_check_without_reference_has_no_agreement(conv: dict[str, Path]) -> None:
    report = json.loads(
        run(
            "model",
            "check",
            str(conv["model"]),
            "--labelled",
            str(conv["labelled"]),
            "--json",
            "--runs",
            "5",
            stdout_only=True,
        )
    )
    assert report["reference"] is None
    assert report["agreement"] is None
    assert report["size_ratio"] is None
    assert report["model"]["bytes"] == conv["model"].stat().st_size


def test_check_refuses_what_it_cannot_compare(conv: dict[str, Path], tmp_path: Path) -> None:
    text = run(
        "model",
        "check",
        str(conv["model"]),
        "--reference",
        str(EDGE),
        "--labelled",
        str(conv["labelled"]),
        code=2,
    )
    assert "compare models of the same input" in text
    unlabelled = run(
        "model", "check", str(conv["model"]), "--labelled", str(conv["calibration"]), code=2
    )
    assert "no labels; add y (or labels)" in " ".join(unlabelled.split())
    wrong = run("model", "check", str(conv["model"]), "--labelled", str(HOLDOUT), code=2)
    assert "wants x as float32 [N, 1, 16, 16]" in " ".join(wrong.split())
    missing = run("model", "check", str(tmp_path / "none.onnx"), "--labelled", str(HOLDOUT), code=2)
    assert "does not exist" in missing


# ----------------------------------------------------------------------------- help
@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("quantize", ["--calibration", "--mode", "static", "dynamic", "auto", "--batch", "OUT"]),
        ("check", ["--reference", "--labelled", "--json", "--runs", "--warmup", "p50", "p99"]),
    ],
)
def test_help_explains_the_command(command: str, words: list[str]) -> None:
    text = run("model", command, "--help")
    for word in words:
        assert word in text, word
    assert command in run("model", "--help")


def test_check_handles_a_fixed_batch_dimension(tmp_path: Path) -> None:
    """A model that takes exactly 4 samples: the last partial batch is padded, latency is timed
    at batch 4 only."""
    x, y = _holdout()
    centroids = np.stack([x[y == c].reshape(-1, 64).mean(axis=0) for c in range(10)])
    weights = onnx.numpy_helper.from_array(centroids.T.astype(np.float32), "w")
    shape = onnx.numpy_helper.from_array(np.array([4, 64], np.int64), "flat")
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Reshape", ["image", "flat"], ["f"]),
            onnx.helper.make_node("MatMul", ["f", "w"], ["s"]),
            onnx.helper.make_node("Softmax", ["s"], ["p"], axis=1),
        ],
        "fixed",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [4, 8, 8])],
        [onnx.helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, [4, 10])],
        [weights, shape],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "fixed.onnx"
    onnx.save(model, str(path))
    assert len(x) % 4 == 0  # 540: pad a copy to exercise the partial batch
    x5, y5 = x[:-1], y[:-1]
    data = _write_npz(tmp_path / "odd.npz", x=x5, y=y5)

    report = json.loads(
        run(
            "model",
            "check",
            str(path),
            "--labelled",
            str(data),
            "--json",
            "--runs",
            "5",
            stdout_only=True,
        )
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    padded = np.concatenate([x5, x5[-3:-2]])  # the last batch of 3 padded to 4
    labels = np.concatenate(
        [session.run(None, {"image": padded[i : i + 4]})[0].argmax(1) for i in range(0, 540, 4)]
    )[: len(y5)]
    assert report["samples"] == len(y5)
    assert report["model"]["correct"] == int((labels == y5).sum())
    assert [lat["batch"] for lat in report["model"]["latency"]] == [4]
