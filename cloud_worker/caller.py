"""Calls one model's handler for one batch at a time, in the order the batches are handed in,
without the event loop between two calls (docs/adr/0035-worker-model-thread.md).

A plain-function handler runs on a thread of this model's own: a batch handed in while the
previous one is in the handler waits in that thread's queue and starts the moment the previous
call returns, so the model never idles waiting for the event loop to notice the end of a call
and hand over the next batch. A coroutine-function handler runs on the event loop, each call
after the previous one has finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from cloud_worker.handler import Batch, Handler, Verdict

T = TypeVar("T")


class HandlerCaller:
    """``submit`` batches in order; each call starts once the one before it has returned."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self._pool: ThreadPoolExecutor | None = None
        if not handler.is_async:
            self._pool = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"handler-{handler.model}"
            )
        self._last: asyncio.Future[Sequence[Verdict]] | None = None

    @property
    def threaded(self) -> bool:
        """The handler runs on a thread of its own (a plain function)."""
        return self._pool is not None

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the handler's thread, in order with the batches submitted (only for a
        :attr:`threaded` caller); ``fn`` may call :meth:`Handler.call_blocking` itself."""
        if self._pool is None:
            raise RuntimeError(f"the handler for {self.handler.model!r} runs on the event loop")
        return asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def submit(self, batch: Batch) -> asyncio.Future[Sequence[Verdict]]:
        """The handler's checked verdicts for ``batch`` (or its error), once its turn came."""
        loop = asyncio.get_running_loop()
        if self._pool is not None:
            return loop.run_in_executor(self._pool, self.handler.call_blocking, batch, loop)
        fut = asyncio.ensure_future(self._after(self._last, batch))
        self._last = fut
        return fut

    async def _after(
        self, previous: asyncio.Future[Sequence[Verdict]] | None, batch: Batch
    ) -> Sequence[Verdict]:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])  # its outcome is its submitter's business
        out = await self.handler.fn(batch)  # type: ignore[misc]
        return self.handler.checked(batch, out)

    def close(self) -> None:
        """Stop the thread once the calls already handed in are done (it is not waited for)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
