"""The settings loader every service shares (edgewise.settings): sources, precedence and
explanations that name the key, the source and the variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import SettingsConfigDict

from edgewise.settings import FROZEN, FileAndEnvSettings, load_settings, unknown_env_names


class Broker(BaseModel):
    model_config = FROZEN

    port: int = Field(1883, ge=1, le=65535)
    password: str | None = None


class Demo(FileAndEnvSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEWISE_DEMO_")

    name: str = "a"
    broker: Broker = Broker()
    tags: tuple[str, ...] = ()
    low: int = 0
    high: int = 10

    @model_validator(mode="after")
    def _ordered(self) -> Demo:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


class Bad(Exception):
    pass


def _load(path: Path | None = None, **overrides: object) -> Demo:
    return load_settings(Demo, path, dict(overrides), error=Bad, what="demo configuration")


def test_overrides_then_environment_then_file_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "demo.toml"
    path.write_text('name = "file"\nlow = 3\n[broker]\nport = 1884\n', encoding="utf-8")
    assert (_load().name, _load().broker.port) == ("a", 1883)
    assert (_load(path).name, _load(path).broker.port, _load(path).low) == ("file", 1884, 3)
    monkeypatch.setenv("EDGEWISE_DEMO_NAME", "env")
    monkeypatch.setenv("EDGEWISE_DEMO_BROKER__PORT", "1885")
    cfg = _load(path)
    assert (cfg.name, cfg.broker.port, cfg.low) == ("env", 1885, 3)
    assert _load(path, name="flag").name == "flag"


def test_each_bad_key_is_named_with_its_source_and_variable(tmp_path: Path) -> None:
    path = tmp_path / "demo.toml"
    path.write_text('tags = ["x", 1]\n[broker]\nport = 0\nprot = 2\n', encoding="utf-8")
    with pytest.raises(Bad) as info:
        _load(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"invalid demo configuration (from {path} and EDGEWISE_DEMO_* variables):"
    assert sorted(lines[1:]) == [
        "  broker.port: Input should be greater than or equal to 1 (got 0)  [set it in the"
        " file or with EDGEWISE_DEMO_BROKER__PORT]",
        "  broker.prot: Extra inputs are not permitted  [set it in the file or with"
        " EDGEWISE_DEMO_BROKER__PROT]",
        "  tags.1: Input should be a valid string (got 1)  [set it in the file or with"
        " EDGEWISE_DEMO_TAGS]",
    ]


def test_an_error_about_the_whole_names_no_variable() -> None:
    with pytest.raises(Bad) as info:
        _load(low=5, high=1)
    assert str(info.value).splitlines()[1] == (
        "  (top level): Value error, low (5) must be <= high (1)"
    )


def test_a_credential_is_never_quoted(tmp_path: Path) -> None:
    path = tmp_path / "demo.toml"
    path.write_text("[broker]\npassword = 271828\npasword = 314159\n", encoding="utf-8")
    with pytest.raises(Bad) as info:
        _load(path)
    assert "broker.password" in str(info.value) and "broker.pasword" in str(info.value)
    assert "EDGEWISE_DEMO_BROKER__PASSWORD" in str(info.value)
    assert "271828" not in str(info.value) and "314159" not in str(info.value)


def test_a_list_variable_that_is_not_json_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWISE_DEMO_TAGS", "x,y")
    with pytest.raises(Bad, match="are JSON") as info:
        _load()
    assert "EDGEWISE_DEMO_" in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(Bad, match="does not exist"):
        _load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed\n", encoding="utf-8")
    with pytest.raises(Bad, match="cannot read config"):
        _load(bad)


def test_unknown_top_level_variables_are_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWISE_DEMO_NAMEE", "typo")
    monkeypatch.setenv("EDGEWISE_DEMO_BROKER__PORT", "1")
    monkeypatch.setenv("EDGEWISE_DEMO_OTHER", "read by another command")
    assert unknown_env_names(Demo, {"EDGEWISE_DEMO_OTHER"}) == ["EDGEWISE_DEMO_NAMEE"]
