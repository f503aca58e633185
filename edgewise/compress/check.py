"""What a model costs and what it gets right: size on disk, accuracy on a labelled set, label
agreement with a reference model, and latency at batch 1 and batch 32.

Models are loaded with the node's runtime layer (:func:`edgewise.serving.runtime.load_runtime`), so
every backend a node has can be checked, on the same thread settings a node uses by default.
Latency is the wall time of one ``run`` call (``time.perf_counter_ns``) after a short warm-up,
p50 and p99 over repeated runs of the same batch of labelled inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.compress.errors import CheckError
from edgewise.compress.predict import batches, predict
from edgewise.compress.samples import read_samples
from edgewise.serving.runtime import Runtime, RuntimeLoadError, RuntimeRunError, load_runtime

LATENCY_BATCHES: tuple[int, ...] = (1, 32)
DEFAULT_RUNS = 200
DEFAULT_WARMUP = 10


@dataclass(frozen=True, slots=True)
class Latency:
    batch: int
    runs: int
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class ModelFigures:
    path: str
    bytes: int
    backend: str
    provider: str
    input: str
    output: str
    correct: int
    accuracy: float
    latency: list[Latency]
    """One entry per batch size: 1 and 32, or only the size a fixed batch dimension allows."""


@dataclass(frozen=True, slots=True)
class CheckReport:
    labelled: str
    samples: int
    model: ModelFigures
    reference: ModelFigures | None
    agreeing: int | None
    """Samples on which the model and the reference give the same label."""

    @property
    def agreement(self) -> float | None:
        return None if self.agreeing is None else self.agreeing / self.samples

    @property
    def size_ratio(self) -> float | None:
        """Reference size over model size (4.0: the model is 4x smaller)."""
        return None if self.reference is None else self.reference.bytes / self.model.bytes

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["agreement"] = self.agreement
        doc["size_ratio"] = self.size_ratio
        return doc


def check_models(
    model: Path,
    labelled: Path,
    *,
    reference: Path | None = None,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    threads: int = 1,
    on_total: Callable[[int], None] = lambda n: None,
    on_run: Callable[[], None] = lambda: None,
) -> CheckReport:
    """Measure ``model`` (and ``reference``, if given) on the labelled file.

    ``on_total`` is told how many timed and warm-up runs the latency figures take, and ``on_run``
    is called after each.

    Raises :class:`CheckError` if a model does not load or run, or the two models do not take
    the same input or score the same number of classes, and
    :class:`~edgewise.compress.errors.SampleFileError` for a labelled file that does not fit.
    """
    if runs < 1 or warmup < 0 or threads < 1:
        raise CheckError(
            f"want runs >= 1, warmup >= 0, threads >= 1; got {runs}, {warmup}, {threads}"
        )
    rt = _load(model, "MODEL", threads)
    ref_rt: Runtime | None = None
    try:
        if reference is not None:
            ref_rt = _load(reference, "--reference", threads)
            _same_interface(rt, model, ref_rt, reference)
        classes = rt.output_spec.shape[1]
        samples = read_samples(
            labelled, rt.input_spec, role="--labelled", classes=classes, need_labels=True
        )
        assert samples.y is not None
        timing = _Timing(runs, warmup, on_run)
        on_total(sum(len(_batch_sizes(r)) for r in (rt, ref_rt) if r) * (runs + warmup))
        labels = _predict(rt, model, samples.x)
        figures = _figures(rt, model, labels, samples.y, samples.x, timing)
        ref_figures = agreeing = None
        if ref_rt is not None and reference is not None:
            ref_labels = _predict(ref_rt, reference, samples.x)
            ref_figures = _figures(ref_rt, reference, ref_labels, samples.y, samples.x, timing)
            agreeing = int((labels == ref_labels).sum())
    finally:
        rt.close()
        if ref_rt is not None:
            ref_rt.close()
    return CheckReport(
        labelled=str(labelled),
        samples=len(samples),
        model=figures,
        reference=ref_figures,
        agreeing=agreeing,
    )


def _load(path: Path, role: str, threads: int) -> Runtime:
    try:
        return load_runtime(path, intra_op_threads=threads)
    except RuntimeLoadError as exc:
        raise CheckError(f"{role} cannot be loaded: {exc}") from exc


def _same_interface(rt: Runtime, model: Path, ref: Runtime, reference: Path) -> None:
    a, b = rt.input_spec, ref.input_spec
    if a.dtype != b.dtype or a.sample_shape != b.sample_shape:
        raise CheckError(
            f"{model} takes {a.describe()} but the reference {reference} takes {b.describe()}; "
            "compare models of the same input"
        )
    if rt.output_spec.shape[1] != ref.output_spec.shape[1]:
        raise CheckError(
            f"{model} gives {rt.output_spec.describe()} but the reference {reference} gives "
            f"{ref.output_spec.describe()}; compare models of the same classes"
        )


def _predict(rt: Runtime, path: Path, x: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    try:
        return predict(rt, x)
    except RuntimeRunError as exc:
        raise CheckError(f"{path} fails on the labelled samples: {exc}") from exc


def _figures(
    rt: Runtime,
    path: Path,
    labels: npt.NDArray[np.int64],
    y: npt.NDArray[np.int64],
    x: npt.NDArray[Any],
    timing: _Timing,
) -> ModelFigures:
    correct = int((labels == y).sum())
    return ModelFigures(
        path=str(path),
        bytes=path.stat().st_size,
        backend=rt.name,
        provider=rt.provider,
        input=rt.input_spec.describe(),
        output=rt.output_spec.describe(),
        correct=correct,
        accuracy=correct / len(y),
        latency=[_latency(rt, path, x, n, timing) for n in _batch_sizes(rt)],
    )


def _batch_sizes(rt: Runtime) -> tuple[int, ...]:
    fixed = rt.input_spec.shape[0]
    return LATENCY_BATCHES if fixed is None else (fixed,)


@dataclass(frozen=True, slots=True)
class _Timing:
    runs: int
    warmup: int
    on_run: Callable[[], None]


def _latency(rt: Runtime, path: Path, x: npt.NDArray[Any], size: int, timing: _Timing) -> Latency:
    batch = next(batches(x[:size], size))  # the first samples, repeated if there are fewer
    took_ns = np.empty(timing.runs, dtype=np.int64)
    try:
        for _ in range(timing.warmup):
            rt.run(batch)
            timing.on_run()
        for i in range(timing.runs):
            start = time.perf_counter_ns()
            rt.run(batch)
            took_ns[i] = time.perf_counter_ns() - start
            timing.on_run()
    except RuntimeRunError as exc:
        raise CheckError(f"{path} fails on a batch of {size}: {exc}") from exc
    p50, p99 = np.percentile(took_ns, [50, 99]) / 1e6
    return Latency(batch=size, runs=timing.runs, p50_ms=float(p50), p99_ms=float(p99))
