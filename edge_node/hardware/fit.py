"""The node's hardware: its class with the node's own overrides, and what it can run.

Precedence (``docs/hardware-classes.md``): a key the node config sets explicitly wins over the
class — ``model.providers`` (for the class's runtime), ``model.intra_op_threads``,
``model.inter_op_threads``, ``health.latency_slo_p99_ms``; an unset one takes the class's value.
The class's envelope (formats, ``max_model_bytes``, ``max_input_elements``) has no override:
a node that needs another envelope needs another class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge_node.errors import ConfigError
from edge_node.hardware.classes import (
    CPU_PROVIDER,
    FORMAT_RUNTIME,
    HardwareClass,
    check_providers,
)
from edgewise.releases.formats import MODEL_FORMATS, ModelFormat, format_of, suffix_of
from edgewise.serving.runtime import SUPPORTED_SUFFIXES

RefusalReason = Literal["unsupported_format", "model_too_large", "input_too_large"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the class cannot run a model: a reason code (as on update events) and a detail."""

    reason: RefusalReason
    detail: str


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    """What ``load_runtime`` gets for one format on this node."""

    runtime: str
    providers: tuple[str, ...]
    intra_op_threads: int
    inter_op_threads: int

    @property
    def preferred(self) -> str:
        """The provider the node wants serving (the accelerator, if the class has one)."""
        return self.providers[0]


@dataclass(frozen=True, slots=True)
class NodeHardware:
    """The node's class, resolved once at start with the node config's overrides."""

    cls: HardwareClass
    source: Path
    """The hardware classes file the class came from."""
    providers: tuple[str, ...]
    """For the class's runtime: ``model.providers`` if set, else the class's."""
    intra_op_threads: int
    inter_op_threads: int
    latency_slo_p99_ms: float
    """``health.latency_slo_p99_ms`` if set, else the class's envelope; 0 = no SLO."""

    @property
    def name(self) -> str:
        return self.cls.name

    def settings_for_runtime(self, runtime: str) -> RuntimeSettings | None:
        """Providers and threads for ``runtime``; None for a runtime the node does not know.

        The class's own runtime gets its providers in order; another runtime (a second format
        the class accepts) runs on that runtime's CPU provider.
        """
        if runtime == self.cls.runtime:
            providers = self.providers
        elif runtime in CPU_PROVIDER:
            providers = (CPU_PROVIDER[runtime],)
        else:
            return None
        return RuntimeSettings(
            runtime=runtime,
            providers=providers,
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
        )

    def settings_for(self, fmt: ModelFormat) -> RuntimeSettings:
        got = self.settings_for_runtime(FORMAT_RUNTIME[fmt])
        assert got is not None, "every format has a known runtime"
        return got

    def preferred_for(self, path: str | None, runtime: str) -> str | None:
        """The provider the node wants serving a model loaded from ``path`` (its format, by
        suffix) or, without a path, by ``runtime``; None if the node cannot tell."""
        fmt = format_of(path) if path is not None else None
        settings = self.settings_for(fmt) if fmt is not None else self.settings_for_runtime(runtime)
        return None if settings is None else settings.preferred

    def accelerator_missing(self, path: str | None, runtime: str, provider: str) -> bool:
        """True if the model serves on ``provider`` although the node prefers another one."""
        preferred = self.preferred_for(path, runtime)
        return preferred is not None and provider != preferred

    # ------------------------------------------------------------------ what fits
    def refuse_format(self, fmt: str | None, what: str) -> Refusal | None:
        accepted = ", ".join(self.cls.formats)
        if fmt is None or fmt not in MODEL_FORMATS:
            shown = "no known format" if fmt is None else f"format {fmt!r}"
            return Refusal(
                "unsupported_format",
                f"{what} has {shown}; hardware class {self.name} accepts {accepted}",
            )
        if fmt not in self.cls.formats:
            return Refusal(
                "unsupported_format",
                f"{what} is {fmt}; hardware class {self.name} accepts {accepted}",
            )
        if suffix_of(fmt) not in SUPPORTED_SUFFIXES:
            return Refusal(
                "unsupported_format",
                f"{what} is {fmt}; this edgewise installation has no {fmt} runtime"
                f" (supported: {', '.join(SUPPORTED_SUFFIXES)})",
            )
        return None

    def refuse_size(self, size_bytes: int, what: str) -> Refusal | None:
        if size_bytes > self.cls.max_model_bytes:
            return Refusal(
                "model_too_large",
                f"{what} has {size_bytes} bytes > max_model_bytes {self.cls.max_model_bytes}"
                f" of hardware class {self.name}",
            )
        return None

    def refuse_input(self, sample_shape: Sequence[int | None], what: str) -> Refusal | None:
        """``sample_shape`` is one sample's shape (no batch dimension); None or < 0 is dynamic."""
        limit = self.cls.max_input_elements
        if any(d is None or d < 0 for d in sample_shape):
            return Refusal(
                "input_too_large",
                f"{what} has an input with a dynamic dimension besides the batch: it cannot be"
                f" held to max_input_elements {limit} of hardware class {self.name}",
            )
        elements = math.prod(d for d in sample_shape if d is not None)
        if elements > limit:
            return Refusal(
                "input_too_large",
                f"{what} takes {elements} input elements per sample > max_input_elements"
                f" {limit} of hardware class {self.name}",
            )
        return None

    def refuse_file(self, path: Path) -> Refusal | None:
        """Format by suffix and size: what can be judged without loading the file."""
        what = f"model {path}"
        refusal = self.refuse_format(format_of(path), what)
        if refusal is None:
            try:
                size = path.stat().st_size
            except OSError:
                return None  # the runtime says the file is missing, with its own message
            refusal = self.refuse_size(size, what)
        return refusal

    def refuse_release(
        self, fmt: str, size_bytes: int, input_shape: Sequence[int], what: str
    ) -> Refusal | None:
        """A manifest's declared format, size and input ``[batch, *sample]``."""
        return (
            self.refuse_format(fmt, what)
            or self.refuse_size(size_bytes, what)
            or self.refuse_input(list(input_shape[1:]), what)
        )


def resolve(
    classes: dict[str, HardwareClass],
    name: str,
    source: Path,
    *,
    providers: tuple[str, ...] | None,
    intra_op_threads: int | None,
    inter_op_threads: int | None,
    latency_slo_p99_ms: float | None,
) -> NodeHardware:
    """The node's class with its overrides; raise :class:`ConfigError` naming the key."""
    cls = classes.get(name)
    if cls is None:
        raise ConfigError(
            f"hardware_class: {name!r} is not a class in {source}; known:"
            f" {', '.join(sorted(classes))} [set hardware_class or hardware_classes_file]"
        )
    if providers is not None:
        try:
            check_providers(cls.runtime, providers)
        except ValueError as exc:
            raise ConfigError(
                f"model.providers: {exc} (hardware class {name} runs {cls.runtime})"
            ) from None
    return NodeHardware(
        cls=cls,
        source=source,
        providers=cls.providers if providers is None else providers,
        intra_op_threads=cls.intra_op_threads if intra_op_threads is None else intra_op_threads,
        inter_op_threads=cls.inter_op_threads if inter_op_threads is None else inter_op_threads,
        latency_slo_p99_ms=cls.latency_slo_p99_ms
        if latency_slo_p99_ms is None
        else latency_slo_p99_ms,
    )
