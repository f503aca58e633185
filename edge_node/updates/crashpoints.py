"""Crash points: places where a fault test can make the node die as ``kill -9`` would.

``EDGEWISE_CRASHPOINT=NAME`` in a node's environment makes :func:`crashpoint` with that name
send the process SIGKILL when execution reaches it: no ``finally``, no flush, no exit handler,
exactly the crash a power cut or the OOM killer gives. Unset (always, outside fault tests) the
call is one comparison. It exists for windows too short to hit from outside, such as the few
file-system operations that swap a validated model in; tests/test_updates_process.py kills the
node at each of them and checks that it restarts serving one complete, verified model.
"""

from __future__ import annotations

import os
import signal

ENV = "EDGEWISE_CRASHPOINT"
_ARMED = os.environ.get(ENV) or None


def crashpoint(name: str) -> None:
    """Die here, by SIGKILL, if ``EDGEWISE_CRASHPOINT`` names this point."""
    if _ARMED is not None and name == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
