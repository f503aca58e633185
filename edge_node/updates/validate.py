"""Validation before activation: a fresh session, the declared spec, the golden set, finiteness.

Runs on a worker thread (it loads a model and runs it); returns the loaded model, ready to serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_node.errors import ModelLoadError, ModelRefused
from edge_node.hardware import NodeHardware, load_model
from edge_node.updates.errors import StepFailed
from edgewise.releases import Manifest, Reason, TensorDecl
from edgewise.serving.model import ServedModel
from edgewise.serving.runtime import TensorSpec

GOLDEN_BATCH = 256


def _spec_matches(decl: TensorDecl, spec: TensorSpec) -> str | None:
    try:
        want_dtype = np.dtype(decl.dtype)
    except TypeError:
        return f"unknown dtype {decl.dtype!r}"
    want = tuple(None if d < 0 else d for d in decl.shape)
    if spec.dtype != want_dtype or spec.shape != want:
        shown = tuple("?" if d is None else d for d in want)
        return f"model has {spec.describe()}, manifest declares {decl.dtype} {shown}"
    return None


def validate(path: Path, manifest: Manifest, *, hardware: NodeHardware) -> ServedModel:
    """Load ``path`` in a fresh session, as the node's hardware class says, and check it against
    ``manifest``; raise StepFailed."""
    try:
        model = load_model(
            hardware,
            path,
            name=manifest.name,
            release=manifest.release,
            output=manifest.output_kind,
        )
    except ModelRefused as exc:  # checked before the download already; the file has the last word
        raise StepFailed(Reason(exc.reason), exc.detail) from None
    except ModelLoadError as exc:
        raise StepFailed(Reason.LOAD_FAILED, str(exc)) from None
    try:
        _check(model, manifest)
    except BaseException:
        model.close()
        raise
    return model


def _check(model: ServedModel, manifest: Manifest) -> None:
    rt = model.runtime
    for decl, spec, role in (
        (manifest.input, rt.input_spec, "input"),
        (manifest.output, rt.output_spec, "output"),
    ):
        problem = _spec_matches(decl, spec)
        if problem is not None:
            raise StepFailed(Reason.SPEC_MISMATCH, f"{role}: {problem}")
    golden = manifest.golden
    if golden is None:
        sample = tuple(1 if d is None else d for d in rt.input_spec.sample_shape)
        inputs: np.ndarray[Any, Any] = np.zeros((1, *sample), dtype=rt.input_spec.dtype)
        labels: list[int] = []
        min_agreement = 0.0
    else:
        try:
            inputs = np.frombuffer(golden.inputs, dtype=np.dtype(golden.dtype)).reshape(
                golden.shape
            )
        except (TypeError, ValueError) as exc:
            raise StepFailed(
                Reason.GOLDEN_FAILED, f"golden inputs do not fit their shape: {exc}"
            ) from None
        if len(golden.labels) != inputs.shape[0]:
            raise StepFailed(
                Reason.GOLDEN_FAILED, f"{inputs.shape[0]} inputs, {len(golden.labels)} labels"
            )
        labels = golden.labels
        min_agreement = golden.min_agreement
    agree = 0
    for start in range(0, max(1, inputs.shape[0]), GOLDEN_BATCH):
        batch = inputs[start : start + GOLDEN_BATCH]
        try:
            pred = model.predict(batch)
        except Exception as exc:  # the runtime's run errors: the model cannot serve
            raise StepFailed(Reason.LOAD_FAILED, f"the model fails to run: {exc}") from None
        if not bool(np.all(pred.finite)):
            raise StepFailed(Reason.NON_FINITE_OUTPUT, "the model produced NaN or Inf")
        if labels:
            agree += int(np.sum(pred.labels == np.asarray(labels[start : start + GOLDEN_BATCH])))
    if labels:
        share = agree / len(labels)
        if share < min_agreement:
            raise StepFailed(
                Reason.GOLDEN_FAILED,
                f"{agree}/{len(labels)} golden labels ({share:.1%}) < required {min_agreement:.1%}",
            )
