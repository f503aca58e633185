"""int8 quantization of an ONNX model with ONNX Runtime's tools (``onnxruntime.quantization``).

Two modes (ADR 0060):

* ``static``: QDQ format, int8 weights (per output channel when the graph has convolutions,
  per tensor otherwise), uint8 activations whose ranges are
  calibrated (min/max) on sample inputs; the model is first run through ORT's pre-processing
  (``quant_pre_process``: ONNX shape inference and ORT's basic graph optimisations, e.g. folding
  constants and fusing batch normalisation into convolutions). The choice for conv nets.
* ``dynamic``: int8 weights, activations quantized at run time (``DynamicQuantizeLinear``); no
  calibration. The choice for MLPs; for convolutions it is much slower on CPU (``ConvInteger``).

``auto`` picks ``static`` when the graph has a convolution and ``dynamic`` otherwise. Every
onnx / onnxruntime exception raised while quantizing is translated into :class:`QuantizeError`
here. The output is written only once it loads with the node's runtime and has been run on the
calibration samples.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy.typing as npt

from edgewise.compress.errors import QuantizeError
from edgewise.compress.files import same_file
from edgewise.compress.predict import DEFAULT_BATCH, batch_size, batches, predict
from edgewise.compress.samples import read_samples
from edgewise.files import write_atomic
from edgewise.serving.runtime import Runtime, RuntimeLoadError, RuntimeRunError, load_runtime

Mode = Literal["auto", "static", "dynamic"]
MODES: tuple[str, ...] = ("auto", "static", "dynamic")
CONV_OPS = frozenset({"Conv", "ConvTranspose"})
# Operators a quantized graph has and a float one does not.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QLinearConv",
        "QLinearMatMul",
        "DynamicQuantizeMatMul",
    }
)
CALIBRATION_FLUSH_BATCHES = 16
"""Calibration folds intermediate outputs into running ranges every this many batches, so its
memory does not grow with the calibration set."""

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class QuantizeResult:
    source: Path
    output: Path
    mode: Literal["static", "dynamic"]
    why: str
    source_bytes: int
    output_bytes: int
    samples: int
    agreeing: int
    per_channel: bool

    @property
    def agreement(self) -> float:
        """Share of the calibration samples on which both models give the same label."""
        return self.agreeing / self.samples if self.samples else 0.0

    @property
    def ratio(self) -> float:
        """Source size over output size (> 1: the output is smaller)."""
        return self.source_bytes / self.output_bytes if self.output_bytes else 0.0


def choose_mode(mode: Mode, op_types: set[str]) -> tuple[Literal["static", "dynamic"], str]:
    """The mode to use and why."""
    convs = sorted(op_types & CONV_OPS)
    if mode == "static":
        return "static", "--mode static"
    if mode == "dynamic":
        why = "--mode dynamic"
        if convs:
            why += f" (the graph has {', '.join(convs)}: dynamic convolutions are slow on CPU)"
        return "dynamic", why
    if convs:
        return "static", f"auto: the graph has {', '.join(convs)}"
    return "dynamic", "auto: no convolution in the graph"


def quantize_model(
    source: Path,
    output: Path,
    calibration: Path,
    *,
    mode: Mode = "auto",
    batch: int = DEFAULT_BATCH,
    on_total: Callable[[int], None] = lambda n: None,
    on_batch: Callable[[], None] = lambda: None,
) -> QuantizeResult:
    """Quantize ``source`` into ``output`` (both ``.onnx``) with samples from ``calibration``.

    ``on_total`` is told how many calibration batches there will be (static mode) and
    ``on_batch`` is called after each. Raises :class:`QuantizeError` or
    :class:`~edgewise.compress.errors.SampleFileError`; then ``output`` is untouched.
    """
    if mode not in MODES:
        raise QuantizeError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    for role, path in (("input model", source), ("output", output)):
        if path.suffix.lower() != ".onnx":
            raise QuantizeError(f"the {role} {path} must be an .onnx file (ONNX Runtime quantizes)")
    if same_file(source, output):
        raise QuantizeError(
            f"OUT {output} is the input model; write the quantized model to another file"
        )
    if not output.parent.is_dir():
        raise QuantizeError(f"cannot write {output}: directory {output.parent} does not exist")
    if output.is_dir():
        raise QuantizeError(f"cannot write {output}: it is a directory; give a file name")
    onnx, q = _tools()
    float_rt = _load(source, "the input model")
    try:
        spec = float_rt.input_spec
        samples = read_samples(
            calibration, spec, role="--calibration", classes=float_rt.output_spec.shape[1]
        )
        try:
            graph = onnx.load(str(source), load_external_data=False).graph
        except Exception as exc:  # the one boundary for onnx's load errors
            raise QuantizeError(f"{source}: onnx cannot read it: {_oneline(exc)}") from exc
        op_types = {n.op_type for n in graph.node}
        chosen, why = choose_mode(mode, op_types)
        # Per-channel weight scales where they matter, on convolutions; per-tensor otherwise
        # (onnxruntime 1.32's per-channel bias check also fails on 2-D [1, C] Gemm biases).
        per_channel = bool(op_types & CONV_OPS)
        size = batch_size(float_rt, batch)
        with tempfile.TemporaryDirectory(prefix="edgewise-quantize-") as tmp:
            quantized = Path(tmp) / "quantized.onnx"
            if chosen == "static":
                on_total(-(-len(samples) // size))
            reader = _Reader(spec.name, samples.x, size, on_batch)
            _run_quantizer(q, chosen, source, quantized, reader, per_channel=per_channel)
            ops = {n.op_type for n in onnx.load(str(quantized)).graph.node}
            if not ops & QUANTIZED_OPS:
                raise QuantizeError(
                    f"nothing in {source} was quantized ({chosen}): its operators "
                    f"({', '.join(sorted({n.op_type for n in graph.node}))}) have no int8 form "
                    "in onnxruntime's quantizer"
                )
            agreeing = _agreement(float_rt, quantized, samples.x, size)
            data = quantized.read_bytes()
        try:
            write_atomic(output, data)
        except OSError as exc:
            raise QuantizeError(f"cannot write {output}: {exc}") from exc
    finally:
        float_rt.close()
    return QuantizeResult(
        source=source,
        output=output,
        mode=chosen,
        why=why,
        source_bytes=source.stat().st_size,
        output_bytes=len(data),
        samples=len(samples),
        agreeing=agreeing,
        per_channel=chosen == "static" and per_channel,
    )


def _run_quantizer(
    q: Any, mode: str, source: Path, quantized: Path, reader: _Reader, *, per_channel: bool
) -> None:
    """ORT's pre-processing and static QDQ quantization, or its dynamic quantization, into
    ``quantized`` (beside which the pre-processed model is written)."""
    with _quiet_ort():
        try:
            if mode == "static":
                pre = quantized.with_name("preprocessed.onnx")
                q.shape_inference.quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
                q.quantize_static(
                    str(pre),
                    str(quantized),
                    reader,
                    quant_format=q.QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=q.QuantType.QUInt8,
                    weight_type=q.QuantType.QInt8,
                    calibrate_method=q.CalibrationMethod.MinMax,
                    extra_options={"CalibMaxIntermediateOutputs": CALIBRATION_FLUSH_BATCHES},
                )
            else:
                q.quantize_dynamic(str(source), str(quantized), weight_type=q.QuantType.QInt8)
        except Exception as exc:  # the one boundary for onnxruntime.quantization
            raise QuantizeError(
                f"onnxruntime's quantizer failed on {source} ({mode}): {_oneline(exc)}"
            ) from exc


def _tools() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime.quantization as q
        import onnxruntime.quantization.shape_inference  # noqa: F401 - quant_pre_process
    except ImportError as exc:
        raise QuantizeError(
            f"quantizing needs the onnx package ({exc}): pip install 'edgewise[quantize]'"
        ) from exc
    return onnx, q


def _load(path: Path, what: str) -> Runtime:
    try:
        return load_runtime(path)
    except RuntimeLoadError as exc:
        raise QuantizeError(f"{what} cannot be loaded: {exc}") from exc


def _agreement(float_rt: Runtime, quantized: Path, x: npt.NDArray[Any], size: int) -> int:
    q_rt = _load(quantized, "the quantized model")
    try:
        return int((predict(float_rt, x, size) == predict(q_rt, x, size)).sum())
    except RuntimeRunError as exc:
        raise QuantizeError(f"the quantized model fails on the calibration samples: {exc}") from exc
    finally:
        q_rt.close()


class _Reader:
    """The calibration data reader ``quantize_static`` pulls batches from (ORT's
    ``CalibrationDataReader`` protocol: ``get_next`` until it returns ``None``)."""

    def __init__(
        self, name: str, x: npt.NDArray[Any], size: int, on_batch: Callable[[], None]
    ) -> None:
        self._name = name
        self._batches = batches(x, size)
        self._on_batch = on_batch

    def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self._on_batch()
        return {self._name: batch}

    def rewind(self) -> None:  # not used by the MinMax calibrator; the protocol has it
        raise NotImplementedError


class _OrtQuantizationNoise(logging.Filter):
    """Drops the quantizer's advice logged through the root logger (e.g. to pre-process, which
    ``static`` does and ``dynamic`` does not need); its errors still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = "onnxruntime" in record.pathname and record.levelno < logging.ERROR
        if noisy:
            log.debug("onnxruntime: %s", record.getMessage())
        return not noisy


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    root = logging.getLogger()
    # ``logging.warning`` on an unconfigured root logger would install a stderr handler for good.
    guard = logging.NullHandler() if not root.handlers else None
    noise = _OrtQuantizationNoise()
    if guard is not None:
        root.addHandler(guard)
    for handler in root.handlers:
        handler.addFilter(noise)
    root.addFilter(noise)
    try:
        yield
    finally:
        root.removeFilter(noise)
        for handler in root.handlers:
            handler.removeFilter(noise)
        if guard is not None:
            root.removeHandler(guard)


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400] or type(exc).__name__
