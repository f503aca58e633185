"""The LiteRT backend on the committed .tflite models (real LiteRT interpreters, no mocks).

Variants with other batch dimensions are made here from the committed model by editing its
flatbuffer with the schema module ai-edge-litert ships (no TensorFlow needed).
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import edgewise.assets
from edgewise.serving.runtime import (
    Runtime,
    RuntimeLoadError,
    RuntimeRunError,
    TensorSpec,
    load_runtime,
)
from edgewise.serving.runtime.edgetpu import EDGETPU_CUSTOM_OP
from edgewise.serving.runtime.litert import (
    CPU,
    EDGETPU,
    LiteRtRuntime,
    Quantization,
    interpreter_module,
    select_providers,
)
from edgewise.serving.runtime.onnx import OnnxRuntime

ASSETS = Path(edgewise.assets.__file__).parent
FLOAT = ASSETS / "digits_edge.tflite"
UINT8 = ASSETS / "digits_edge_uint8.tflite"
ONNX = ASSETS / "digits_edge.onnx"
STUB = Path(__file__).parent / "data" / "edgetpu_stub.tflite"
IMAGE_SPEC = TensorSpec("image", np.dtype(np.float32), (None, 8, 8))
PROBA_SPEC = TensorSpec("probabilities", np.dtype(np.float32), (None, 10))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    with np.load(ASSETS / "digits_holdout.npz") as data:
        return np.asarray(data["images"])


def fixed_batch_variant(tmp_path: Path, batch: int) -> Path:
    """The committed float model with its batch dimension fixed to ``batch``."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(FLOAT.read_bytes(), 0))
    (graph,) = model.subgraphs
    for index in (*graph.inputs, *graph.outputs):
        tensor = graph.tensors[index]
        tensor.shape = np.array([batch, *tensor.shape[1:]], dtype=np.int32)
        tensor.shapeSignature = None
    builder = flatbuffers.Builder(4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path = tmp_path / f"digits_edge_batch{batch}.tflite"
    path.write_bytes(bytes(builder.Output()))
    return path


# ---------------------------------------------------------------------------- the real models
@pytest.mark.parametrize("path", [FLOAT, UINT8], ids=["float", "uint8"])
def test_both_models_load_with_the_onnx_models_specs(path: Path) -> None:
    with LiteRtRuntime.load(path) as rt:
        assert isinstance(rt, Runtime)
        assert rt.name == "litert"
        assert rt.provider == CPU
        assert rt.fallback_reason is None
        assert rt.model_batch is None  # dynamic
        # A quantized model is presented with float IO (ADR 0050).
        assert rt.input_spec == IMAGE_SPEC
        assert rt.output_spec == PROBA_SPEC


def test_the_uint8_model_gives_probabilities(images: np.ndarray) -> None:
    # (Agreement with the ONNX model is checked in test_assets_tflite.py.)
    with LiteRtRuntime.load(UINT8) as rt:
        scores = rt.run(images)
    assert scores.shape == (len(images), 10)
    assert scores.dtype == np.float32
    assert scores.min() >= 0.0 and scores.max() <= 1.0
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=0.05)


def test_float_model_computes_the_onnx_probabilities(images: np.ndarray) -> None:
    with LiteRtRuntime.load(FLOAT) as rt, OnnxRuntime.load(ONNX) as ref:
        np.testing.assert_allclose(rt.run(images), ref.run(images), atol=1e-5)


def test_batches_of_any_size_equal_per_sample_runs(images: np.ndarray) -> None:
    with LiteRtRuntime.load(FLOAT) as rt:
        whole = rt.run(images[:37])
        singles = np.concatenate([rt.run(images[i : i + 1]) for i in range(37)])
        mixed = np.concatenate([rt.run(images[:5]), rt.run(images[5:30]), rt.run(images[30:37])])
    np.testing.assert_allclose(singles, whole, atol=1e-6)
    np.testing.assert_allclose(mixed, whole, atol=1e-6)


def test_empty_batch(images: np.ndarray) -> None:
    with LiteRtRuntime.load(UINT8) as rt:
        out = rt.run(images[:0])
    assert out.shape == (0, 10)
    assert out.dtype == np.float32


@pytest.mark.parametrize("batch", [1, 4])
def test_a_fixed_batch_model_serves_any_batch(
    tmp_path: Path, images: np.ndarray, batch: int
) -> None:
    path = fixed_batch_variant(tmp_path, batch)
    with LiteRtRuntime.load(FLOAT) as dynamic, LiteRtRuntime.load(path) as fixed:
        assert fixed.model_batch == batch
        assert fixed.input_spec == IMAGE_SPEC  # run() takes any N
        for n in (1, 3, 4, 9):
            np.testing.assert_allclose(fixed.run(images[:n]), dynamic.run(images[:n]), atol=1e-6)


def test_results_are_copies_not_views_of_the_interpreters_buffers(
    tmp_path: Path, images: np.ndarray
) -> None:
    # A fixed batch of 1 reuses the same output buffer on every invoke.
    with LiteRtRuntime.load(fixed_batch_variant(tmp_path, 1)) as rt:
        first = rt.run(images[:1])
        kept = first.copy()
        rt.run(images[1:2])
        np.testing.assert_array_equal(first, kept)
    with LiteRtRuntime.load(FLOAT) as rt:
        first = rt.run(images[:4])
        kept = first.copy()
        rt.run(images[4:8])
        np.testing.assert_array_equal(first, kept)


def test_foreign_layouts_and_dtypes_are_converted(images: np.ndarray) -> None:
    with LiteRtRuntime.load(FLOAT) as rt:
        expected = rt.run(np.ascontiguousarray(images[::3]))
        np.testing.assert_array_equal(rt.run(images[::3]), expected)
        np.testing.assert_array_equal(rt.run(np.asfortranarray(images[::3])), expected)
        np.testing.assert_array_equal(rt.run(images[::3].astype(np.float64)), expected)


def test_threads_do_not_change_results(images: np.ndarray) -> None:
    with (
        LiteRtRuntime.load(FLOAT, intra_op_threads=1) as one,
        LiteRtRuntime.load(FLOAT, intra_op_threads=2) as two,
        LiteRtRuntime.load(FLOAT, intra_op_threads=0) as default,
    ):
        np.testing.assert_allclose(two.run(images[:64]), one.run(images[:64]), atol=1e-6)
        np.testing.assert_allclose(default.run(images[:64]), one.run(images[:64]), atol=1e-6)


def test_negative_thread_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="thread counts"):
        LiteRtRuntime.load(FLOAT, intra_op_threads=-1)


def test_run_after_close_raises_and_close_is_idempotent(images: np.ndarray) -> None:
    rt = LiteRtRuntime.load(FLOAT)
    rt.close()
    rt.close()
    with pytest.raises(RuntimeRunError, match="closed"):
        rt.run(images[:1])
    assert "closed" in repr(rt)


# ---------------------------------------------------------------------------- quantized IO
def test_the_uint8_model_quantizes_float_frames_with_its_input_parameters(
    images: np.ndarray,
) -> None:
    with LiteRtRuntime.load(UINT8) as rt, LiteRtRuntime.load(FLOAT) as ref:
        q_in, q_out = rt.input_quantization, rt.output_quantization
        assert q_in is not None and q_out is not None
        assert q_in.dtype == np.uint8 and q_out.dtype == np.uint8
        assert q_in.scale == pytest.approx(1 / 255) and q_in.zero_point == 0
        assert ref.input_quantization is None and ref.output_quantization is None
        scores = rt.run(images)
        # Dequantized scores are multiples of the output scale, close to the float model's.
        steps = scores / np.float32(q_out.scale)
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
        gap = float(np.abs(scores - ref.run(images)).max())
        print(f"uint8 vs float model: max probability gap {gap:.4f}")
        assert gap < 0.1


def test_quantization_rounds_clips_and_round_trips() -> None:
    q = Quantization(scale=1 / 255, zero_point=0, dtype=np.dtype(np.uint8))
    x = np.array([-1.0, 0.0, 0.6, 1.0, 2.0], dtype=np.float32)
    assert q.quantize(x).tolist() == [0, 0, 153, 255, 255]
    inside = np.linspace(0, 1, 101, dtype=np.float32)
    assert np.abs(q.dequantize(q.quantize(inside)) - inside).max() <= q.scale / 2 + 1e-7
    signed = Quantization(scale=0.5, zero_point=-3, dtype=np.dtype(np.int8))
    assert signed.quantize(np.array([-1000.0, 0.0, 1.0, 1000.0], np.float32)).tolist() == [
        -128,
        -3,
        -1,
        127,
    ]
    assert signed.dequantize(np.array([-3, -1], np.int8)).tolist() == [0.0, 1.0]


def test_a_non_finite_frame_gets_nan_scores_from_a_quantized_model(images: np.ndarray) -> None:
    batch = images[:4].copy()
    batch[1, 2, 3] = np.nan
    batch[3, 0, 0] = np.inf
    with LiteRtRuntime.load(UINT8) as rt:
        scores = rt.run(batch)
        assert np.isnan(scores[[1, 3]]).all()
        np.testing.assert_array_equal(scores[[0, 2]], rt.run(images[[0, 2]]))


# ---------------------------------------------------------------------------- providers
def test_select_providers_keeps_known_names_in_order_and_ends_with_cpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert select_providers([EDGETPU]) == [EDGETPU, CPU]
    assert select_providers([EDGETPU, CPU, EDGETPU]) == [EDGETPU, CPU]
    assert select_providers([CPU, EDGETPU]) == [CPU, EDGETPU]
    assert select_providers([]) == [CPU]
    with caplog.at_level(logging.WARNING, logger="edgewise.serving.runtime.litert"):
        got = select_providers(["CPUExecutionProvider", "gpu", "CPUExecutionProvider", EDGETPU])
    assert got == [EDGETPU, CPU]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "CPUExecutionProvider, gpu" in warnings[0] and "edgetpu, cpu" in warnings[0]


def test_onnx_provider_names_are_skipped_and_the_cpu_serves(
    caplog: pytest.LogCaptureFixture, images: np.ndarray
) -> None:
    with caplog.at_level(logging.WARNING, logger="edgewise.serving.runtime.litert"):
        rt = load_runtime(FLOAT, providers=("CPUExecutionProvider",))
    with rt:
        assert rt.provider == CPU
        assert rt.run(images[:2]).shape == (2, 10)
    assert sum("CPUExecutionProvider" in r.getMessage() for r in caplog.records) == 1


def test_no_edgetpu_delegate_falls_back_to_cpu_and_says_why(images: np.ndarray) -> None:
    # This machine has no libedgetpu; the default library name is tried through the loader.
    with LiteRtRuntime.load(FLOAT, providers=(EDGETPU, CPU)) as rt:
        assert rt.provider == CPU
        assert rt.fallback_reason is not None and rt.fallback_reason.startswith("edgetpu: ")
        assert rt.run(images[:3]).shape == (3, 10)


def test_a_missing_delegate_file_is_reported_as_not_installed(tmp_path: Path) -> None:
    missing = tmp_path / "libedgetpu.so.1"
    with LiteRtRuntime.load(UINT8, providers=(EDGETPU,), edgetpu_library=str(missing)) as rt:
        assert rt.provider == CPU
        assert rt.fallback_reason is not None
        assert f"{missing} is not installed" in rt.fallback_reason
        assert "libedgetpu1-std" in rt.fallback_reason


def test_a_delegate_path_that_is_not_a_library_falls_back(
    tmp_path: Path, images: np.ndarray
) -> None:
    fake = tmp_path / "libedgetpu.so.1"
    fake.write_text("this is not a shared library\n")
    with LiteRtRuntime.load(UINT8, providers=(EDGETPU, CPU), edgetpu_library=str(fake)) as rt:
        assert rt.provider == CPU
        assert rt.fallback_reason is not None
        assert "is not a loadable shared library" in rt.fallback_reason
        assert rt.run(images[:2]).shape == (2, 10)


def test_a_library_that_is_not_a_delegate_falls_back(images: np.ndarray) -> None:
    # A real ELF shared object without the delegate entry point: numpy's own extension.
    library = next(Path(np.__file__).parent.glob("_core/_multiarray_umath*.so"))
    with LiteRtRuntime.load(FLOAT, providers=(EDGETPU, CPU), edgetpu_library=str(library)) as rt:
        assert rt.provider == CPU
        assert rt.fallback_reason is not None
        assert "not a TFLite delegate" in rt.fallback_reason
        assert rt.run(images[:2]).shape == (2, 10)


@pytest.mark.parametrize("providers", [(EDGETPU, CPU), (CPU,)], ids=["edgetpu-cpu", "cpu"])
def test_a_model_compiled_for_the_edgetpu_without_a_delegate_is_refused(
    providers: tuple[str, ...],
) -> None:
    with pytest.raises(RuntimeLoadError) as info:
        LiteRtRuntime.load(STUB, providers=providers)
    message = str(info.value)
    assert str(STUB) in message
    assert f"compiled for the Edge TPU ({EDGETPU_CUSTOM_OP})" in message
    assert "ship a CPU variant" in message
    if EDGETPU in providers:
        assert "edgetpu: " in message  # why the delegate did not serve


# ---------------------------------------------------------------------------- hostile input
def test_a_batch_that_does_not_fit_raises_run_error_and_the_runtime_survives(
    images: np.ndarray,
) -> None:
    with LiteRtRuntime.load(FLOAT) as rt:
        for bad in (
            np.zeros((2, 4, 4), np.float32),
            np.zeros((2, 64), np.float32),
            np.zeros((2, 8, 8, 1), np.float32),
            np.zeros((8, 8), np.float32),
        ):
            with pytest.raises(
                RuntimeRunError, match=r"does not fit the model's input \(\?, 8, 8\)"
            ):
                rt.run(bad)
            assert rt.run(images[:2]).shape == (2, 10)


def test_a_batch_of_the_wrong_dtype_raises_run_error_and_the_runtime_survives(
    images: np.ndarray,
) -> None:
    with LiteRtRuntime.load(UINT8) as rt:
        with pytest.raises(RuntimeRunError, match="cannot be converted to float32"):
            rt.run(np.full((2, 8, 8), "x", dtype="<U1"))
        with pytest.raises(RuntimeRunError, match="cannot be converted to float32"):
            rt.run(np.full((2, 8, 8), 1 + 2j))
        assert rt.run(images[:2]).shape == (2, 10)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.tflite"
    path.write_bytes(b"\xff\xfe this is not a flatbuffer \x00" * 50)
    with pytest.raises(
        RuntimeLoadError, match=r"litert \S+ cannot load .*garbage\.tflite: not a TFLite model"
    ):
        LiteRtRuntime.load(path)


def test_an_onnx_model_renamed_to_tflite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "edge.tflite"
    shutil.copyfile(ONNX, path)
    with pytest.raises(RuntimeLoadError, match=r"cannot load .*edge\.tflite: not a TFLite model"):
        load_runtime(path)


@pytest.mark.parametrize("keep", [0, 16, 1000, 3000], ids=lambda k: f"first{k}bytes")
def test_truncated_model(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "truncated.tflite"
    path.write_bytes(FLOAT.read_bytes()[:keep])
    with pytest.raises(RuntimeLoadError, match=r"cannot (load|prepare) .*truncated\.tflite: "):
        LiteRtRuntime.load(path)


def test_without_an_interpreter_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    with pytest.raises(RuntimeLoadError, match=r"no LiteRT interpreter.*edgewise\[litert\]"):
        LiteRtRuntime.load(FLOAT)


def test_only_tflite_runtime_installed_names_that_backend(
    monkeypatch: pytest.MonkeyPatch, images: np.ndarray
) -> None:
    # tflite_runtime is frozen and not installed here: stand LiteRT's module in for it (same
    # Interpreter API) to check the fallback import and the name it gives.
    from ai_edge_litert import interpreter as litert

    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    package = type(sys)("tflite_runtime")
    package.interpreter = litert  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tflite_runtime", package)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", litert)
    module, name, _ = interpreter_module()
    assert module is litert and name == "tflite-runtime"
    with LiteRtRuntime.load(FLOAT) as rt:
        assert rt.name == "tflite-runtime"
        assert rt.run(images[:2]).shape == (2, 10)


# ---------------------------------------------------------------------------- load_runtime
def test_load_runtime_picks_litert_by_suffix_case_insensitively(tmp_path: Path) -> None:
    upper = tmp_path / "EDGE.TFLITE"
    shutil.copyfile(FLOAT, upper)
    rt = load_runtime(upper, providers=(CPU,), intra_op_threads=1, inter_op_threads=1)
    assert isinstance(rt, LiteRtRuntime)
    assert rt.input_spec == IMAGE_SPEC
    rt.close()


def test_interpreter_module_reports_the_installed_package() -> None:
    module, name, version = interpreter_module()
    assert name == "litert"
    assert module.__name__ == "ai_edge_litert.interpreter"
    assert version[0].isdigit()
