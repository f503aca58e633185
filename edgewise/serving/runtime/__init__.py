"""Inference runtime backends behind one small interface.

:class:`Runtime` is what the node calls (``input_spec``, ``output_spec``, ``run``, ``close``);
:func:`load_runtime` picks the backend from the model file's suffix. Backends are imported only
when a model of their kind is loaded, so a device need not have every runtime installed.

============  ===========================================  ===============================
suffix        backend (``Runtime.name``)                   module
============  ===========================================  ===============================
``.onnx``     ONNX Runtime (``"onnxruntime"``)             :mod:`edgewise.serving.runtime.onnx`
``.tflite``   LiteRT (``"litert"``; ``"tflite-runtime"``   :mod:`edgewise.serving.runtime.litert`
              where only ``tflite_runtime`` is installed)
============  ===========================================  ===============================

Provider names are the backend's own: ONNX Runtime's execution providers (e.g.
``"CPUExecutionProvider"``) for ``.onnx``; ``"edgetpu"`` and ``"cpu"`` for ``.tflite``. Names a
backend does not know are skipped with a warning, and its CPU always serves as the last fallback;
``Runtime.provider`` says what actually serves. See docs/runtimes.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from edgewise.serving.runtime.base import (
    Runtime,
    RuntimeLoadError,
    RuntimeRunError,
    TensorSpec,
    format_shape,
)

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Runtime",
    "RuntimeLoadError",
    "RuntimeRunError",
    "TensorSpec",
    "format_shape",
    "load_runtime",
]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".onnx", ".tflite")


def load_runtime(
    path: str | os.PathLike[str],
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
) -> Runtime:
    """Load a model with the backend for its file suffix (case-insensitive).

    ``providers`` are the backend's accelerators in order of preference (for ONNX Runtime,
    execution provider names; for LiteRT ``"edgetpu"`` and ``"cpu"``); unavailable ones are
    skipped and the CPU serves as the fallback.
    Raises :class:`RuntimeLoadError` for an unsupported suffix or a model that cannot be loaded.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        from edgewise.serving.runtime.onnx import OnnxRuntime

        return OnnxRuntime.load(
            path,
            providers=providers,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
        )
    if suffix == ".tflite":
        from edgewise.serving.runtime.litert import LiteRtRuntime

        return LiteRtRuntime.load(
            path,
            providers=providers,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
        )
    shown = suffix or f"{Path(path).name!r} (no suffix)"
    raise RuntimeLoadError(f"no backend for {shown}; supported: {', '.join(SUPPORTED_SUFFIXES)}")
