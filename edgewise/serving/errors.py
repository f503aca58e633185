"""Exceptions raised by :mod:`edgewise.serving`.

Tree::

    ServingError
    └── ModelLoadError     the model could not be loaded (translated from the runtime backend's
                           RuntimeLoadError at one boundary)
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class of every error raised by edgewise.serving."""


class ModelLoadError(ServingError):
    """The model could not be loaded."""
