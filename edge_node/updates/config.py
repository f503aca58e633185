"""Settings of signed model updates (``[updates]`` in the node config)."""

from __future__ import annotations

import string
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator


def read_root_key(text: str) -> bytes:
    """The raw root public key from 64 hex characters or a PEM/raw key file; ValueError if not.

    A path that names an existing file is a file even when it is 64 characters long.
    """
    from edgewise.releases.errors import BadKey
    from edgewise.releases.signing import load_public, raw_public

    text = text.strip()
    try:
        as_hex = len(text) == 64 and all(c in string.hexdigits for c in text)
        data = text.encode() if as_hex and not Path(text).is_file() else Path(text).read_bytes()
        return raw_public(load_public(data))
    except OSError as exc:
        raise ValueError(f"cannot read the root key file: {exc}") from None
    except BadKey as exc:
        raise ValueError(str(exc)) from None


class UpdatesConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    root_key: str | None = Field(
        None,
        description="the fleet's root public key the node is enrolled with: a PEM file path or"
        " 64 hex characters; unset = updates off",
    )
    download_timeout_s: float = Field(
        300.0, gt=0, le=86400, description="give up a download (and report it) after this long"
    )
    max_artifact_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="refuse releases whose artifact is larger"
    )
    probation_s: float = Field(
        60.0, ge=0, le=86400, description="health window after a swap before it is committed"
    )
    probation_min_inferences: int = Field(
        50, ge=0, description="the window lasts until this many inferences were judged"
    )
    probation_max_s: float = Field(
        3600.0, gt=0, le=7 * 86400, description="commit after this long even with less traffic"
    )
    probation_max_error_rate: float = Field(
        0.01, ge=0, le=1, description="roll back above this share of failed inferences"
    )
    probation_max_non_finite_rate: float = Field(
        0.0, ge=0, le=1, description="roll back above this share of NaN/Inf outputs"
    )
    probation_max_p99_ms: float = Field(
        1000.0, gt=0, description="roll back above this p99 latency of the new model"
    )
    probation_min_mean_confidence: float = Field(
        0.3, ge=0, le=1, description="roll back below this mean confidence (a collapse)"
    )
    command_session_expiry_s: int = Field(
        7 * 24 * 3600,
        ge=0,
        le=2**32 - 1,
        description="how long the broker keeps the updater's session, and the QoS 1 commands"
        " sent to it, while the node is away; 0: commands sent meanwhile are lost",
    )
    command_queue_max: int = Field(
        100, ge=1, le=100_000, description="verified commands waiting to run; more: queue_full"
    )
    rejection_events_max_per_s: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="events per second per rejection reason on the control topics, after a"
        " burst of 10; beyond it rejections are counted and logged only",
    )

    @field_validator("root_key")
    @classmethod
    def _loadable(cls, v: str | None) -> str | None:
        if v is not None:
            read_root_key(v)
        return v

    def root_key_bytes(self) -> bytes | None:
        return None if self.root_key is None else read_root_key(self.root_key)
