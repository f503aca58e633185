"""The services' settings as the command line loads them: with the bundled digits models as the
default models. The services do not know the bundled assets (docs/adr/0001-layout.md): the
command line passes their paths in, so ``edgewise node``, ``worker`` and ``demo`` without a
model path serve the bundled models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgewise.assets import bundled_asset

if TYPE_CHECKING:  # the services are imported when a command runs (start-up time)
    from cloud_worker.config import WorkerConfig
    from edge_node.config import NodeConfig


def node_config(path: Path | str | None = None, **overrides: Any) -> NodeConfig:
    """:meth:`NodeConfig.load` serving the bundled edge model when ``model.path`` is unset."""
    from edge_node.config import NodeConfig

    return NodeConfig.load(path, default_model_path=bundled_asset("digits_edge.onnx"), **overrides)


def worker_config(path: Path | str | None = None, **overrides: Any) -> WorkerConfig:
    """:meth:`WorkerConfig.load` serving the bundled cloud model for each model without a
    ``path``."""
    from cloud_worker.config import WorkerConfig

    return WorkerConfig.load(
        path, default_model_path=bundled_asset("digits_cloud.onnx"), **overrides
    )
