"""The bridge's settings: typed, frozen, from a TOML file and ``EDGEWISE_*`` variables.

Precedence, highest first: explicit overrides, environment variables (``__`` separates nested
keys: ``EDGEWISE_CLOUD_BROKER__PASSWORD``, ``EDGEWISE_QUEUE__DIR``), the TOML file, defaults.
An invalid or unknown key fails at start with a message naming it. Credentials come from
``password_file`` or the environment, never from the command line (docs/security.md).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from broker_bridge.errors import ConfigError
from broker_bridge.rules import CompiledRule, Direction, compile_rule
from edgewise.mqtt import MqttConfig
from edgewise.outbox.config import MIN_MAX_BYTES
from edgewise.settings import (
    FROZEN,
    FileAndEnvSettings,
    env_name,
    env_prefix,
    load_settings,
    settings_source,
    topic_level,
)
from schemas import ACK_IDS_MAX, ContractError, validate_filter


class RuleConfig(BaseModel):
    """One forwarding rule: ``filter`` on the source side, ``template`` on the other."""

    model_config = FROZEN

    direction: Direction
    filter: str = Field(description="topic filter subscribed on the source broker")
    template: str | None = Field(
        None, description="topic on the other broker; same wildcards as filter; default = filter"
    )
    qos: Literal[0, 1] = 1
    retain: bool = Field(True, description="keep the retained flag across the bridge")

    @field_validator("filter")
    @classmethod
    def _filter(cls, v: str) -> str:
        try:
            validate_filter(v)
        except ContractError as exc:
            raise ValueError(exc.detail) from None
        if v.startswith("$share/"):
            raise ValueError("a bridge rule cannot use a shared subscription ($share/...)")
        return v


class QueueConfig(BaseModel):
    """Where the two durable queues live and how large each may grow (db + WAL on disk)."""

    model_config = FROZEN

    dir: Path = Path("edgewise-bridge")
    up_max_bytes: int = Field(256 * 1024 * 1024, ge=MIN_MAX_BYTES)
    down_max_bytes: int = Field(64 * 1024 * 1024, ge=MIN_MAX_BYTES)
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL"


class ForwardConfig(BaseModel):
    """How fast and how many at once a queue is drained towards its far broker."""

    model_config = FROZEN

    window: int = Field(
        256, ge=1, le=65535, description="publishes in flight (also capped by Receive Maximum)"
    )
    max_rate_per_s: float = Field(
        0.0, ge=0, description="drain rate cap per direction, messages/s; 0 = no cap"
    )
    max_batch: int = Field(1024, ge=1, description="received messages per queue transaction")
    max_pending: int = Field(
        4096, ge=1, description="received messages waiting for the queue before reading pauses"
    )


class AcksConfig(BaseModel):
    """End-to-end mode, the bridge's side (docs/adr/0078-end-to-end-acks.md): once a results
    message of a node is in the up queue, confirm it to the node on the site broker."""

    model_config = FROZEN

    enabled: bool = Field(
        False, description="confirm queued results messages to their nodes (end-to-end mode)"
    )
    filter: str = Field(
        "edge/+/results",
        description="site topics whose messages are results messages to confirm (an up rule"
        " must take them)",
    )
    template: str = Field(
        "edge/+/acks",
        description="where the confirmation goes on the site broker; same wildcards as filter",
    )
    max_ids: int = Field(
        ACK_IDS_MAX, ge=1, le=ACK_IDS_MAX, description="message ids per confirmation at most"
    )

    @field_validator("filter")
    @classmethod
    def _filter(cls, v: str) -> str:
        try:
            validate_filter(v)
        except ContractError as exc:
            raise ValueError(exc.detail) from None
        return v


class BridgeConfig(FileAndEnvSettings):
    """Everything a bridge needs; see docs/bridge.md for each key."""

    bridge_id: str = Field(
        default_factory=lambda: "bridge-" + (socket.gethostname().split(".")[0] or "site")
    )
    site: str = Field("site", description="this site's name: {site} in rule templates")
    site_broker: MqttConfig = MqttConfig()
    cloud_broker: MqttConfig = MqttConfig(port=1884)
    rules: tuple[RuleConfig, ...] = Field(min_length=1)
    queue: QueueConfig = QueueConfig()
    forward: ForwardConfig = ForwardConfig()
    acks: AcksConfig = AcksConfig()
    status_topic: str = "bridges/{bridge}/status"
    telemetry_topic: str = "bridges/{bridge}/telemetry"
    telemetry_interval_s: float = Field(10.0, gt=0, le=3600)
    max_payload_bytes: int = Field(
        1024 * 1024, ge=1, le=256 * 1024 * 1024, description="larger messages are not forwarded"
    )
    echo_window_s: float = Field(
        60.0, gt=0, description="how long an MQTT 3.1.1 publish is remembered to drop its echo"
    )
    echo_max_entries: int = Field(200_000, ge=1)
    drain_timeout_s: float = Field(10.0, gt=0, le=600)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    _names = field_validator("bridge_id", "site")(topic_level)

    @field_validator("status_topic", "telemetry_topic")
    @classmethod
    def _own_topics(cls, v: str) -> str:
        if "+" in v.split("/") or "#" in v.split("/"):
            raise ValueError("must be a topic, not a filter")
        return v

    @model_validator(mode="after")
    def _rules_compile(self) -> BridgeConfig:
        for i, rule in enumerate(self.rules):
            try:
                compile_rule(
                    rule.direction, rule.filter, rule.template, rule.qos, rule.retain, self.names
                )
            except ValueError as exc:
                raise ValueError(f"rules[{i}] (filter {rule.filter!r}): {exc}") from None
        if self.acks.enabled:
            try:
                self.acks_rule()
            except ValueError as exc:
                raise ValueError(f"acks (filter {self.acks.filter!r}): {exc}") from None
        if self.site_broker.host == self.cloud_broker.host and (
            self.site_broker.port == self.cloud_broker.port
        ):
            raise ValueError(
                "site_broker and cloud_broker are the same broker"
                f" ({self.site_broker.host}:{self.site_broker.port}): set cloud_broker.host and"
                " cloud_broker.port (a [cloud_broker] table without them means 127.0.0.1:1883)"
            )
        return self

    @property
    def names(self) -> dict[str, str]:
        return {"site": self.site, "bridge": self.bridge_id}

    def compiled(self, direction: Direction) -> list[CompiledRule]:
        return [
            compile_rule(r.direction, r.filter, r.template, r.qos, r.retain, self.names)
            for r in self.rules
            if r.direction == direction
        ]

    def acks_rule(self) -> CompiledRule:
        """The confirmations' topic mapping: a results topic on the site → its ``acks`` topic."""
        a = self.acks
        return compile_rule("down", a.filter, a.template, 1, False, self.names)

    def own_topic(self, template: str) -> str:
        return template.replace("{bridge}", self.bridge_id).replace("{site}", self.site)

    @classmethod
    def load(cls, path: Path | str | None = None, **overrides: Any) -> BridgeConfig:
        """Read settings; raise :class:`ConfigError` naming the bad key."""
        config = load_settings(cls, path, overrides, error=ConfigError)
        for side in ("site_broker", "cloud_broker"):
            mqtt: MqttConfig = getattr(config, side)
            if mqtt.password_file is not None and not mqtt.password_file.is_file():
                env = env_name(env_prefix(cls), (side, "password_file"))
                raise ConfigError(
                    f"invalid configuration (from {settings_source(cls, path)}):\n"
                    f"  {side}.password_file: {mqtt.password_file} does not exist"
                    f"  [set it in the file or with {env}]"
                )
        return config
