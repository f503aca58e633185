"""The default handler: a bigger ONNX Runtime model, one call per batch."""

from __future__ import annotations

import numpy as np

from cloud_worker.config import ModelConfig
from cloud_worker.errors import ConfigError
from cloud_worker.handler import Batch, Handler, Verdicts
from edgewise.serving.errors import ModelLoadError
from edgewise.serving.model import ServedModel


def onnx_handler(name: str, cfg: ModelConfig) -> tuple[Handler, ServedModel]:
    """A handler running ``cfg``'s model; close the returned model when done."""
    try:
        model = ServedModel.load(
            str(cfg.resolved_path(name)),
            name=name,
            release=0,
            output=cfg.output,
            providers=cfg.providers,
            intra_op_threads=cfg.intra_op_threads,
        )
    except ModelLoadError as exc:
        raise ConfigError(f"models.{name}.path: {exc}") from None

    def run(batch: Batch) -> Verdicts:
        pred = model.predict(batch.inputs)
        return Verdicts(pred.labels, np.where(pred.finite, pred.confidences, 0.0))

    return Handler(name, cfg.version, run), model
