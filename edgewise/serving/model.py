"""The model a node serves: a runtime backend plus its name, release and output kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgewise.serving.errors import ModelLoadError
from edgewise.serving.runtime import Runtime, RuntimeLoadError, load_runtime
from edgewise.serving.verdict import finite_rows, verdicts
from schemas import ContractError


@dataclass(slots=True)
class Prediction:
    labels: np.ndarray
    confidences: np.ndarray
    finite: np.ndarray
    scores: np.ndarray | None = None
    """The model's raw output ``[N, C]`` (probabilities or logits, see ``ServedModel.output``):
    what the escalation policy reads (margin, entropy)."""


class ServedModel:
    def __init__(
        self,
        runtime: Runtime,
        *,
        name: str,
        release: int,
        output: Literal["probabilities", "logits"],
    ) -> None:
        self.runtime = runtime
        self.name = name
        self.release = release
        self.output: Literal["probabilities", "logits"] = output
        self._dtype = runtime.input_spec.dtype
        self.path: str | None = None
        """The file it was loaded from (None when built around a runtime directly)."""
        self.thresholds: dict[str, float] = {}
        """Escalation thresholds its release manifest carried (none for the configured model)."""

    @classmethod
    def load(
        cls,
        path: str,
        *,
        name: str,
        release: int,
        output: Literal["probabilities", "logits"],
        providers: tuple[str, ...],
        intra_op_threads: int,
        inter_op_threads: int = 1,
    ) -> ServedModel:
        try:
            runtime = load_runtime(
                path,
                providers=providers,
                intra_op_threads=intra_op_threads,
                inter_op_threads=inter_op_threads,
            )
        except RuntimeLoadError as exc:
            raise ModelLoadError(f"cannot load model {path}: {exc}") from exc
        served = cls(runtime, name=name, release=release, output=output)
        served.path = path
        return served

    def check(self, sample: np.ndarray) -> None:
        """Raise ContractError if one input sample does not fit the model's input."""
        problem = self.runtime.input_spec.accepts(sample)
        if problem is not None:
            raise ContractError(
                "bad_dtype" if sample.dtype != self._dtype else "bad_shape", problem
            )

    def predict(self, batch: np.ndarray) -> Prediction:
        scores = self.runtime.run(batch)
        labels, confidences = verdicts(scores, self.output)
        return Prediction(labels, confidences, finite_rows(scores), scores)

    def close(self) -> None:
        self.runtime.close()
