"""Both runtime backends refuse a model path that is not a file before loading anything, with a
message naming the path (the checks live once, in ``edgewise.serving.runtime.base.model_file``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgewise.serving.runtime.base import RuntimeLoadError
from edgewise.serving.runtime.litert import LiteRtRuntime
from edgewise.serving.runtime.onnx import OnnxRuntime

BACKENDS = [(OnnxRuntime, "onnx"), (LiteRtRuntime, "tflite")]


@pytest.mark.parametrize(("backend", "ext"), BACKENDS, ids=["onnx", "litert"])
def test_missing_file(tmp_path: Path, backend: type[OnnxRuntime | LiteRtRuntime], ext: str) -> None:
    with pytest.raises(RuntimeLoadError, match=rf"model file .*nope\.{ext} does not exist"):
        backend.load(tmp_path / f"nope.{ext}")


@pytest.mark.parametrize(("backend", "ext"), BACKENDS, ids=["onnx", "litert"])
def test_directory_instead_of_file(
    tmp_path: Path, backend: type[OnnxRuntime | LiteRtRuntime], ext: str
) -> None:
    path = tmp_path / f"model.{ext}"
    path.mkdir()
    with pytest.raises(RuntimeLoadError, match=rf"model path .*model\.{ext} is not a file"):
        backend.load(path)
