"""Node configuration: TOML, EDGEWISE_* variables, precedence, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_node.config import NodeConfig, unknown_env_names
from edge_node.errors import ConfigError
from edgewise.cli.defaults import node_config


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_toml_then_env_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(
        tmp_path,
        'node_id = "gw-7"\n[mqtt]\nhost = "10.0.0.5"\nport = 1884\n'
        "[batching]\nmax_batch_size = 8\n",
    )
    cfg = NodeConfig.load(path)
    assert (cfg.node_id, cfg.mqtt.host, cfg.mqtt.port, cfg.batching.max_batch_size) == (
        "gw-7",
        "10.0.0.5",
        1884,
        8,
    )
    monkeypatch.setenv("EDGEWISE_MQTT__PORT", "2883")
    monkeypatch.setenv("EDGEWISE_BATCHING__MAX_WAIT_MS", "5")
    cfg = NodeConfig.load(path)
    assert cfg.mqtt.port == 2883 and cfg.mqtt.host == "10.0.0.5"
    assert cfg.batching.max_wait_ms == 5.0 and cfg.batching.max_batch_size == 8
    cfg = NodeConfig.load(path, node_id="gw-8")
    assert cfg.node_id == "gw-8"


def test_config_is_frozen() -> None:
    cfg = NodeConfig.load()
    with pytest.raises(Exception, match="frozen"):
        cfg.node_id = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[batching]\nmax_batch_size = 0\n", "batching.max_batch_size"),
        ("[mqtt]\nport = 70000\n", "mqtt.port"),
        ("[mqtt]\nprot = 1\n", "mqtt.prot"),
        ('node_id = "gw/1"\n', "node_id"),
        ('node_id = "gw+"\n', "node_id"),
        ('[topics]\nsubscriptions = ["sensors/#/x"]\n', "topics.subscriptions"),
        ('[model]\noutput = "softmax"\n', "model.output"),
        ('[topics]\nedge_root = "a/+"\n', "topics"),
        ("[mqtt]\nreconnect_first_s = 2.0\nreconnect_cap_s = 1.0\n", "mqtt"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        NodeConfig.load(_write(tmp_path, text))
    assert key in str(info.value)
    assert "EDGEWISE_" in str(info.value)


def test_bad_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWISE_BATCHING__MAX_BATCH_SIZE", "lots")
    with pytest.raises(ConfigError) as info:
        NodeConfig.load()
    assert "batching.max_batch_size" in str(info.value)
    assert "EDGEWISE_BATCHING__MAX_BATCH_SIZE" in str(info.value)


def test_list_env_value_that_is_not_json_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWISE_MODEL__PROVIDERS", "CPUExecutionProvider")
    with pytest.raises(ConfigError, match="are JSON") as info:
        NodeConfig.load()
    assert "EDGEWISE_MODEL__PROVIDERS" in str(info.value)


def test_empty_model_path_means_the_bundled_model(tmp_path: Path) -> None:
    cfg = node_config(_write(tmp_path, '[model]\npath = ""\n'))  # as `edgewise node` loads it
    assert cfg.model.path is None
    assert cfg.model.resolved_path().name == "digits_edge.onnx"


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        NodeConfig.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read config"):
        NodeConfig.load(_write(tmp_path, "node_id = [unclosed\n"))


def test_unknown_top_level_env_names_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWISE_NODEID", "typo")
    monkeypatch.setenv("EDGEWISE_MQTT__HOST", "10.0.0.9")
    monkeypatch.setenv("EDGEWISE_BROKER", "mqtt://x")
    assert unknown_env_names() == ["EDGEWISE_NODEID"]
