"""The cloud worker's settings: typed, frozen, from a TOML file and ``EDGEWISE_WORKER_*`` variables.

Precedence, highest first: explicit overrides, environment variables (``EDGEWISE_WORKER_GROUP``,
``EDGEWISE_WORKER_MQTT__HOST``, ... — ``__`` separates nested keys), the TOML file, defaults. An
invalid or unknown key fails at start with a message naming it. See docs/cloud-worker.md.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from cloud_worker.errors import ConfigError
from edgewise.mqtt import MqttConfig, shown_input
from schemas import ContractError, Limits, Topics, validate_level

_FROZEN = ConfigDict(frozen=True, extra="forbid")
ENV_PREFIX = "EDGEWISE_WORKER_"


def _level(v: str) -> str:
    try:
        return validate_level(v)
    except ContractError as exc:
        raise ValueError(exc.detail) from None


def bundled_cloud_model() -> Path:
    import edgewise.assets as assets

    return Path(assets.__file__).parent / "digits_cloud.onnx"


class ModelConfig(BaseModel):
    """One model the worker answers escalations for with ONNX Runtime."""

    model_config = _FROZEN

    path: Path | None = Field(None, description="ONNX file; empty = the bundled digits cloud model")
    version: str = Field("digits_cloud-1", min_length=1, max_length=64)
    output: Literal["probabilities", "logits"] = "probabilities"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = Field(1, ge=1, le=64)

    @field_validator("path", mode="before")
    @classmethod
    def _empty_path_is_bundled(cls, v: object) -> object:
        return None if v == "" else v

    def resolved_path(self) -> Path:
        return self.path if self.path is not None else bundled_cloud_model()


class BatchingConfig(BaseModel):
    model_config = _FROZEN

    max_batch_size: int = Field(64, ge=1, le=4096)
    max_wait_ms: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="how long the first escalation waits for others while the model is busy",
    )
    wait_when_idle: bool = Field(
        False,
        description="wait max_wait_ms also when the model has no batch in hand (fuller calls"
        " at moderate rates, for latency)",
    )


class StoreConfig(BaseModel):
    model_config = _FROZEN

    path: Path = Field(Path("hard_examples.db"), description="SQLite file of hard examples")
    commit_max_rows: int = Field(512, ge=1, le=100_000)
    commit_interval_ms: float = Field(50.0, gt=0, le=10_000)


class WorkerConfig(BaseSettings):
    """Everything a cloud worker needs; see ``docs/cloud-worker.md`` for each key."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    worker_id: str = Field(
        default_factory=lambda: f"worker-{socket.gethostname().split('.')[0] or 'host'}"
    )
    group: str = Field("workers", description="shared-subscription group")
    mqtt: MqttConfig = Field(
        default_factory=lambda: MqttConfig(session_expiry_s=60),
        description="the broker; a worker's session (and its share of the escalations) outlives"
        " a crash by session_expiry_s, default 60 s",
    )
    cloud_root: str = "cloud"
    models: dict[str, ModelConfig] = Field(default_factory=lambda: {"digits": ModelConfig()})
    batching: BatchingConfig = BatchingConfig()
    store: StoreConfig = StoreConfig()
    answered_cache_entries: int = Field(100_000, ge=0)
    max_payload_bytes: int = Field(1_048_576, ge=64, le=64 * 1_048_576)
    max_tensor_elements: int = Field(262_144, ge=1)
    drain_timeout_s: float = Field(10.0, gt=0, le=600)
    telemetry_interval_s: float = Field(
        10.0, ge=0, le=3600, description="telemetry every this many seconds (0: none)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("worker_id", "group")
    @classmethod
    def _levels(cls, v: str) -> str:
        return _level(v)

    @field_validator("models")
    @classmethod
    def _model_names(cls, v: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for name in v:
            _level(name)
        return v

    @field_validator("cloud_root")
    @classmethod
    def _root(cls, v: str) -> str:
        try:
            Topics(cloud_root=v)
        except ContractError as exc:
            raise ValueError(exc.detail) from None
        return v

    def topics(self) -> Topics:
        return Topics(cloud_root=self.cloud_root)

    def limits(self) -> Limits:
        return Limits(
            max_payload_bytes=self.max_payload_bytes, max_tensor_elements=self.max_tensor_elements
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @classmethod
    def load(cls, path: Path | str | None = None, **overrides: Any) -> WorkerConfig:
        """Read settings; raise :class:`ConfigError` naming the bad key."""
        source = f"defaults and {ENV_PREFIX}* variables"
        target: type[WorkerConfig] = cls
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist (pass --config PATH)")
            source = f"{path} and {ENV_PREFIX}* variables"
            target = type(
                cls.__name__, (cls,), {"model_config": {**cls.model_config, "toml_file": path}}
            )
        try:
            return target(**overrides)
        except ValidationError as exc:
            lines = [f"invalid worker configuration (from {source}):"]
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"])
                env = ENV_PREFIX + "__".join(str(p).upper() for p in err["loc"])
                shown = shown_input(key, err["type"], err.get("input"))
                lines.append(f"  {key}: {err['msg']}{shown}  [set it in the file or with {env}]")
            raise ConfigError("\n".join(lines)) from None
        except SettingsError as exc:
            raise ConfigError(f"invalid worker configuration (from {source}): {exc}") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
