"""Exceptions raised by :mod:`broker_bridge`.

Errors of the parts underneath (``edgewise.mqtt``, ``outbox``) are handled inside the bridge
(reconnects, retries, a degraded status); what reaches a caller is one of these.

Tree::

    BridgeError            anything that stops the bridge from starting or running
    ├── ConfigError        a setting is missing or invalid (the message names the key)
    └── QueueUnusable      a durable queue could not be opened (not merely corrupt: a corrupt
                           file is moved aside and the bridge starts with a fresh one)
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base class of every error raised by broker_bridge."""


class ConfigError(BridgeError):
    """A setting is missing or invalid."""


class QueueUnusable(BridgeError):
    """A durable queue could not be opened or created."""
