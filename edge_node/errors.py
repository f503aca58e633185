"""Exceptions raised by :mod:`edge_node`.

Tree::

    EdgeNodeError
    ├── ConfigError        a setting is missing or invalid (the message names the key and source)
    └── ModelLoadError     the model could not be loaded or does not fit the node (translated from
                           the runtime backend's RuntimeLoadError at one boundary)
"""

from __future__ import annotations


class EdgeNodeError(Exception):
    """Base class of every error raised by edge_node."""


class ConfigError(EdgeNodeError):
    """A setting is missing or invalid."""


class ModelLoadError(EdgeNodeError):
    """The model could not be loaded."""
