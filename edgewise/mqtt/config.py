"""Typed, frozen MQTT connection settings shared by every edgewise service."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgewise.settings import shown_input as shown_input  # re-exported (edgewise.mqtt)


class MqttConfig(BaseModel):
    """How a service reaches its broker.

    Credentials never come from the command line: ``password_file`` names a file, or the
    ``EDGEWISE_MQTT__PASSWORD`` environment variable sets ``password``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str = Field(
        "",
        description="stable client id, used as given; empty: derived from the connection's"
        " base id, as ``{username}:{base}`` when a username is set (see client_id_for)",
    )
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: int = Field(30, ge=5, le=65535)
    connect_timeout_s: float = Field(10.0, gt=0)
    session_expiry_s: int = Field(
        3600, ge=0, description="MQTT 5 session expiry; 0 = clean session"
    )
    receive_maximum: int = Field(
        1000, ge=1, le=65535, description="in-flight QoS>0 messages we accept"
    )
    reconnect_first_s: float = Field(
        0.5, gt=0, le=2.0, description="longest first wait after a loss; doubles per attempt"
    )
    reconnect_fast_cap_s: float = Field(
        2.0,
        gt=0,
        le=60.0,
        description="longest wait while the outage is younger than reconnect_fast_for_s, so a"
        " broker back within that time is tried again within this (ADR 0077)",
    )
    reconnect_fast_for_s: float = Field(
        62.0,
        ge=0,
        le=3600.0,
        description="how long after a loss the fast waits apply: a 60 s outage and 2 s for the"
        " broker to start and the loss to be seen",
    )
    reconnect_cap_s: float = Field(
        10.0,
        gt=0,
        le=60.0,
        description="wait once the outage is older: between half of it and it, so at most"
        " 120 / reconnect_cap_s attempts a minute (12 with 10 s)",
    )
    reconnect_reset_after_s: float = Field(
        10.0,
        ge=0,
        le=3600.0,
        description="a connection up this long starts a fresh schedule when it ends; one that"
        " ends sooner (a broker that accepts and drops) goes on with its outage's schedule",
    )
    username: str | None = None
    password: str | None = Field(None, repr=False)
    password_file: Path | None = None
    tls_ca_file: Path | None = None
    tls: bool = Field(
        False,
        description="TLS even without tls_ca_file: the broker's certificate must chain to a CA"
        " the system trusts (setting tls_ca_file turns TLS on too)",
    )
    tls_insecure: bool = False
    takeover_backoff_first_s: float = Field(
        1.0,
        gt=0,
        le=60.0,
        description="first wait after the broker gave this client id to another connection;"
        " doubles per takeover, and after 5 takeovers one try every 300 s (ADR 0073)",
    )

    @model_validator(mode="after")
    def _cap_not_below_first(self) -> MqttConfig:
        if self.reconnect_cap_s < self.reconnect_first_s:
            raise ValueError(
                f"reconnect_cap_s ({self.reconnect_cap_s}) must be >= reconnect_first_s"
                f" ({self.reconnect_first_s})"
            )
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca_file is not None

    def client_id_for(self, base: str) -> str:
        """The client id of a connection whose own name is ``base`` (the team's rule, see
        docs/configuration.md): an explicit ``client_id`` as given; else ``{username}:{base}``
        when the connection authenticates, so the broker can tell whose it is (':' cannot be
        in a Mosquitto username); else ``base``."""
        if self.client_id:
            return self.client_id
        if self.username:
            return f"{self.username}:{base}"
        return base

    def resolved_password(self) -> str | None:
        if self.password is not None:
            return self.password
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").strip()
        return None
