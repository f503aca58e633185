"""Model file formats a release may carry, and the file suffix that goes with each.

The suffix is what :func:`edge_node.runtime.load_runtime` picks the backend by, so an artifact is
always stored under the suffix of its manifest's ``format``.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Final, Literal

ModelFormat = Literal["onnx", "tflite"]
MODEL_FORMATS: Final[tuple[ModelFormat, ...]] = ("onnx", "tflite")
_SUFFIXES: Final[dict[str, ModelFormat]] = {".onnx": "onnx", ".tflite": "tflite"}


def suffix_of(fmt: str) -> str:
    """``".onnx"`` for ``"onnx"``, ``".tflite"`` for ``"tflite"``."""
    return f".{fmt}"


def format_of(path: str | PurePath) -> ModelFormat | None:
    """The format a model file's suffix names (case-insensitive); None for any other suffix."""
    return _SUFFIXES.get(PurePath(path).suffix.lower())
