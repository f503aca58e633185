"""The docs stay true to the code: every setting, default, reject reason, topic and example."""

from __future__ import annotations

import inspect
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from edge_node.config import NodeConfig
from schemas import DEADLETTER_REASONS, Topics, decode_frame, decode_results

DOCS = Path(__file__).resolve().parent.parent / "docs"
CONFIG_MD = (DOCS / "configuration.md").read_text(encoding="utf-8")
WIRE_MD = (DOCS / "wire-contract.md").read_text(encoding="utf-8")


def _settings(model: type[BaseModel] = NodeConfig, prefix: str = "") -> dict[str, FieldInfo]:
    """Every leaf setting by dotted key, nested models included."""
    out: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_settings(ann, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = field
    return out


def _env(key: str) -> str:
    return "EDGEWISE_" + key.replace(".", "__").upper()


def _table_rows(text: str, *columns: str) -> list[dict[str, str]]:
    """Rows of every Markdown table whose header has all ``columns`` (cells unescaped)."""
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if header is None:
            header = cells
        elif not set(cells) <= {"---"} and set(columns) <= set(header):
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _flatten(table: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys of a TOML table; a table that is one optional setting (``uplink``) is a key."""
    leaves = set(_settings())
    keys: set[str] = set()
    for k, v in table.items():
        nested = isinstance(v, dict) and f"{prefix}{k}" not in leaves
        keys |= _flatten(v, f"{prefix}{k}.") if nested else {prefix + k}
    return keys


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("EDGEWISE_"):
            monkeypatch.delenv(name)


def test_every_setting_is_documented_with_its_variable() -> None:
    settings = _settings()
    assert any("." in key for key in settings), "nested sections were not walked"
    missing = [k for k in settings if f"`{k}`" not in CONFIG_MD or _env(k) not in CONFIG_MD]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_documented_defaults_match_the_code() -> None:
    settings = _settings()
    rows = {r["key"].strip("`"): r for r in _table_rows(CONFIG_MD, "key", "default")}
    assert set(rows) == set(settings), "settings tables and NodeConfig list different keys"
    for key, row in rows.items():
        field, cell = settings[key], row["default"]
        assert row["env variable"].strip("`") == _env(key)
        if cell.startswith("host name"):
            assert field.default_factory is not None, key
        elif cell == "unset":
            assert field.default is None, key
        else:
            assert tomllib.loads(f"x = {cell.strip('`')}")["x"] == _plain(field.default), key


def _toml_example() -> str:
    blocks = re.findall(r"^```toml\n(.*?)^```", CONFIG_MD, flags=re.S | re.M)
    assert len(blocks) == 1, "expected exactly one ```toml example"
    return blocks[0]


@pytest.mark.usefixtures("clean_env")
def test_example_node_toml_loads_and_shows_every_key(tmp_path: Path) -> None:
    example = _toml_example()
    path = tmp_path / "node.toml"
    path.write_text(example, encoding="utf-8")
    NodeConfig.load(path)
    # Optional keys appear commented out; with them enabled the file must still load.
    enabled = re.sub(r"^# (\w+ = )", r"\1", example, flags=re.M)
    path.write_text(enabled, encoding="utf-8")
    NodeConfig.load(path)
    assert _flatten(tomllib.loads(enabled)) == set(_settings())


def test_every_reject_reason_is_documented() -> None:
    documented = {r["reason"].strip("`") for r in _table_rows(WIRE_MD, "reason", "triggered by")}
    assert documented == set(DEADLETTER_REASONS)


def test_every_topic_builder_is_in_the_topic_table() -> None:
    topics = Topics()
    table = {r["topic (default)"] for r in _table_rows(WIRE_MD, "topic (default)", "state")}
    built = []
    for name, method in inspect.getmembers(topics, inspect.ismethod):
        if name.startswith(("_", "parse_")) or name.endswith("_filter"):
            continue
        params = inspect.signature(method).parameters.values()
        args = [0 if p.annotation == "int" else f"{{{p.name}}}" for p in params]
        topic = method(*args).replace("{hw_class}", "{class}")
        built.append(re.sub(r"/0$", "/{index}", topic) if 0 in args else topic)
    assert len(built) > 5
    assert not [t for t in built if f"`{t}`" not in table], table


@pytest.mark.parametrize(("name", "decode"), [("frame", decode_frame), ("results", decode_results)])
def test_wire_examples_decode(name: str, decode: Any) -> None:
    match = re.search(rf"<!-- example: {name} -->\n```json\n(.*?)```", WIRE_MD, flags=re.S)
    assert match, f"no {name} example"
    decode(match.group(1).encode())
