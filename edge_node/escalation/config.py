"""Escalation settings of a node (``[escalation]`` in the node config; docs/configuration.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgewise.mqtt import MqttConfig

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class PolicyConfig(BaseModel):
    """When a model's verdict is too unsure to stand alone; any test that trips escalates."""

    model_config = _FROZEN

    max_softmax_below: float | None = Field(None, ge=0, le=1)
    margin_below: float | None = Field(None, ge=0, le=1)
    entropy_above: float | None = Field(None, ge=0)
    deadline_ms: float = Field(2000.0, gt=0, le=600_000)

    @model_validator(mode="after")
    def _one_test(self) -> PolicyConfig:
        if (self.max_softmax_below, self.margin_below, self.entropy_above) == (None, None, None):
            raise ValueError("set at least one of max_softmax_below, margin_below, entropy_above")
        return self


class DefaultPolicyConfig(PolicyConfig):
    """The policy of every model without an entry in ``escalation.policies``."""

    # Chosen on the held-out digits (README, "Hybrid inference"): ~16 % escalated.
    max_softmax_below: float | None = Field(0.95, ge=0, le=1)


class EscalationConfig(BaseModel):
    model_config = _FROZEN

    enabled: bool = Field(False, description="escalate unsure verdicts to cloud workers")
    policy: DefaultPolicyConfig = DefaultPolicyConfig()
    policies: dict[str, PolicyConfig] = Field(
        {},
        description="per model name, replacing `policy` for that model: max_softmax_below,"
        " margin_below, entropy_above, deadline_ms",
    )
    uplink: MqttConfig | None = Field(
        None, description="broker of the cloud workers; empty = the node's own mqtt settings"
    )
    max_pending: int = Field(
        10_000, ge=1, description="escalations awaiting a reply; beyond it, edge_fallback at once"
    )
    max_message_bytes: int = Field(
        524_288,
        ge=1024,
        le=16 * 1_048_576,
        description="an escalation message holds cases while their tensors add up to less than"
        " this (a case bigger than that goes alone); keep it below the workers'"
        " max_payload_bytes",
    )
    max_reply_bytes: int = Field(
        65_536,
        ge=256,
        le=1_048_576,
        description="larger reply messages are rejected before decoding (one holds up to 256"
        " verdicts of ~110 bytes)",
    )
    unavailable_after_unanswered: int = Field(
        5,
        ge=1,
        le=1_000_000,
        description="this many escalated cases in a row ending at their deadline with no reply"
        " mark the cloud unavailable (degraded: cloud_unavailable): unsure cases are then"
        " decided edge_fallback at once, and probes ask whether the cloud is back",
    )
    probe_interval_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="while the cloud is unavailable, at most one unsure case per interval is"
        " also sent to the workers as a probe (its result is decided at once all the same);"
        " the first in-time reply clears cloud_unavailable",
    )
    watch_worker_presence: bool = Field(
        True,
        description="follow the workers' retained presence ({cloud_root}/workers/+/status):"
        " when the number online drops from one or more to none, the cloud is unavailable at"
        " once",
    )
    cache_entries: int = Field(10_000, ge=0, description="cloud verdicts kept by input hash")
    cache_ttl_s: float = Field(600.0, gt=0)
    hard_example_outbox_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024 * 1024,
        description="bound of the file holding hard examples made while the uplink was down,"
        " for an escalator on its own; in a node they share its outbox (storage.outbox_max_bytes)",
    )
