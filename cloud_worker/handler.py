"""The handler API: a typed function that answers a batch of escalations for one model.

A handler takes a :class:`Batch` (the inputs stacked into one array, and the escalated cases they
came from, each a :class:`~schemas.Escalation`; cases of several escalation messages may share a
batch) and returns one :class:`Verdict` per input, in order: a list of them, or a
:class:`Verdicts` (the same sequence held as two arrays, which spares building one object per
input; the built-in ONNX Runtime handler returns one). It may be a plain function (run on a
thread of its own per model, so it may block: a model call, an HTTP request) or a coroutine
function (run on the event loop). Either way it is called for one batch at a time per model,
in order. Everything else, subscription, batching, replies, idempotency and the hard-example
store, is the worker's job.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union, overload

import numpy as np
import numpy.typing as npt

from cloud_worker.errors import HandlerError
from schemas import Escalation


@dataclass(frozen=True, slots=True)
class Verdict:
    label: int
    confidence: float


class Verdicts(Sequence[Verdict]):
    """One verdict per input as two arrays: ``labels`` (integers) and ``confidences`` (floats,
    NaN where the model gave none), both ``[N]``. A sequence of :class:`Verdict`; the worker
    reads the arrays directly."""

    __slots__ = ("confidences", "labels")

    def __init__(self, labels: npt.ArrayLike, confidences: npt.ArrayLike) -> None:
        self.labels: npt.NDArray[np.int64] = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.confidences: npt.NDArray[np.float64] = np.asarray(
            confidences, dtype=np.float64
        ).reshape(-1)
        if len(self.labels) != len(self.confidences):
            raise ValueError(
                f"{len(self.labels)} labels and {len(self.confidences)} confidences differ"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @overload
    def __getitem__(self, i: int) -> Verdict: ...
    @overload
    def __getitem__(self, i: slice) -> Verdicts: ...
    def __getitem__(self, i: int | slice) -> Verdict | Verdicts:
        if isinstance(i, slice):
            return Verdicts(self.labels[i], self.confidences[i])
        return Verdict(int(self.labels[i]), float(self.confidences[i]))

    def __iter__(self) -> Iterator[Verdict]:
        for label, confidence in zip(self.labels.tolist(), self.confidences.tolist(), strict=True):
            yield Verdict(label, confidence)

    def __repr__(self) -> str:
        return f"Verdicts(labels={self.labels!r}, confidences={self.confidences!r})"


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

    @property
    def is_async(self) -> bool:
        """A coroutine function: called on the event loop, not on a thread."""
        return inspect.iscoroutinefunction(self.fn)

    async def __call__(self, batch: Batch) -> list[Verdict]:
        if self.is_async:
            out = await self.fn(batch)  # type: ignore[misc]
        else:
            out = await asyncio.to_thread(self.fn, batch)
            if inspect.isawaitable(out):
                out = await out
        return list(self.checked(batch, out))

    def call_blocking(self, batch: Batch, loop: asyncio.AbstractEventLoop) -> Sequence[Verdict]:
        """Call a plain-function handler from a thread that is not ``loop``'s; an awaitable it
        returns is awaited on ``loop`` (this thread waits for it)."""
        out: Any = self.fn(batch)
        if inspect.isawaitable(out):
            out = asyncio.run_coroutine_threadsafe(_awaited(out), loop).result()
        return self.checked(batch, out)

    def checked(self, batch: Batch, out: Sequence[Verdict]) -> Sequence[Verdict]:
        """``out`` as a sequence of one verdict per input (raises :class:`HandlerError`)."""
        verdicts = out if isinstance(out, Verdicts) else list(out)
        if len(verdicts) != len(batch):
            raise HandlerError(
                f"handler for {self.model!r} returned {len(verdicts)} verdicts for"
                f" {len(batch)} inputs"
            )
        return verdicts


async def _awaited(value: Awaitable[Any]) -> Any:
    return await value
