"""The ONNX Runtime backend.

Every onnxruntime exception raised while loading is translated into :class:`RuntimeLoadError`
here, in :meth:`OnnxRuntime.load`; every failure of one ``run`` call into
:class:`RuntimeRunError`. Nothing outside this module needs to know onnxruntime's exception types.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edgewise.serving.runtime.base import (
    ClosesOnExit,
    RuntimeLoadError,
    RuntimeRunError,
    TensorSpec,
    model_file,
    order_providers,
)

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"

# ONNX tensor element types this backend hands to and takes from numpy.
_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}

# What an onnxruntime load failure means, by the class name of its exception.
_LOAD_FAILURES = {
    "InvalidProtobuf": "not an ONNX model (the file does not parse)",
    "InvalidGraph": "the graph is invalid",
    "NotImplemented": "the model needs an operator or opset this onnxruntime does not implement",
    "NoSuchFile": "file not found",
    "NoModel": "no model in the file",
    "EPFail": "the execution provider failed",
}


def select_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The requested providers this onnxruntime build has, in the requested order, with the
    CPU provider last as the fallback (it serves whatever the others cannot)."""
    chosen, missing = order_providers(requested, available, CPU)
    if missing:
        log.warning(
            "onnxruntime %s has no %s; available: %s",
            ort.__version__,
            ", ".join(missing),
            ", ".join(available) or "none",
        )
    return chosen


# Providers that run only operators of their own (remote calls) and never a model's graph.
_NOT_COMPUTE = frozenset({"AzureExecutionProvider"})


def serving_provider(session_providers: Sequence[str]) -> str:
    """The provider that runs the graph: the session's first that computes (the Azure provider
    only forwards its own remote-call operators, so a session that lists it first still runs
    every node on the next one)."""
    return next((p for p in session_providers if p not in _NOT_COMPUTE), CPU)


class OnnxRuntime(ClosesOnExit):
    """One ONNX model in one ``onnxruntime.InferenceSession``; see :class:`Runtime`."""

    name = "onnxruntime"

    def __init__(self, session: ort.InferenceSession, path: Path) -> None:
        """Wrap a session; use :meth:`load` rather than calling this."""
        self.path = path
        inputs = session.get_inputs()
        outputs = session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise RuntimeLoadError(
                f"{path}: the model must have exactly one input and one output; it has "
                f"{len(inputs)} input(s) ({_names(inputs)}) and "
                f"{len(outputs)} output(s) ({_names(outputs)})"
            )
        self.input_spec = _spec(path, "input", inputs[0])
        self.output_spec = _spec(path, "output", outputs[0])
        if len(self.input_spec.shape) < 1:
            raise RuntimeLoadError(
                f"{path}: input {self.input_spec.describe()} has no batch dimension"
            )
        if len(self.output_spec.shape) != 2:
            raise RuntimeLoadError(
                f"{path}: output {self.output_spec.describe()} must be 2-D scores [N, C]"
            )
        self.providers: tuple[str, ...] = tuple(session.get_providers())
        self.provider: str = serving_provider(self.providers)
        self._session: ort.InferenceSession | None = session
        # Built once: the hot path only builds the feed dict.
        self._input_name = self.input_spec.name
        self._output_names = [self.output_spec.name]
        self._dtype = self.input_spec.dtype

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        providers: Sequence[str] = (CPU,),
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
    ) -> OnnxRuntime:
        """Load an ONNX model file.

        ``providers`` are tried in order; those this onnxruntime build lacks are skipped (and
        logged) and the CPU provider is always kept as the fallback. ``intra_op_threads`` sizes
        the pool one operator may use, ``inter_op_threads`` the pool for independent branches
        (used only when > 1); 0 leaves either to onnxruntime (one thread per core).

        Raises :class:`RuntimeLoadError` if the file is missing or not a loadable model, or if
        the model does not have exactly one tensor input (with a batch dimension) and one 2-D
        tensor output.
        """
        file = model_file(path, intra_op_threads, inter_op_threads)
        chosen = select_providers(list(providers), ort.get_available_providers())
        options = _session_options(intra_op_threads, inter_op_threads)
        try:
            session = ort.InferenceSession(os.fspath(file), sess_options=options, providers=chosen)
        except Exception as exc:  # the one boundary for onnxruntime's load errors
            what = _LOAD_FAILURES.get(type(exc).__name__, "load failed")
            raise RuntimeLoadError(
                f"onnxruntime {ort.__version__} cannot load {file}: {what}: {_oneline(exc)}"
            ) from exc
        # If a provider fails mid-run, fail that run instead of silently switching to the CPU
        # (which would make ``provider`` lie).
        session.disable_fallback()
        runtime = cls(session, file)
        log.info(
            "loaded %s with onnxruntime %s on %s: %s -> %s (threads intra=%d inter=%d)",
            file,
            ort.__version__,
            runtime.provider,
            runtime.input_spec.describe(),
            runtime.output_spec.describe(),
            intra_op_threads,
            inter_op_threads,
        )
        return runtime

    def run(self, batch: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Scores ``[N, C]`` for a batch ``[N, *input_spec.sample_shape]``.

        The batch is converted (to the input dtype, C-contiguous) only if it is not already so.
        Raises :class:`RuntimeRunError` if onnxruntime rejects the batch or fails, or if closed.
        """
        session = self._session
        if session is None:
            raise RuntimeRunError(f"{self.path}: the runtime is closed")
        if batch.dtype != self._dtype or not batch.flags.c_contiguous:
            batch = np.ascontiguousarray(batch, dtype=self._dtype)
        try:
            outputs = session.run(self._output_names, {self._input_name: batch})
        except Exception as exc:  # the one boundary for onnxruntime's run errors
            raise RuntimeRunError(
                f"onnxruntime failed on a batch of shape {batch.shape}: {_oneline(exc)}"
            ) from exc
        scores: npt.NDArray[Any] = outputs[0]
        return scores

    def close(self) -> None:
        """Release the session (idempotent)."""
        self._session = None

    def __repr__(self) -> str:
        state = "closed" if self._session is None else self.provider
        return (
            f"<OnnxRuntime {self.path.name} {self.input_spec.describe()} -> "
            f"{self.output_spec.describe()} on {state}>"
        )


def _session_options(intra_op_threads: int, inter_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if inter_op_threads > 1 else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The arena keeps freed buffers for reuse instead of going back to malloc on every run; for
    # models this small it holds little memory and keeps per-call latency steady.
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = True
    # Errors only: what onnxruntime would warn about (providers) is logged here, once.
    options.log_severity_level = 3
    return options


def _spec(path: Path, role: str, arg: Any) -> TensorSpec:
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise RuntimeLoadError(
            f"{path}: {role} {arg.name!r} is {arg.type}; a numeric tensor is required"
        )
    if arg.shape is None:
        raise RuntimeLoadError(f"{path}: {role} {arg.name!r} has no declared shape")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    return TensorSpec(name=str(arg.name), dtype=dtype, shape=shape)


def _names(args: Sequence[Any]) -> str:
    return ", ".join(repr(a.name) for a in args) or "none"


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
