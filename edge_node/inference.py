"""Run the model inline while calls are cheap, on a worker thread once they are not.

Handing a call to a thread and back costs about 200 µs on our 2-core machines, several times
what a small model costs (ONNX Runtime: 25-45 µs for the digits MLP; docs/benchmarks.md). A
slow model, though, must not hold the event loop that reads frames and acknowledges them. So
the runner keeps a moving average of the model's own time per call and switches, with
hysteresis: to the thread when the average passes ``thread_above_s``, back inline when it falls
under half of that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

A = TypeVar("A")
R = TypeVar("R")


class AdaptiveRunner(Generic[A, R]):
    def __init__(
        self,
        fn: Callable[[A], R],
        executor: Executor,
        *,
        thread_above_s: float = 0.001,
        smoothing: float = 0.2,
    ) -> None:
        self._fn = fn
        self._executor = executor
        self.thread_above_s = thread_above_s
        self._smoothing = smoothing
        self.average_s = 0.0
        self.on_thread = False
        self.calls = 0

    def _timed(self, arg: A) -> tuple[R, float]:
        start = time.perf_counter()
        out = self._fn(arg)
        return out, time.perf_counter() - start

    async def __call__(self, arg: A) -> R:
        if self.on_thread:
            loop = asyncio.get_running_loop()
            out, took = await loop.run_in_executor(self._executor, self._timed, arg)
        else:
            out, took = self._timed(arg)
        self._observe(took)
        return out

    def _observe(self, took_s: float) -> None:
        self.calls += 1
        if self.calls == 1:
            self.average_s = took_s
        else:
            self.average_s += self._smoothing * (took_s - self.average_s)
        if not self.on_thread and self.average_s > self.thread_above_s:
            self.on_thread = True
            log.info("model calls take %.2f ms: running them on a thread", self.average_s * 1e3)
        elif self.on_thread and self.average_s < self.thread_above_s / 2:
            self.on_thread = False
            log.info("model calls take %.2f ms: running them inline", self.average_s * 1e3)
