"""The ONNX Runtime backend on the real bundled models (real sessions, no mocks)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import edgewise.assets
from edgewise.serving.runtime import (
    Runtime,
    RuntimeLoadError,
    RuntimeRunError,
    TensorSpec,
    load_runtime,
)
from edgewise.serving.runtime.onnx import CPU, OnnxRuntime, select_providers, serving_provider

ASSETS = Path(edgewise.assets.__file__).parent
EDGE = ASSETS / "digits_edge.onnx"
CLOUD = ASSETS / "digits_cloud.onnx"
IMAGE_SPEC = TensorSpec("image", np.dtype(np.float32), (None, 8, 8))
PROBA_SPEC = TensorSpec("probabilities", np.dtype(np.float32), (None, 10))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    with np.load(ASSETS / "digits_holdout.npz") as data:
        return np.asarray(data["images"])


@pytest.fixture(scope="module", params=[EDGE, CLOUD], ids=["edge", "cloud"])
def runtime(request: pytest.FixtureRequest) -> Iterator[OnnxRuntime]:
    rt = OnnxRuntime.load(request.param)
    yield rt
    rt.close()


def _unavailable_provider() -> str:
    available = ort.get_available_providers()
    return next(
        p
        for p in ("CUDAExecutionProvider", "CoreMLExecutionProvider", "NoSuchExecutionProvider")
        if p not in available
    )


# ---------------------------------------------------------------------------- the real models
def test_both_models_load_with_exact_specs(runtime: OnnxRuntime) -> None:
    assert isinstance(runtime, Runtime)
    assert runtime.name == "onnxruntime"
    assert runtime.provider == CPU
    assert runtime.input_spec == IMAGE_SPEC
    assert runtime.output_spec == PROBA_SPEC


def test_run_gives_probabilities_for_each_frame(runtime: OnnxRuntime, images: np.ndarray) -> None:
    scores = runtime.run(images[:32])
    assert scores.dtype == np.float32
    assert scores.shape == (32, 10)
    assert np.all(scores >= 0.0)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)


def test_batch_run_equals_per_sample_runs(runtime: OnnxRuntime, images: np.ndarray) -> None:
    batch = runtime.run(images)
    singles = np.concatenate([runtime.run(images[i : i + 1]) for i in range(len(images))])
    assert batch.shape == singles.shape == (len(images), 10)
    np.testing.assert_allclose(batch, singles, rtol=1e-5, atol=1e-6)
    assert batch.argmax(axis=1).tolist() == singles.argmax(axis=1).tolist()


def test_empty_batch(runtime: OnnxRuntime, images: np.ndarray) -> None:
    assert runtime.run(images[:0]).shape == (0, 10)


def test_foreign_layouts_and_dtypes_are_converted(images: np.ndarray) -> None:
    with OnnxRuntime.load(EDGE) as rt:
        expected = rt.run(np.ascontiguousarray(images[::3]))
        strided = images[::3]  # a non-contiguous view
        assert not strided.flags.c_contiguous
        np.testing.assert_array_equal(rt.run(strided), expected)
        np.testing.assert_array_equal(rt.run(np.asfortranarray(images[::3])), expected)
        np.testing.assert_array_equal(rt.run(images[::3].astype(np.float64)), expected)


def test_threads_do_not_change_results(images: np.ndarray) -> None:
    with (
        OnnxRuntime.load(CLOUD) as one,
        OnnxRuntime.load(CLOUD, intra_op_threads=2, inter_op_threads=2) as two,
    ):
        np.testing.assert_allclose(two.run(images[:64]), one.run(images[:64]), atol=1e-6)


def test_a_batch_that_does_not_fit_raises_run_error_and_the_runtime_survives(
    images: np.ndarray,
) -> None:
    with OnnxRuntime.load(EDGE) as rt:
        with pytest.raises(
            RuntimeRunError, match=r"batch of shape \(2, 4, 4\).*invalid dimensions"
        ):
            rt.run(np.zeros((2, 4, 4), dtype=np.float32))
        assert rt.run(images[:2]).shape == (2, 10)


def test_run_after_close_raises_and_close_is_idempotent(images: np.ndarray) -> None:
    rt = OnnxRuntime.load(EDGE)
    rt.close()
    rt.close()
    with pytest.raises(RuntimeRunError, match="closed"):
        rt.run(images[:1])
    assert "closed" in repr(rt)


# ---------------------------------------------------------------------------- providers
def test_unavailable_provider_falls_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    missing = _unavailable_provider()
    with caplog.at_level(logging.WARNING, logger="edgewise.serving.runtime.onnx"):
        rt = OnnxRuntime.load(EDGE, providers=(missing, CPU))
    assert rt.provider == CPU
    assert rt.providers == (CPU,)
    assert any(missing in r.getMessage() for r in caplog.records)
    rt.close()


def test_only_unavailable_providers_still_serve_on_cpu() -> None:
    with OnnxRuntime.load(EDGE, providers=(_unavailable_provider(),)) as rt:
        assert rt.provider == CPU


def test_a_provider_that_runs_no_graph_node_is_not_reported_as_serving() -> None:
    """This onnxruntime build lists the Azure provider as available; asked first, it still
    leaves the whole graph to the CPU, and ``provider`` must say so (status, accelerator check)."""
    if "AzureExecutionProvider" not in ort.get_available_providers():
        assert serving_provider(("AzureExecutionProvider", CPU)) == CPU
        return
    with OnnxRuntime.load(EDGE, providers=("AzureExecutionProvider", CPU)) as rt:
        assert rt.providers[0] == "AzureExecutionProvider"
        assert rt.provider == CPU


def test_select_providers_keeps_order_drops_missing_and_ends_with_cpu() -> None:
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]
    assert select_providers(["CUDAExecutionProvider", "TensorrtExecutionProvider"], available) == [
        "CUDAExecutionProvider",
        "TensorrtExecutionProvider",
        CPU,
    ]
    assert select_providers(["OpenVINOExecutionProvider", CPU, CPU], available) == [CPU]
    assert select_providers([], available) == [CPU]
    assert select_providers([CPU, "CUDAExecutionProvider"], available) == [
        CPU,
        "CUDAExecutionProvider",
    ]


def test_negative_thread_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="thread counts"):
        OnnxRuntime.load(EDGE, intra_op_threads=-1)


# ---------------------------------------------------------------------------- load failures
def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\xff\xfe this is not a protobuf \x00" * 50)
    with pytest.raises(RuntimeLoadError, match=r"cannot load .*garbage\.onnx: not an ONNX model"):
        OnnxRuntime.load(path)


@pytest.mark.parametrize("keep", [0, 100, 1000, 2000], ids=lambda k: f"first{k}bytes")
def test_truncated_model(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "truncated.onnx"
    path.write_bytes(EDGE.read_bytes()[:keep])
    with pytest.raises(RuntimeLoadError, match=r"cannot load .*truncated\.onnx: "):
        OnnxRuntime.load(path)


def _save(
    tmp_path: Path,
    name: str,
    inputs: list[Any],
    outputs: list[Any],
    nodes: list[Any],
    ml: bool = False,
    initializers: dict[str, np.ndarray] | None = None,
) -> Path:
    """Build, check and save a tiny ONNX model (the onnx package is needed only for this)."""
    import onnx
    from onnx import helper, numpy_helper

    constants = [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=constants)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("ai.onnx.ml", 3)] if ml else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def test_a_model_with_two_inputs_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    path = _save(
        tmp_path,
        "two_inputs",
        inputs=[
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4]),
        ],
        outputs=[helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 4])],
        nodes=[helper.make_node("Add", ["a", "b"], ["sum"])],
    )
    # The graph itself is fine: onnxruntime runs it.
    session = ort.InferenceSession(str(path), providers=[CPU])
    ones = np.ones((1, 4), dtype=np.float32)
    assert session.run(None, {"a": ones, "b": ones})[0].tolist() == [[2.0] * 4]
    with pytest.raises(
        RuntimeLoadError,
        match=r"two_inputs\.onnx: the model must have exactly one input and one output; "
        r"it has 2 input\(s\) \('a', 'b'\) and 1 output\(s\) \('sum'\)",
    ):
        load_runtime(path)


def test_a_model_with_two_outputs_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    path = _save(
        tmp_path,
        "two_outputs",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        outputs=[
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4]),
        ],
        nodes=[helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])],
    )
    with pytest.raises(RuntimeLoadError, match=r"2 output\(s\) \('y', 'z'\)"):
        load_runtime(path)


def test_a_zipmap_output_is_refused(tmp_path: Path) -> None:
    """What skl2onnx emits without zipmap=False: a sequence of maps, not a tensor."""
    from onnx import TensorProto, helper

    seq_of_maps = helper.make_sequence_type_proto(
        helper.make_map_type_proto(
            TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
        )
    )
    path = _save(
        tmp_path,
        "zipmap",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        outputs=[helper.make_value_info("classes", seq_of_maps)],
        nodes=[
            helper.make_node(
                "ZipMap", ["x"], ["classes"], domain="ai.onnx.ml", classlabels_int64s=[0, 1]
            )
        ],
        ml=True,
    )
    with pytest.raises(
        RuntimeLoadError,
        match=r"output 'classes' is seq\(map\(int64,tensor\(float\)\)\); "
        r"a numeric tensor is required",
    ):
        load_runtime(path)


def test_a_1d_output_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    path = _save(
        tmp_path,
        "flat_scores",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        outputs=[helper.make_tensor_value_info("best", TensorProto.FLOAT, ["N"])],
        nodes=[helper.make_node("ReduceMax", ["x"], ["best"], axes=[1], keepdims=0)],
    )
    with pytest.raises(RuntimeLoadError, match=r"output best float32 \(\?,\) must be 2-D"):
        load_runtime(path)


def test_a_scalar_input_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    path = _save(
        tmp_path,
        "scalar_in",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        nodes=[helper.make_node("Reshape", ["x", "shape"], ["y"])],
        initializers={"shape": np.array([1, 1], dtype=np.int64)},
    )
    with pytest.raises(RuntimeLoadError, match=r"input x float32 \(\) has no batch dimension"):
        load_runtime(path)


# ---------------------------------------------------------------------------- load_runtime
def test_load_runtime_picks_onnx_by_suffix_case_insensitively(tmp_path: Path) -> None:
    upper = tmp_path / "EDGE.ONNX"
    shutil.copyfile(EDGE, upper)
    rt = load_runtime(upper, providers=(CPU,), intra_op_threads=1)
    assert isinstance(rt, OnnxRuntime)
    assert rt.input_spec == IMAGE_SPEC
    rt.close()


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("model.pb", ".pb"),
        ("model.onnx.bak", ".bak"),
        ("model", "'model' (no suffix)"),
    ],
)
def test_load_runtime_refuses_unknown_suffixes(tmp_path: Path, name: str, shown: str) -> None:
    path = tmp_path / name
    shutil.copyfile(EDGE, path)  # a valid ONNX model under the wrong name is still refused
    with pytest.raises(RuntimeLoadError) as info:
        load_runtime(path)
    assert str(info.value) == f"no backend for {shown}; supported: .onnx, .tflite"
