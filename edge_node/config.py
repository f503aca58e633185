"""The edge node's settings: typed, frozen, from a TOML file and ``EDGEWISE_*`` variables.

Precedence, highest first: explicit overrides (command-line flags), environment variables
(``EDGEWISE_NODE_ID``, ``EDGEWISE_MQTT__HOST``, ``EDGEWISE_BATCHING__MAX_BATCH_SIZE``, ... — ``__``
separates nested keys), the TOML file, defaults. An invalid or unknown key fails at start with a
message naming it.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings

from edge_node.errors import ConfigError
from edge_node.escalation.config import EscalationConfig
from edge_node.hardware import NodeHardware, load_classes, resolve, shipped_classes_file
from edge_node.updates.config import UpdatesConfig
from edgewise.mqtt import MqttConfig
from edgewise.outbox import OutboxConfig
from edgewise.outbox.config import MIN_MAX_BYTES
from edgewise.settings import FROZEN, FileAndEnvSettings, empty_is_unset, load_settings, topic_level
from edgewise.settings import unknown_env_names as _unknown_env_names
from schemas import ContractError, Limits, Topics, validate_filter


class ModelConfig(BaseModel):
    model_config = FROZEN

    path: Path | None = Field(None, description="model file; empty = the bundled digits model")
    name: str = "digits"
    release: int = Field(1, ge=0)
    output: Literal["probabilities", "logits"] = "probabilities"
    providers: tuple[str, ...] | None = Field(
        None,
        min_length=1,
        description="providers of the hardware class's runtime, most preferred first;"
        " unset = the class's",
    )
    intra_op_threads: int | None = Field(
        None, ge=1, le=64, description="threads one operator may use; unset = the class's"
    )
    inter_op_threads: int | None = Field(
        None,
        ge=1,
        le=64,
        description="threads for independent branches of the graph; unset = the class's",
    )
    recycle_session_h: float = Field(
        0.0,
        ge=0,
        le=24 * 365,
        description="reload the inference session this often, in hours (memory fragmentation"
        " on long runs); frames keep being served during the reload; 0 = never",
    )

    _default_path: Path | None = PrivateAttr(None)  # given by NodeConfig.load

    _empty_path_is_bundled = field_validator("path", mode="before")(empty_is_unset)
    _name_is_topic_level = field_validator("name")(topic_level)

    def resolved_path(self) -> Path:
        """``path``, else the default model the command line passed to :meth:`NodeConfig.load`
        (the bundled digits model)."""
        path = self.path if self.path is not None else self._default_path
        if path is None:
            raise ConfigError(
                "model.path: no model file given (set it in the file or with EDGEWISE_MODEL__PATH)"
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
        0.0,
        ge=0,
        le=1000,
        description="how long the first frame of a batch waits for more; 0 = run at once"
        " (under load batches still fill while the previous one runs)",
    )
    max_results_per_message: int = Field(
        1024,
        ge=1,
        le=4096,
        description="results made while the previous message was being stored go out together,"
        " up to this many per results message",
    )
    max_pending_frames: int = Field(
        2_000,
        ge=1,
        description="frames held (received, not yet acknowledged: waiting for inference or"
        " for their results to be stored) before the node stops reading frames from the broker"
        " (TCP backpressure) until half of them are done",
    )
    max_pending_bytes: int = Field(
        16 * 1_048_576,
        ge=128,
        description="payload bytes of the frames held (as max_pending_frames) before the node"
        " stops reading frames until half of them are done; at least twice"
        " limits.max_payload_bytes",
    )


class LimitsConfig(BaseModel):
    model_config = FROZEN

    max_payload_bytes: int = Field(1_048_576, ge=64, le=64 * 1_048_576)
    max_tensor_elements: int = Field(262_144, ge=1)
    max_rank: int = Field(4, ge=1, le=8)
    max_str_len: int = Field(128, ge=8, le=4096)
    max_frames_per_message: int = Field(256, ge=1, le=1024)

    def to_limits(self) -> Limits:
        return Limits(
            max_payload_bytes=self.max_payload_bytes,
            max_tensor_elements=self.max_tensor_elements,
            max_rank=self.max_rank,
            max_str_len=self.max_str_len,
            max_frames_per_message=self.max_frames_per_message,
        )


class TopicsConfig(BaseModel):
    model_config = FROZEN

    sensors_root: str = "sensors"
    edge_root: str = "edge"
    cloud_root: str = "cloud"
    fleet_root: str = "fleet"
    models_root: str = "models"
    subscriptions: tuple[str, ...] = Field(
        (), description="sensor topic filters; empty = {sensors_root}/+/+"
    )

    @field_validator("subscriptions")
    @classmethod
    def _filters(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for f in v:
            try:
                validate_filter(f)
            except ContractError as exc:
                raise ValueError(exc.detail) from None
        return v

    @model_validator(mode="after")
    def _roots_are_topic_levels(self) -> TopicsConfig:
        try:
            self.to_topics()
        except ContractError as exc:
            raise ValueError(exc.detail) from None
        return self

    def to_topics(self) -> Topics:
        return Topics(
            sensors_root=self.sensors_root,
            edge_root=self.edge_root,
            cloud_root=self.cloud_root,
            fleet_root=self.fleet_root,
            models_root=self.models_root,
        )

    def sensor_filters(self) -> tuple[str, ...]:
        return self.subscriptions or (self.to_topics().sensor_filter(),)


class StorageConfig(BaseModel):
    """Where the node keeps what must survive it: the outbox of results waiting for the broker."""

    model_config = FROZEN

    state_dir: Path = Field(
        Path("edgewise-state"),
        description="directory of the node's outbox file ({node_id}.outbox.db); created if missing",
    )
    outbox_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=MIN_MAX_BYTES,
        description="bound of the outbox file (database + write-ahead log) on disk",
    )
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = Field(
        "FULL", description="SQLite synchronous mode: FULL survives power loss, NORMAL a crash"
    )
    eviction_order: tuple[str, ...] = Field(
        ("telemetry", "hard_example", "event", "result"),
        min_length=1,
        description="record kinds, evicted first to last when the outbox is full",
    )
    answered_keep: int = Field(
        100_000, ge=0, description="frame keys remembered so a redelivered frame is not re-answered"
    )
    uplink_window: int = Field(
        256,
        ge=1,
        le=65535,
        description="outbox records in flight to the broker at once (also capped by the"
        " broker's Receive Maximum)",
    )
    drain_max_msgs_per_s: float = Field(
        5000.0,
        ge=0,
        description="after an outage, the backlog is sent at most this many messages per"
        " second, behind live results; 0 = no cap",
    )

    def outbox_config(self, node_id: str) -> OutboxConfig:
        return OutboxConfig(
            path=self.state_dir / f"{node_id}.outbox.db",
            max_bytes=self.outbox_max_bytes,
            synchronous=self.synchronous,
            eviction_order=self.eviction_order,
            answered_keep=self.answered_keep,
        )


class TelemetryConfig(BaseModel):
    """The node's telemetry windows on ``edge/{node}/telemetry`` (stored and forwarded)."""

    model_config = FROZEN

    window_s: float = Field(10.0, ge=0.1, le=3600, description="length of one telemetry window")


class HealthConfig(BaseModel):
    """When the node calls itself degraded, besides storage and model trouble."""

    model_config = FROZEN

    latency_slo_p99_ms: float | None = Field(
        None,
        ge=0,
        description="degraded (latency_slo) while a telemetry window's p99 latency is above"
        " this; 0 = no SLO; unset = the hardware class's latency envelope",
    )
    uplink_grace_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="degraded (uplink_down) once the uplink has been disconnected, or a"
        " PUBACK has been awaited, this long",
    )


class EndToEndConfig(BaseModel):
    """End-to-end mode (docs/adr/0078-end-to-end-acks.md, docs/durability.md): each results
    message stays in the outbox after the broker's PUBACK until its consumer confirms it on
    ``edge/{node}/acks``, so a broker crash loses no result. Off by default."""

    model_config = FROZEN

    enabled: bool = Field(
        False,
        description="keep each results message until its consumer confirms it (the bridge,"
        " or a sink publishing on edge/{node}/acks); sent again while unconfirmed",
    )
    resend_after_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="an unconfirmed results message is sent again this long after the"
        " broker's PUBACK, the wait doubling each time up to resend_max_s (and at every"
        " reconnect)",
    )
    resend_max_s: float = Field(300.0, gt=0, le=86_400)
    max_unconfirmed: int = Field(
        4096,
        ge=1,
        le=1_000_000,
        description="results messages sent and not yet confirmed at most; beyond, new ones"
        " wait in the outbox (its bound and eviction order apply as always)",
    )
    degraded_after_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="degraded (awaiting_consumer) while a results message the broker"
        " acknowledged has waited this long for its consumer's confirmation",
    )

    @model_validator(mode="after")
    def _max_not_below_first(self) -> EndToEndConfig:
        if self.resend_max_s < self.resend_after_s:
            raise ValueError(
                f"resend_max_s ({self.resend_max_s}) must be >= resend_after_s"
                f" ({self.resend_after_s})"
            )
        return self


class NodeConfig(FileAndEnvSettings):
    """Everything an edge node needs; see ``docs/configuration.md`` for each key."""

    node_id: str = Field(default_factory=lambda: socket.gethostname().split(".")[0] or "node")
    hardware_class: str = Field(
        "generic-cpu",
        description="the node's hardware class, a table of hardware_classes_file (runtime,"
        " providers, threads, envelope; reported; releases target it)",
    )
    hardware_classes_file: Path | None = Field(
        None, description="the operator's hardware_classes.toml; unset = the shipped one"
    )
    mqtt: MqttConfig = MqttConfig()
    uplink: MqttConfig | None = Field(
        None,
        description="a separate broker for everything the node publishes (results, telemetry,"
        " dead letters, status); unset = the sensors' broker",
    )
    model: ModelConfig = ModelConfig()
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    topics: TopicsConfig = TopicsConfig()
    storage: StorageConfig = StorageConfig()
    end_to_end: EndToEndConfig = EndToEndConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    health: HealthConfig = HealthConfig()
    escalation: EscalationConfig = EscalationConfig()
    updates: UpdatesConfig = UpdatesConfig()
    results_encoding: Literal["msgpack", "json"] = Field(
        "msgpack", description="wire format of result batches; json for plain MQTT tools"
    )
    deadletter_max_per_s: float = Field(
        100.0, ge=0, description="dead letters published per second"
    )
    drain_timeout_s: float = Field(10.0, gt=0, le=600)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    _node_id = field_validator("node_id", "hardware_class")(topic_level)
    _empty_file_is_shipped = field_validator("hardware_classes_file", mode="before")(empty_is_unset)

    @model_validator(mode="after")
    def _pending_bytes_hold_two_messages(self) -> NodeConfig:
        # Reading resumes once half the bound is free: a message bigger than half would never
        # fit, and the node would never read again.
        if self.batching.max_pending_bytes < 2 * self.limits.max_payload_bytes:
            raise ValueError(
                f"batching.max_pending_bytes ({self.batching.max_pending_bytes}) must be at least"
                f" twice limits.max_payload_bytes ({self.limits.max_payload_bytes})"
            )
        return self

    def hardware(self) -> NodeHardware:
        """The node's hardware class from ``hardware_classes_file`` with this config's overrides
        (read from disk on each call: call once, at start). Raises :class:`ConfigError` naming
        the file and key, or listing the known classes."""
        path = self.hardware_classes_file or shipped_classes_file()
        if not path.is_file():
            raise ConfigError(
                f"hardware_classes_file: {path} does not exist (unset it to use the shipped"
                f" classes, {shipped_classes_file()})"
            )
        m = self.model
        return resolve(
            load_classes(path),
            self.hardware_class,
            path,
            providers=m.providers,
            intra_op_threads=m.intra_op_threads,
            inter_op_threads=m.inter_op_threads,
            latency_slo_p99_ms=self.health.latency_slo_p99_ms,
        )

    @classmethod
    def load(
        cls,
        path: Path | str | None = None,
        *,
        default_model_path: Path | None = None,
        **overrides: Any,
    ) -> NodeConfig:
        """Read settings; raise :class:`ConfigError` naming the bad key. ``default_model_path``
        is served when ``model.path`` is unset (the command line passes the bundled model)."""
        cfg = load_settings(cls, path, overrides, error=ConfigError)
        return cfg.model_copy(update={"model": cfg.model.with_default_path(default_model_path)})


OTHER_COMMANDS_ENV = frozenset(
    {
        "EDGEWISE_BROKER",
        "EDGEWISE_VENV",
        "EDGEWISE_CRASHPOINT",
        "EDGEWISE_PAHO_FAST",
        "EDGEWISE_KEYS_DIR",
        "EDGEWISE_CLI",
        "EDGEWISE_LOG_FORMAT",
    }
)
"""EDGEWISE_* variables that are not node settings: read by other commands (``watch``,
``keys``, ``dev.sh``, compose/make-secrets.sh), by the MQTT layer (``EDGEWISE_PAHO_FAST``,
docs/adr/0079-paho-guard.md), by every command's log set-up (``EDGEWISE_LOG_FORMAT``,
edgewise/cli/logs.py) or by fault tests (``EDGEWISE_CRASHPOINT``,
edge_node/updates/crashpoints.py). The worker's variables (``EDGEWISE_WORKER_*``) are skipped
as a whole in :func:`unknown_env_names`."""


def unknown_env_names(cls: type[BaseSettings] = NodeConfig) -> list[str]:
    """EDGEWISE_* variables set now that no setting reads (typos such as EDGEWISE_NODEID): the
    node warns about them (:func:`edgewise.settings.unknown_env_names`)."""
    return [
        name
        for name in _unknown_env_names(cls, OTHER_COMMANDS_ENV)
        if not name.startswith("EDGEWISE_WORKER_")  # the worker's settings (one host, two services)
    ]
