"""Model file formats a release may carry, and the file suffix that goes with each.

The suffix is what :func:`edgewise.serving.runtime.load_runtime` picks the backend by, so an
artifact is
always stored under the suffix of its manifest's ``format``.
"""

from __future__ import annotations

from typing import Final, Literal

ModelFormat = Literal["onnx", "tflite"]
MODEL_FORMATS: Final[tuple[ModelFormat, ...]] = ("onnx", "tflite")
_SUFFIXES: Final[dict[str, ModelFormat]] = {".onnx": "onnx", ".tflite": "tflite"}


def suffix_of(fmt: str) -> str:
    """``".onnx"`` for ``"onnx"``, ``".tflite"`` for ``"tflite"``."""
    return f".{fmt}"


def format_of(path: object) -> ModelFormat | None:
    """The format a model file's suffix names (case-insensitive); None for any other suffix.

    ``path`` is a path or a file name (``str()`` of it is read; no file is touched).
    """
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return _SUFFIXES.get(name[dot:].lower()) if dot > 0 else None
