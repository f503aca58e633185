"""Settings read the same way by every service: a TOML file, environment variables, defaults.

Precedence, highest first: explicit overrides (command-line flags), environment variables
(``{prefix}KEY``; ``__`` separates nested keys: ``EDGEWISE_MQTT__HOST``), the TOML file,
defaults. A bad or unknown key fails at start with one line per key naming the key, where the
settings came from and the variable that sets it; a value that may be a credential is never
quoted. Imports pydantic and :mod:`schemas` only: it sits below every layer that has settings.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ConfigDict, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from schemas import ContractError, validate_level

FROZEN = ConfigDict(frozen=True, extra="forbid")
"""The ``model_config`` of every settings table: immutable, unknown keys refused."""

_S = TypeVar("_S", bound=BaseSettings)

#: Setting names whose values a configuration error never quotes.
_SECRET_WORDS = ("pass", "secret", "token")


class FileAndEnvSettings(BaseSettings):
    """Base of a service's settings: overrides, then ``EDGEWISE_*`` variables, then the TOML
    file (given to :func:`load_settings`), then defaults. Subclasses may change ``env_prefix``."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEWISE_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def load_settings(
    cls: type[_S],
    path: Path | str | None,
    overrides: dict[str, Any],
    *,
    error: type[Exception],
    what: str = "configuration",
) -> _S:
    """``cls`` from an optional TOML file, the environment and ``overrides``; raise ``error``
    (the service's ConfigError) naming each bad key, its source and its variable. ``what``
    names the settings in the message (``configuration``, ``worker configuration``)."""
    prefix = env_prefix(cls)
    source = settings_source(cls, path)
    target: type[_S] = cls
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise error(f"config file {path} does not exist (pass --config PATH)")
        target = type(
            cls.__name__, (cls,), {"model_config": {**cls.model_config, "toml_file": path}}
        )
    try:
        return target(**overrides)
    except ValidationError as exc:
        raise error(explain(exc, source, prefix, what)) from None
    except SettingsError as exc:  # a variable that is not valid JSON for a list or a table
        raise error(
            f"invalid {what} (from {source}): {exc}; list and table values in {prefix}*"
            f' variables are JSON, e.g. {prefix}KEY=\'["a", "b"]\' or'
            f" {prefix}TABLE='{{\"key\": 1}}'"
        ) from None
    except (OSError, ValueError) as exc:  # unreadable or malformed TOML
        raise error(f"cannot read config {path}: {exc}") from None


def env_prefix(cls: type[BaseSettings]) -> str:
    """The prefix of ``cls``'s environment variables (``EDGEWISE_``)."""
    return str(cls.model_config.get("env_prefix") or "")


def settings_source(cls: type[BaseSettings], path: Path | str | None) -> str:
    """Where settings come from, as error messages say it."""
    where = "defaults" if path is None else str(path)
    return f"{where} and {env_prefix(cls)}* variables"


def explain(exc: ValidationError, source: str, prefix: str, what: str = "configuration") -> str:
    """One line per error: the key, pydantic's message, the value unless it may be secret, and
    the variable that sets the key (a list item is set through the whole list's variable)."""
    lines = [f"invalid {what} (from {source}):"]
    for err in exc.errors():
        loc = err["loc"]
        key = ".".join(str(p) for p in loc) or "(top level)"
        given = err.get("input")
        line = f"  {key}: {err['msg']}{shown_input(key, err['type'], given)}"
        env = env_name(prefix, loc)
        if env is None:
            lines.append(line)
            continue
        lines.append(f"{line}  [set it in the file or with {env}]")
        if err["type"] in ("tuple_type", "list_type") and isinstance(given, str):
            lines.append(
                f'    list values in {prefix}* variables are JSON, e.g. {env}=\'["a", "b"]\''
            )
    return "\n".join(lines)


def env_name(prefix: str, loc: Sequence[int | str]) -> str | None:
    """The variable that sets the key at ``loc`` (``None`` for an error about the whole)."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):  # an item of a list: only the list has a variable
            break
        parts.append(part.upper())
    return prefix + "__".join(parts) if parts else None


def shown_input(key: str, error_type: str, given: object) -> str:
    """`` (got VALUE)`` for a configuration error about ``key``, or ``""`` where VALUE may be a
    credential: a key that names one (``password``, ``mqtt.passwd`` …), an unknown key (a
    mistyped ``pasword`` is unknown too), or a table (it may hold either)."""
    if isinstance(given, dict | list | tuple) or error_type == "extra_forbidden":
        return ""
    if any(word in key.lower() for word in _SECRET_WORDS):
        return ""
    return f" (got {given!r})"


def unknown_env_names(cls: type[BaseSettings], others: Collection[str] = ()) -> list[str]:
    """Variables with ``cls``'s prefix set now that no setting reads (typos such as
    ``EDGEWISE_NODEID``), apart from ``others`` (variables other commands read).

    Unknown nested keys (``EDGEWISE_MQTT__HOSTT``) already fail validation; a top-level name
    that matches no field is silently ignored by pydantic-settings, so a service warns about it.
    """
    prefix = env_prefix(cls)
    known = {f"{prefix}{name.upper()}" for name in cls.model_fields} | set(others)
    return sorted(k for k in os.environ if k.startswith(prefix) and k.split("__")[0] not in known)


def topic_level(v: str) -> str:
    """A validator's check that ``v`` is one MQTT topic level (ids, names, roots)."""
    try:
        return validate_level(v)
    except ContractError as exc:
        raise ValueError(exc.detail) from None


def empty_is_unset(v: object) -> object:
    """A ``mode="before"`` validator's body: ``""`` (a TOML file or variable can't say None)
    means the setting is unset."""
    return None if v == "" else v
