"""The bundled models are the command line's defaults, passed into the services (which do not
know the bundled assets: docs/adr/0001-layout.md); a service given no model names the key."""

from __future__ import annotations

import pytest

from cloud_worker import WorkerConfig
from cloud_worker.errors import ConfigError as WorkerConfigError
from edge_node.config import NodeConfig
from edge_node.errors import ConfigError as NodeConfigError
from edgewise.assets import bundled_asset
from edgewise.cli.defaults import node_config, worker_config


def test_the_command_line_serves_the_bundled_models_by_default() -> None:
    assert node_config().model.resolved_path() == bundled_asset("digits_edge.onnx")
    assert bundled_asset("digits_edge.onnx").is_file()
    worker = worker_config(models={"digits": {}, "other": {"version": "o-1"}})
    for name, model in worker.models.items():
        assert model.path is None
        assert model.resolved_path(name) == bundled_asset("digits_cloud.onnx")


def test_a_configured_model_path_wins_over_the_default() -> None:
    assert node_config(model={"path": "/models/m.onnx"}).model.resolved_path().as_posix() == (
        "/models/m.onnx"
    )
    worker = worker_config(models={"digits": {"path": "/models/c.onnx"}})
    assert worker.models["digits"].resolved_path("digits").as_posix() == "/models/c.onnx"


def test_a_service_given_no_model_names_the_key() -> None:
    with pytest.raises(NodeConfigError, match=r"model\.path.*EDGEWISE_MODEL__PATH"):
        NodeConfig.load().model.resolved_path()
    with pytest.raises(WorkerConfigError, match=r"models\.digits\.path.*MODELS__DIGITS__PATH"):
        WorkerConfig.load().models["digits"].resolved_path("digits")
