"""Signed model updates on the node: the I/O around the pure verifier in :mod:`edgewise.releases`.

* :mod:`.manager`    :class:`UpdateManager`, the async context manager the node runs
* :mod:`.state`      the persisted state directory and its update state machine
* :mod:`.download`   chunked, capped, resumable, hash-verified artifact download
* :mod:`.validate`   fresh session, declared spec, golden set, finite outputs
* :mod:`.probation`  the health window after a swap
* :mod:`.journal`    the command journal: recorded before acknowledged, run once, in order
* :mod:`.rejects`    rejections on the control topics: counted, logged and reported capped
* :mod:`.config`     :class:`UpdatesConfig` (``[updates]`` in the node config)
* :mod:`.errors`     ``UpdateError`` > ``StepFailed`` | ``StateError``
"""

from edge_node.updates.config import UpdatesConfig
from edge_node.updates.errors import StateError, StepFailed, UpdateError
from edge_node.updates.manager import UpdateManager

__all__ = ["StateError", "StepFailed", "UpdateError", "UpdateManager", "UpdatesConfig"]
