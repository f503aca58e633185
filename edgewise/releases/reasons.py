"""Why a node refuses a key set, a release or a command: one stable code per cause.

The codes are reported on ``edge/{node}/events`` and listed, with the step that produces each,
in ``docs/model-updates.md`` (a test keeps the table and this enum equal).
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # -- verification of signed documents (pure, in this order)
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    KEY_SET_BAD_SIGNATURE = "key_set_bad_signature"
    KEY_SET_ROLLBACK = "key_set_rollback"
    KEY_SET_EXPIRED = "key_set_expired"
    NO_KEY_SET = "no_key_set"
    UNKNOWN_KEY = "unknown_key"
    REVOKED_KEY = "revoked_key"
    BAD_SIGNATURE = "bad_signature"
    WRONG_HARDWARE_CLASS = "wrong_hardware_class"
    WRONG_TARGET = "wrong_target"
    OUTSIDE_COHORT = "outside_cohort"
    OLDER_RELEASE = "older_release"
    SAME_RELEASE = "same_release"
    REPLAYED = "replayed"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    # -- the node's hardware class (node side, before any chunk is fetched)
    MODEL_TOO_LARGE = "model_too_large"
    INPUT_TOO_LARGE = "input_too_large"
    # -- download (node side)
    SIZE_EXCEEDED = "size_exceeded"
    HASH_MISMATCH = "hash_mismatch"
    DOWNLOAD_TIMEOUT = "download_timeout"
    STORAGE_ERROR = "storage_error"
    # -- validation (node side, a fresh session)
    UNSUPPORTED_FORMAT = "unsupported_format"
    LOAD_FAILED = "load_failed"
    SPEC_MISMATCH = "spec_mismatch"
    NON_FINITE_OUTPUT = "non_finite_output"
    GOLDEN_FAILED = "golden_failed"
    # -- after activation
    PROBATION_FAILED = "probation_failed"
    CRASHED_IN_PROBATION = "crashed_in_probation"
    # -- commands
    UNSUPPORTED_COMMAND = "unsupported_command"
    COMMAND_FAILED = "command_failed"
    QUEUE_FULL = "queue_full"


TRUST_DEPENDENT: frozenset[Reason] = frozenset(
    {
        Reason.NO_KEY_SET,
        Reason.UNKNOWN_KEY,
        Reason.REVOKED_KEY,
        Reason.KEY_SET_EXPIRED,
    }
)
"""Rejections that depend on the node's trusted keys, not on the manifest alone: a node
re-examines such a manifest once its key set changes."""
