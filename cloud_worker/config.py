"""The cloud worker's settings: typed, frozen, from a TOML file and ``EDGEWISE_WORKER_*`` variables.

Precedence, highest first: explicit overrides, environment variables (``EDGEWISE_WORKER_GROUP``,
``EDGEWISE_WORKER_MQTT__HOST``, ... — ``__`` separates nested keys), the TOML file, defaults. An
invalid or unknown key fails at start with a message naming it. See docs/cloud-worker.md.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, field_validator
from pydantic_settings import SettingsConfigDict

from cloud_worker.errors import ConfigError
from edgewise.mqtt import MqttConfig
from edgewise.settings import FROZEN, FileAndEnvSettings, empty_is_unset, load_settings, topic_level
from schemas import ContractError, Limits, Topics

ENV_PREFIX = "EDGEWISE_WORKER_"


class ModelConfig(BaseModel):
    """One model the worker answers escalations for with ONNX Runtime."""

    model_config = FROZEN

    path: Path | None = Field(None, description="ONNX file; empty = the bundled digits cloud model")
    version: str = Field("digits_cloud-1", min_length=1, max_length=64)
    output: Literal["probabilities", "logits"] = "probabilities"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = Field(1, ge=1, le=64)

    _default_path: Path | None = PrivateAttr(None)  # given by WorkerConfig.load

    _empty_path_is_bundled = field_validator("path", mode="before")(empty_is_unset)

    def resolved_path(self, name: str = "NAME") -> Path:
        """``path``, else the default model the command line passed to
        :meth:`WorkerConfig.load` (the bundled digits cloud model)."""
        path = self.path if self.path is not None else self._default_path
        if path is None:
            env = f"{ENV_PREFIX}MODELS__{name.upper()}__PATH"
            raise ConfigError(
                f"models.{name}.path: no model file given (set it in the file or with {env})"
            )
        return path

    def with_default_path(self, default: Path | None) -> ModelConfig:
        copy = self.model_copy()
        copy._default_path = default
        return copy


class BatchingConfig(BaseModel):
    model_config = FROZEN

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
    model_config = FROZEN

    path: Path = Field(Path("hard_examples.db"), description="SQLite file of hard examples")
    commit_max_rows: int = Field(512, ge=1, le=100_000)
    commit_interval_ms: float = Field(50.0, gt=0, le=10_000)


class WorkerConfig(FileAndEnvSettings):
    """Everything a cloud worker needs; see ``docs/cloud-worker.md`` for each key."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

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

    _levels = field_validator("worker_id", "group")(topic_level)

    @field_validator("models")
    @classmethod
    def _model_names(cls, v: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for name in v:
            topic_level(name)
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
    def load(
        cls,
        path: Path | str | None = None,
        *,
        default_model_path: Path | None = None,
        **overrides: Any,
    ) -> WorkerConfig:
        """Read settings; raise :class:`ConfigError` naming the bad key. ``default_model_path``
        is served by each model whose ``path`` is unset (the command line passes the bundled
        cloud model)."""
        cfg = load_settings(cls, path, overrides, error=ConfigError, what="worker configuration")
        models = {n: m.with_default_path(default_model_path) for n, m in cfg.models.items()}
        return cfg.model_copy(update={"models": models})
