"""Exceptions raised by :mod:`edge_node`.

Tree::

    EdgeNodeError
    ├── ConfigError        a setting is missing or invalid (the message names the key and source)
    └── ModelLoadError     the model could not be loaded or does not fit the node (translated from
        │                  the runtime backend's RuntimeLoadError at one boundary)
        └── ModelRefused   the node's hardware class cannot run the model (format, size, input);
                           ``reason`` is the code reported on events
"""

from __future__ import annotations

from edgewise.serving.errors import ModelLoadError as _ServingModelLoadError


class EdgeNodeError(Exception):
    """Base class of every error raised by edge_node."""


class ConfigError(EdgeNodeError):
    """A setting is missing or invalid."""


class ModelLoadError(EdgeNodeError, _ServingModelLoadError):
    """The model could not be loaded (also an :class:`edgewise.serving.errors.ModelLoadError`)."""


class ModelRefused(ModelLoadError):
    """The node's hardware class cannot run the model: ``reason`` is ``unsupported_format``,
    ``model_too_large`` or ``input_too_large`` (the codes of :class:`edgewise.releases.Reason`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
