"""Settings of signed model updates (``[updates]`` in the node config)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class UpdatesConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    root_key: str | None = Field(
        None,
        description="the fleet's root public key the node is enrolled with: a PEM file path or"
        " 64 hex characters; unset = updates off",
    )
    download_timeout_s: float = Field(300.0, gt=0, le=86400)
    max_artifact_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    probation_s: float = Field(60.0, ge=0, le=86400)
    probation_min_inferences: int = Field(50, ge=0)
    probation_max_s: float = Field(3600.0, gt=0, le=7 * 86400)
    probation_max_error_rate: float = Field(0.01, ge=0, le=1)
    probation_max_non_finite_rate: float = Field(0.0, ge=0, le=1)
    probation_max_p99_ms: float = Field(1000.0, gt=0)
    probation_min_mean_confidence: float = Field(0.3, ge=0, le=1)

    def root_key_bytes(self) -> bytes | None:
        """The raw root public key, read from the file if ``root_key`` names one."""
        if self.root_key is None:
            return None
        from releases.errors import BadKey
        from releases.signing import load_public, raw_public

        text = self.root_key.strip()
        data = text.encode() if len(text) == 64 else Path(text).read_bytes()
        try:
            return raw_public(load_public(data))
        except BadKey as exc:
            raise ValueError(f"updates.root_key: {exc}") from None
