"""The backend-neutral contract every inference runtime implements (ONNX Runtime, LiteRT with the
CPU or a Coral Edge TPU): one input tensor in, one ``[N, C]`` score tensor out.
"""

from __future__ import annotations

import os
from collections.abc import Container, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np
import numpy.typing as npt


class RuntimeLoadError(Exception):
    """A model could not be loaded by a backend: missing or unreadable file, not a model, a graph
    the backend rejects, no usable execution provider, or a model that does not have exactly one
    tensor input and one tensor output. The message says which, and names the file."""


class RuntimeRunError(Exception):
    """The backend refused or failed one ``run`` call (the batch does not fit the model, or the
    runtime failed); the runtime stays usable for the next batch."""


def model_file(path: str | os.PathLike[str], intra_op_threads: int, inter_op_threads: int) -> Path:
    """What every backend checks before it loads: thread counts >= 0 (ValueError: a caller's
    bug) and an existing regular file (:class:`RuntimeLoadError` naming it)."""
    if intra_op_threads < 0 or inter_op_threads < 0:
        raise ValueError(
            f"thread counts must be >= 0, got intra={intra_op_threads} inter={inter_op_threads}"
        )
    file = Path(path)
    if not file.exists():
        raise RuntimeLoadError(f"model file {file} does not exist")
    if not file.is_file():
        raise RuntimeLoadError(f"model path {file} is not a file")
    return file


def format_shape(shape: tuple[int | None, ...]) -> str:
    """``(8, 8)``, ``(?, 10)``, ``(64,)``: like a tuple, with ``?`` for a dynamic dimension."""
    dims = ["?" if d is None else str(d) for d in shape]
    if len(dims) == 1:
        return f"({dims[0]},)"
    return f"({', '.join(dims)})"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output: its name, element type and shape.

    ``shape[0]`` is the batch dimension. ``None`` marks a dynamic dimension (the batch is usually
    dynamic); an integer is fixed.
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]

    @property
    def sample_shape(self) -> tuple[int | None, ...]:
        """The shape of one sample: ``shape`` without the batch dimension."""
        return self.shape[1:]

    def accepts(self, sample: npt.NDArray[Any]) -> str | None:
        """``None`` if one sample (no batch dimension) fits; otherwise a short reason.

        The dtype must match exactly (no silent casts) and so must every fixed dimension.
        The dtype is checked first, so a sample wrong in both ways is reported as a dtype problem.
        """
        if sample.dtype != self.dtype:
            return f"dtype {sample.dtype}, model wants {self.dtype}"
        want = self.sample_shape
        got: tuple[int, ...] = sample.shape
        fits = len(got) == len(want) and all(
            w is None or w == g for g, w in zip(got, want, strict=True)
        )
        if not fits:
            return f"shape {format_shape(got)}, model wants {format_shape(want)}"
        return None

    def describe(self) -> str:
        """E.g. ``image float32 (?, 8, 8)``."""
        return f"{self.name} {self.dtype} {format_shape(self.shape)}"


@runtime_checkable
class Runtime(Protocol):
    """A loaded model, ready to run batches.

    ``run`` takes a batch ``[N, *input_spec.sample_shape]`` and returns the output ``[N, C]``.
    One caller at a time: a runtime may be shared between threads as long as calls do not
    overlap. ``close`` releases the model; ``run`` after ``close`` raises :class:`RuntimeRunError`.
    """

    name: str
    """The backend, e.g. ``"onnxruntime"``, ``"litert"``."""
    provider: str
    """The execution provider / delegate that actually serves, e.g. ``"CPUExecutionProvider"``,
    ``"edgetpu"``, ``"cpu"``."""
    input_spec: TensorSpec
    output_spec: TensorSpec

    def run(self, batch: npt.NDArray[Any]) -> npt.NDArray[Any]: ...

    def close(self) -> None: ...


def order_providers(
    requested: Sequence[str], known: Container[str], fallback: str
) -> tuple[list[str], list[str]]:
    """The ``requested`` providers that are ``known``, in the requested order and without
    repeats, with ``fallback`` last (it serves whatever the others cannot); and the unknown
    ones, for the backend to say so."""
    chosen: list[str] = []
    unknown: list[str] = []
    for name in requested:
        if name in chosen or name in unknown:
            continue
        (chosen if name in known else unknown).append(name)
    if fallback not in chosen:
        chosen.append(fallback)
    return chosen, unknown


class ClosesOnExit:
    """``with backend.load(...) as rt:`` for the backends: the block's end calls ``close``."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
