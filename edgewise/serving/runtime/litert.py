"""The LiteRT backend for ``.tflite`` models (CPU kernels, or the Coral Edge TPU delegate).

The interpreter comes from ``ai_edge_litert.interpreter`` (PyPI ``ai-edge-litert``, the
``litert`` extra); where only the frozen ``tflite_runtime`` is installed, from
``tflite_runtime.interpreter``. :attr:`LiteRtRuntime.name` says which: ``"litert"`` or
``"tflite-runtime"``.

Providers, in order of preference: ``"edgetpu"`` (the Edge TPU delegate, :mod:`.edgetpu`) and
``"cpu"`` (LiteRT's built-in kernels, always the last fallback). :attr:`LiteRtRuntime.provider`
is what actually serves and :attr:`LiteRtRuntime.fallback_reason` why a preferred one does not.

Quantized input and output (ADR 0050): a uint8/int8 tensor with a scale and zero-point is
presented as float32 in ``input_spec`` / ``output_spec``; ``run`` quantizes float frames with the
input's parameters and dequantizes the scores, so a Coral model serves the same frames and gives
the same kind of scores as its float original.

Every exception of the interpreter is translated here into :class:`RuntimeLoadError` (in
:meth:`LiteRtRuntime.load`) or :class:`RuntimeRunError` (in :meth:`LiteRtRuntime.run`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.serving.runtime.base import (
    ClosesOnExit,
    RuntimeLoadError,
    RuntimeRunError,
    TensorSpec,
    format_shape,
    model_file,
    order_providers,
)
from edgewise.serving.runtime.edgetpu import EDGETPU_CUSTOM_OP, open_delegate

log = logging.getLogger(__name__)

EDGETPU = "edgetpu"
CPU = "cpu"
PROVIDERS: tuple[str, ...] = (EDGETPU, CPU)
"""The provider names this backend knows, in their usual order of preference."""

_INSTALL = "pip install 'edgewise[litert]'"


@dataclass(frozen=True, slots=True)
class Quantization:
    """The affine map of a quantized tensor: ``real = (q - zero_point) * scale``."""

    scale: float
    zero_point: int
    dtype: np.dtype[Any]

    def quantize(self, x: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
        info = np.iinfo(self.dtype)
        q = np.round(x / np.float32(self.scale)) + self.zero_point
        out: npt.NDArray[Any] = np.clip(q, info.min, info.max).astype(self.dtype)
        return out

    def dequantize(self, q: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        real = (q.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)
        return real.astype(np.float32, copy=False)


def interpreter_module() -> tuple[ModuleType, str, str]:
    """``(module, backend name, version)`` of the LiteRT interpreter that is installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        from ai_edge_litert import interpreter as litert
    except ImportError:
        pass
    else:
        try:
            return litert, "litert", version("ai-edge-litert")
        except PackageNotFoundError:
            return litert, "litert", "?"
    try:
        from tflite_runtime import interpreter as tflite
    except ImportError:
        raise RuntimeLoadError(
            f"no LiteRT interpreter is installed to serve .tflite models: {_INSTALL}"
        ) from None
    try:
        return tflite, "tflite-runtime", version("tflite-runtime")
    except PackageNotFoundError:
        return tflite, "tflite-runtime", "?"


def select_providers(requested: Sequence[str]) -> list[str]:
    """The requested providers this backend knows, in the requested order, with ``"cpu"`` last
    as the fallback. Unknown names (e.g. ONNX Runtime's) are dropped with one warning."""
    chosen, unknown = order_providers(requested, PROVIDERS, CPU)
    if unknown:
        log.warning(
            "LiteRT has no provider %s; known: %s", ", ".join(unknown), ", ".join(PROVIDERS)
        )
    return chosen


class LiteRtRuntime(ClosesOnExit):
    """One ``.tflite`` model in one LiteRT interpreter; see :class:`Runtime`."""

    def __init__(
        self,
        interpreter: Any,
        path: Path,
        *,
        name: str,
        provider: str,
        fallback_reason: str | None,
        delegate: Any | None = None,
    ) -> None:
        """Wrap an interpreter whose tensors are allocated; use :meth:`load` instead."""
        self.path = path
        self.name = name
        self.provider = provider
        self.fallback_reason = fallback_reason
        """Why the providers listed before :attr:`provider` do not serve; None if the first
        known one serves."""
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise RuntimeLoadError(
                f"{path}: the model must have exactly one input and one output; it has "
                f"{len(inputs)} input(s) ({_names(inputs)}) and "
                f"{len(outputs)} output(s) ({_names(outputs)})"
            )
        self._in, self.input_spec, self.input_quantization = _tensor(path, "input", inputs[0])
        self._out, self.output_spec, self.output_quantization = _tensor(path, "output", outputs[0])
        if len(self.input_spec.shape) < 1:
            raise RuntimeLoadError(
                f"{path}: input {self.input_spec.describe()} has no batch dimension"
            )
        if len(self.output_spec.shape) != 2:
            raise RuntimeLoadError(
                f"{path}: output {self.output_spec.describe()} must be 2-D scores [N, C]"
            )
        signature = [int(d) for d in inputs[0]["shape_signature"]]
        self.model_batch: int | None = None if signature[0] < 0 else signature[0]
        """The model's fixed batch size, or None if its batch dimension is dynamic. A fixed
        batch is served in chunks of that size (the last one padded), 1 meaning frame by frame."""
        self._resizable = any(d < 0 for d in signature)
        self._interpreter: Any | None = interpreter
        self._delegate = delegate  # kept alive as long as the interpreter uses it
        # The input shape the tensors are allocated for (load allocates the default one).
        self._shape: tuple[int, ...] | None = tuple(int(d) for d in inputs[0]["shape"])

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        providers: Sequence[str] = (CPU,),
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        edgetpu_library: str | None = None,
        edgetpu_device: str | None = None,
    ) -> LiteRtRuntime:
        """Load a ``.tflite`` model.

        ``providers`` are tried in order (see :func:`select_providers`); one that cannot serve
        is skipped, with the reason kept in :attr:`fallback_reason`. ``intra_op_threads`` is
        the interpreter's ``num_threads`` (0: LiteRT's default); LiteRT has no inter-op pool, so
        ``inter_op_threads`` is only checked. ``edgetpu_library`` and ``edgetpu_device`` choose
        the Edge TPU delegate file and device (defaults: ``libedgetpu.so.1``, the first device).

        Raises :class:`RuntimeLoadError` if no interpreter is installed, the file is missing or
        not a loadable model, the model needs the Edge TPU and none serves, or it does not have
        exactly one input (with a batch dimension) and one 2-D output.
        """
        file = model_file(path, intra_op_threads, inter_op_threads)
        module, name, version = interpreter_module()
        what = f"{name} {version}"
        # A first interpreter without delegates: proves the file is a model and lists its ops.
        plain = _construct(module, file, None, intra_op_threads, what)
        compiled = EDGETPU_CUSTOM_OP in _op_names(plain)
        reasons: list[str] = []
        for provider in select_providers(providers):
            if provider == EDGETPU:
                opened = open_delegate(module.load_delegate, edgetpu_library, edgetpu_device)
                if opened.delegate is None:
                    reasons.append(f"edgetpu: {opened.reason}")
                    continue
                if not compiled:
                    # The delegate would take nothing from the model: the CPU kernels would
                    # serve while ``provider`` said edgetpu.
                    reasons.append(
                        f"edgetpu: {file.name} is not compiled for the Edge TPU "
                        f"(no {EDGETPU_CUSTOM_OP}; run edgetpu_compiler on it)"
                    )
                    continue
                try:
                    interpreter = _construct(module, file, opened.delegate, intra_op_threads, what)
                    _prepare(interpreter, file, what)
                except RuntimeLoadError as exc:
                    reasons.append(f"edgetpu: {exc}")
                    continue
                delegate: Any | None = opened.delegate
            else:
                if compiled:
                    why = f" ({'; '.join(reasons)})" if reasons else ""
                    raise RuntimeLoadError(
                        f"{file} is compiled for the Edge TPU ({EDGETPU_CUSTOM_OP}) and no Edge "
                        f"TPU serves here{why}; the CPU cannot run it: ship a CPU variant of the "
                        "model (the .tflite before edgetpu_compiler) or attach an Edge TPU with "
                        "its delegate and list 'edgetpu' in the model's providers"
                    )
                interpreter = plain
                _prepare(interpreter, file, what)
                delegate = None
            reason = "; ".join(reasons) or None
            runtime = cls(
                interpreter,
                file,
                name=name,
                provider=provider,
                fallback_reason=reason,
                delegate=delegate,
            )
            if reason is not None:
                log.warning("%s: serving on %s: %s", file, provider, reason)
            log.info(
                "loaded %s with %s on %s: %s -> %s (threads %d)",
                file,
                what,
                provider,
                runtime.input_spec.describe(),
                runtime.output_spec.describe(),
                intra_op_threads,
            )
            return runtime
        raise AssertionError("unreachable: the cpu provider always ends the list")

    def run(self, batch: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Scores ``[N, C]`` (float32 if the output is quantized) for ``[N, *sample_shape]``.

        The batch is converted to the input dtype (C-contiguous) if it is not already so and the
        cast keeps its kind (float64 to float32 does; complex or text to float does not). Rows
        of a quantized model's batch that are not finite give NaN scores instead of a verdict.
        Raises :class:`RuntimeRunError` if the batch does not fit or the interpreter fails, or
        if closed; the runtime stays usable either way.
        """
        interpreter = self._interpreter
        if interpreter is None:
            raise RuntimeRunError(f"{self.path}: the runtime is closed")
        target = self.input_spec.dtype
        if batch.dtype != target and not np.can_cast(batch.dtype, target, casting="same_kind"):
            raise RuntimeRunError(
                f"{self.path}: a batch of {batch.dtype} cannot be converted to {target} "
                "without losing its meaning; send the model's input dtype"
            )
        batch = np.ascontiguousarray(batch, dtype=target)
        want = self.input_spec.shape
        fits = batch.ndim == len(want) and all(
            w is None or w == g for g, w in zip(batch.shape[1:], want[1:], strict=True)
        )
        if not fits:
            raise RuntimeRunError(
                f"{self.path}: a batch of shape {batch.shape} does not fit the model's input "
                f"{format_shape(want)}"
            )
        n = batch.shape[0]
        if n == 0:
            width = self.output_spec.shape[1] or 0
            return np.empty((0, width), dtype=self.output_spec.dtype)
        bad_rows: npt.NDArray[np.bool_] | None = None
        if self.input_quantization is not None:
            finite = np.isfinite(batch.reshape(n, -1)).all(axis=1)
            if not finite.all():
                bad_rows = ~finite
                batch = batch.copy()
                batch[bad_rows] = 0.0
            batch = self.input_quantization.quantize(batch)
        step = self.model_batch or n
        parts = [self._invoke(interpreter, batch[i : i + step], step) for i in range(0, n, step)]
        scores = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if self.output_quantization is not None:
            scores = self.output_quantization.dequantize(scores)
        if bad_rows is not None:
            scores[bad_rows] = np.nan
        return scores

    def _invoke(self, interpreter: Any, chunk: npt.NDArray[Any], step: int) -> npt.NDArray[Any]:
        rows = chunk.shape[0]
        if rows < step:  # the last chunk of a fixed-batch model: pad with zeros
            pad = np.zeros((step - rows, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        try:
            if chunk.shape != self._shape:
                self._allocate(chunk.shape)
            interpreter.set_tensor(self._in, chunk)
            interpreter.invoke()
            # get_tensor copies: the result does not alias a buffer the next invoke rewrites.
            out: npt.NDArray[Any] = interpreter.get_tensor(self._out)
        except RuntimeRunError:
            raise
        except Exception as exc:  # the one boundary for the interpreter's run errors
            self._shape = None  # reallocate before the next batch, whatever state this left
            raise RuntimeRunError(
                f"{self.name} failed on a batch of shape {chunk.shape} from {self.path}: "
                f"{_oneline(exc)}"
            ) from exc
        return out[:rows] if rows < step else out

    def _allocate(self, shape: tuple[int, ...]) -> None:
        interpreter = self._interpreter
        assert interpreter is not None
        self._shape = None
        try:
            if self._resizable:
                interpreter.resize_tensor_input(self._in, list(shape), strict=True)
            interpreter.allocate_tensors()
        except Exception as exc:
            raise RuntimeRunError(
                f"{self.name} cannot size {self.path}'s input to {shape}: {_oneline(exc)}"
            ) from exc
        self._shape = shape

    def close(self) -> None:
        """Release the interpreter, then its delegate (idempotent)."""
        self._interpreter = None
        self._delegate = None

    def __repr__(self) -> str:
        state = "closed" if self._interpreter is None else self.provider
        return (
            f"<LiteRtRuntime {self.path.name} {self.input_spec.describe()} -> "
            f"{self.output_spec.describe()} on {state}>"
        )


def _construct(
    module: ModuleType, file: Path, delegate: Any | None, threads: int, what: str
) -> Any:
    """A new interpreter for ``file`` (tensors not allocated)."""
    try:
        return module.Interpreter(
            model_path=os.fspath(file),
            experimental_delegates=[delegate] if delegate is not None else None,
            num_threads=threads or None,
        )
    except Exception as exc:  # the one boundary for the interpreter's load errors
        raise RuntimeLoadError(f"{what} cannot load {file}: {_load_failure(exc)}") from exc


def _prepare(interpreter: Any, file: Path, what: str) -> None:
    """Allocate the tensors once (at the model's default shape): proves the graph prepares."""
    try:
        interpreter.allocate_tensors()
    except Exception as exc:
        raise RuntimeLoadError(f"{what} cannot prepare {file}: {_load_failure(exc)}") from exc


def _load_failure(exc: BaseException) -> str:
    text = _oneline(exc)
    if "not a valid Flatbuffer" in text or "allocation is null" in text:
        return f"not a TFLite model (the file does not parse): {text}"
    if "unresolved custom op" in text:
        return f"the model needs a custom operator this interpreter lacks: {text}"
    return text


def _op_names(interpreter: Any) -> set[str]:
    """The names of the model's operators (empty if this interpreter cannot list them)."""
    details = getattr(interpreter, "_get_ops_details", None)
    if details is None:
        return set()
    try:
        return {str(op.get("op_name", "")) for op in details()}
    except Exception:  # listing is best effort: allocating the tensors fails clearly instead
        return set()


def _tensor(
    path: Path, role: str, detail: dict[str, Any]
) -> tuple[int, TensorSpec, Quantization | None]:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind not in "fiub":
        raise RuntimeLoadError(
            f"{path}: {role} {detail['name']!r} is {dtype}; a numeric tensor is required"
        )
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    shape = tuple(None if int(d) < 0 else int(d) for d in dims)
    scale, zero_point = detail.get("quantization", (0.0, 0))
    quantization = None
    if scale and dtype.kind in "iu":
        quantization = Quantization(float(scale), int(zero_point), dtype)
        dtype = np.dtype(np.float32)
    if shape:  # the batch dimension: whatever the model fixes, run() takes any N
        shape = (None, *shape[1:])
    spec = TensorSpec(name=str(detail["name"]), dtype=dtype, shape=shape)
    return int(detail["index"]), spec, quantization


def _names(details: Sequence[dict[str, Any]]) -> str:
    return ", ".join(repr(d["name"]) for d in details) or "none"


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
