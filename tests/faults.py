"""Test-only fault injection: one exception raised from inside a real stage of a service.

A :class:`Fault` wraps the stage's own function (a module-level name, a class's method or one
object's attribute, swapped in with pytest's ``monkeypatch`` for one test, in-process): its
first call that ``when`` accepts raises :class:`InjectedFault`, every other call runs the real
function. Production code has no hook for it and runs unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest


class InjectedFault(RuntimeError):
    """What an injected fault raises: stands for any bug or unexpected failure in a stage."""


class Fault:
    def __init__(self, stage: str, when: Callable[..., bool] | None = None) -> None:
        self.stage = stage
        self.when = when
        self.fired = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def faulty(*args: Any, **kwargs: Any) -> Any:
            if not self.fired and (self.when is None or self.when(*args, **kwargs)):
                self.fired += 1
                raise InjectedFault(f"injected fault at {self.stage}")
            return fn(*args, **kwargs)

        return faulty

    def into(self, monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> None:
        """Swap ``target.name`` (a module, a class or an object) for its faulty twin."""
        monkeypatch.setattr(target, name, self.wrap(getattr(target, name)))
