"""Waiting for a condition no event announces: one helper, in an async and a sync flavour.

Prefer awaiting an event (a future, a recorder's condition); poll only state that has none, such
as a service's counters, a file on disk or a log line. Both helpers check ``check()`` first, then
every ``every_s`` (``0`` only yields to the event loop), and fail with an ``AssertionError`` naming
``what`` was awaited and for how long, followed by ``detail()`` when given (e.g. a log's tail).
``check`` may itself raise to stop waiting early (e.g. when the awaited process has exited).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable

__all__ = ["eventually", "eventually_logged", "eventually_sync"]


def _timed_out(what: str, timeout_s: float, detail: Callable[[], str] | None) -> AssertionError:
    message = f"timed out after {timeout_s:g} s waiting for {what}"
    if detail is not None:
        message += "\n" + detail()
    return AssertionError(message)


async def eventually(
    check: Callable[[], bool],
    what: str,
    *,
    timeout_s: float = 10.0,
    every_s: float = 0.02,
    detail: Callable[[], str] | None = None,
) -> None:
    """Await ``check()`` becoming true, polling every ``every_s``, for at most ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            while not check():  # noqa: ASYNC110 - for state that no event announces
                await asyncio.sleep(every_s)
    except TimeoutError:
        raise _timed_out(what, timeout_s, detail) from None


def eventually_sync(
    check: Callable[[], bool],
    what: str,
    *,
    timeout_s: float = 10.0,
    every_s: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> None:
    """Block until ``check()`` is true, polling every ``every_s``, for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout_s, detail)
        time.sleep(every_s)


def eventually_logged(
    text: str,
    read_log: Callable[[], str],
    proc: subprocess.Popen[bytes],
    who: str,
    *,
    timeout_s: float = 60.0,
) -> None:
    """Until ``read_log()`` holds ``text`` (a log file has no event to wait on); fails at once,
    with the log, when ``who``'s process ``proc`` exits first."""

    def logged() -> bool:
        if text in read_log():
            return True
        assert proc.poll() is None, f"{who} exited {proc.returncode}:\n{read_log()}"
        return False

    eventually_sync(
        logged, f"{who} to log {text!r}", timeout_s=timeout_s, detail=lambda: read_log()[-3000:]
    )
