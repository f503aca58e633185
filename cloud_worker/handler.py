"""The handler API: a typed function that answers a batch of escalations for one model.

A handler takes a :class:`Batch` (the inputs stacked into one array, and the escalated cases they
came from, each a :class:`~schemas.Escalation`; cases of several escalation messages may share a
batch) and returns one :class:`Verdict` per input, in order. It may be a plain function (run
on a worker thread, so it may block: a model call, an HTTP request) or a coroutine function (run
on the event loop). Everything else, subscription, batching, replies, idempotency and the
hard-example store, is the worker's job.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from cloud_worker.errors import HandlerError
from schemas import Escalation


@dataclass(frozen=True, slots=True)
class Verdict:
    label: int
    confidence: float


@dataclass(frozen=True, slots=True)
class Batch:
    model: str
    inputs: np.ndarray
    """``[N, *sample shape]``: every input of the batch (they share dtype and shape)."""
    escalations: list[Escalation]

    def __len__(self) -> int:
        return len(self.escalations)


HandlerFn = Callable[[Batch], Union[Sequence[Verdict], Awaitable[Sequence[Verdict]]]]  # noqa: UP007


@dataclass(frozen=True, slots=True)
class Handler:
    model: str
    version: str
    """Recorded with every answer (``Reply.model``, the store's ``cloud_model``)."""
    fn: HandlerFn

    async def __call__(self, batch: Batch) -> list[Verdict]:
        if inspect.iscoroutinefunction(self.fn):
            out = await self.fn(batch)
        else:
            out = await asyncio.to_thread(self.fn, batch)
            if inspect.isawaitable(out):
                out = await out
        verdicts = list(out)
        if len(verdicts) != len(batch):
            raise HandlerError(
                f"handler for {self.model!r} returned {len(verdicts)} verdicts for"
                f" {len(batch)} inputs"
            )
        return verdicts
