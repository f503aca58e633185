"""Bounds on untrusted input, checked before (and while) any work is done on it."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Limits:
    """Every cap the decoders enforce. Frozen and hashable: decoders cache per instance.

    ``max_items`` and ``max_extra_items`` bound how many MessagePack/JSON values (scalars and
    containers, counted together) a message may hold: ``decode_any`` may build at most
    ``max_items``; a typed message may hold what its schema can need at these limits plus
    ``max_extra_items`` for fields this version does not know (forward compatibility).
    """

    max_payload_bytes: int = 1_048_576
    max_tensor_elements: int = 262_144
    max_rank: int = 4
    max_str_len: int = 128
    max_results_per_batch: int = 4096
    max_frames_per_message: int = 256
    max_depth: int = 16
    max_items: int = 65_536
    max_extra_items: int = 1_024

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"Limits.{field.name} must be a positive int, got {value!r}")


DEFAULT_LIMITS = Limits()
