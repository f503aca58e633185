"""Signed model updates on the node: the I/O around the pure verifier in :mod:`edgewise.releases`.

* :mod:`.manager`    :class:`UpdateManager`, the async context manager the node runs (wiring)
* :mod:`.boot`       at start: finish or abandon what a crash interrupted, load the active model
* :mod:`.held`       the trusted key set and update state in memory, each change written first
* :mod:`.verdicts`   verdict memory: which manifests and key sets were judged, and how
* :mod:`.judging`    verifying a manifest or key set: the pure part
* :mod:`.install`    the install pipeline: download → validate → swap → probation
* :mod:`.commands`   operator commands: verified, recorded, acknowledged, run once, in order
* :mod:`.events`     update events: every step and outcome reported
* :mod:`.stats`      what the updater counts
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
