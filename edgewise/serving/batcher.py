"""Micro-batching: gather items until the batch is full or the oldest has waited long enough.

While one batch is being processed, new items keep arriving, so under load batches grow by
themselves (up to ``max_batch_size``) and the fixed wait only applies when traffic is light.
``wait_if`` limits the wait further: the oldest item waits only while it says so, and
:meth:`MicroBatcher.wake` ends a wait early (a cloud worker waits only while its model has a
batch in hand and wakes its batcher when the model is free, so an idle model takes a case at
once and cases that came while it was busy go together the moment it is free).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[None]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        wait_if: Callable[[], bool] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._wait_if = wait_if
        self._items: deque[T] = deque()
        self._first_at = 0.0
        self._nonempty = asyncio.Event()
        self._go = asyncio.Event()
        """Set when the batch should go before ``max_wait_s``: it is full, or :meth:`wake`."""
        self._idle = asyncio.Event()
        self._idle.set()
        self.batches = 0
        self.items = 0
        self.timeouts = 0
        """Batches that went because their oldest item had waited ``max_wait_s``."""

    def add(self, item: T) -> None:
        if not self._items:
            self._first_at = time.monotonic()
            self._nonempty.set()
        self._items.append(item)
        self._idle.clear()
        if len(self._items) >= self.max_batch_size:
            self._go.set()

    def add_many(self, items: list[T]) -> None:
        """``add`` each of ``items``, in order."""
        if not items:
            return
        if not self._items:
            self._first_at = time.monotonic()
            self._nonempty.set()
        self._items.extend(items)
        self._idle.clear()
        if len(self._items) >= self.max_batch_size:
            self._go.set()

    def __len__(self) -> int:
        return len(self._items)

    def wake(self) -> None:
        """End the current wait: the items gathered so far go now (the consumer is free)."""
        if self._items:
            self._go.set()

    async def wait_idle(self) -> None:
        """Return once every added item has been processed."""
        await self._idle.wait()

    async def run(self) -> None:
        while True:
            await self._nonempty.wait()
            if (
                len(self._items) < self.max_batch_size
                and self.max_wait_s > 0
                and (self._wait_if is None or self._wait_if())
            ):
                deadline = self._first_at + self.max_wait_s
                delay = deadline - time.monotonic()
                if delay > 0:
                    try:
                        async with asyncio.timeout(delay):
                            await self._go.wait()
                    except TimeoutError:
                        self.timeouts += 1
            n = min(len(self._items), self.max_batch_size)
            batch = [self._items.popleft() for _ in range(n)]
            if self._items:
                self._first_at = time.monotonic()
                if len(self._items) < self.max_batch_size:
                    self._go.clear()
            else:
                self._nonempty.clear()
                self._go.clear()
            self.batches += 1
            self.items += n
            await self._process(batch)
            if not self._items:
                self._idle.set()
