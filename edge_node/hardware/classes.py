"""Hardware classes: what a kind of device runs, read once at start from ``hardware_classes.toml``.

One TOML table per class, named by the class (a topic level, as in ``fleet/{class}/…``). Every
problem in the file fails the node at start with a :class:`ConfigError` naming the file, the
class and the key. See ``docs/hardware-classes.md``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from edge_node.errors import ConfigError
from edgewise.releases.formats import ModelFormat
from schemas import ContractError, validate_level

RuntimeName = Literal["onnxruntime", "litert"]

RUNTIME_FORMAT: Final[dict[RuntimeName, ModelFormat]] = {"onnxruntime": "onnx", "litert": "tflite"}
"""The one format each runtime loads (``load_runtime`` picks the backend by file suffix)."""
FORMAT_RUNTIME: Final[dict[ModelFormat, RuntimeName]] = {f: r for r, f in RUNTIME_FORMAT.items()}
CPU_PROVIDER: Final[dict[str, str]] = {
    "onnxruntime": "CPUExecutionProvider",
    "litert": "cpu",
}
"""What serves a format on a class whose accelerator belongs to another runtime."""
LITERT_PROVIDERS: Final = ("edgetpu", "cpu")
"""Delegates the LiteRT backend knows (``edgewise/serving/runtime/litert.py``)."""


def shipped_classes_file() -> Path:
    """The default ``hardware_classes.toml`` shipped in the package."""
    return Path(__file__).with_name("hardware_classes.toml")


def check_providers(runtime: RuntimeName, providers: tuple[str, ...]) -> tuple[str, ...]:
    """``providers`` if they are names ``runtime`` knows, without repeats; ValueError if not."""
    if not providers:
        raise ValueError("give at least one provider")
    if len(set(providers)) != len(providers):
        raise ValueError(f"a provider is listed twice: {list(providers)}")
    for name in providers:
        if runtime == "onnxruntime" and not name.endswith("ExecutionProvider"):
            raise ValueError(
                f"{name!r} is not an ONNX Runtime execution provider name (those end in"
                " 'ExecutionProvider', e.g. 'CUDAExecutionProvider')"
            )
        if runtime == "litert" and name not in LITERT_PROVIDERS:
            raise ValueError(
                f"{name!r} is not a LiteRT provider; known: {', '.join(LITERT_PROVIDERS)}"
            )
    return providers


class HardwareClass(BaseModel):
    """One class of device: its runtime, accelerator preference and envelope."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="the class name (the table's name in the file)")
    description: str = ""
    runtime: RuntimeName = Field(description="the runtime of the class's accelerator")
    providers: tuple[str, ...] = Field(
        min_length=1, description="the runtime's providers, most preferred (the accelerator) first"
    )
    formats: tuple[ModelFormat, ...] = Field(min_length=1, description="model formats accepted")
    intra_op_threads: int = Field(ge=1, le=64)
    inter_op_threads: int = Field(1, ge=1, le=64)
    max_model_bytes: int = Field(ge=1, description="largest model file the class runs")
    max_input_elements: int = Field(
        ge=1, description="largest model input per sample (batch dimension excluded)"
    )
    latency_slo_p99_ms: float = Field(
        ge=0, description="p99 latency envelope, frame received -> result made; 0 = none"
    )

    @field_validator("providers")
    @classmethod
    def _providers_fit_the_runtime(
        cls, v: tuple[str, ...], info: ValidationInfo
    ) -> tuple[str, ...]:
        runtime = info.data.get("runtime")
        return v if runtime is None else check_providers(runtime, v)

    @field_validator("formats")
    @classmethod
    def _formats_include_the_runtime(
        cls, v: tuple[ModelFormat, ...], info: ValidationInfo
    ) -> tuple[ModelFormat, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"a format is listed twice: {list(v)}")
        runtime = info.data.get("runtime")
        if runtime is not None and RUNTIME_FORMAT[runtime] not in v:
            raise ValueError(
                f"{list(v)} leaves out {RUNTIME_FORMAT[runtime]!r}, the format of runtime"
                f" {runtime!r}"
            )
        return v


_CLASSES: Final = TypeAdapter(dict[str, HardwareClass])


def load_classes(path: Path) -> dict[str, HardwareClass]:
    """Every class in ``path``; raise :class:`ConfigError` naming the file, class and key."""
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"hardware_classes_file {path} cannot be read: {exc.strerror or exc}"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"hardware classes file {path} is not valid TOML: {exc}") from None
    problems: list[str] = []
    raw: dict[str, Any] = {}
    for name, body in table.items():
        try:
            validate_level(name)
        except ContractError as exc:
            problems.append(f"  [{name}]: not a valid class name: {exc.detail}")
            continue
        if not isinstance(body, dict):
            problems.append(f"  {name}: want a table [{name}] of settings (got {body!r})")
        elif "name" in body:
            problems.append(f"  {name}.name: not a key; the table's name is the class name")
        else:
            raw[name] = {**body, "name": name}
    if not raw and not problems:
        problems.append("  the file defines no class; give at least one [class-name] table")
    try:
        classes = _CLASSES.validate_python(raw)
    except ValidationError as exc:
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            given = err.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            problems.append(f"  {key}: {err['msg']}{shown}")
        classes = {}
    if problems:
        lines = [f"invalid hardware classes file {path}:", *problems]
        raise ConfigError("\n".join(lines))
    return classes
