"""asyncio front of an :class:`~edgewise.outbox.store.Outbox`: one dedicated thread, group commit.

The Outbox lives on ONE thread (``ThreadPoolExecutor(max_workers=1)``); every operation runs
there, in submission order. Appends that arrive while a transaction runs are coalesced into the
next single transaction (group commit), and so are deletes: each caller's ``await`` returns when
*its* records are durable, and many callers share one fsync.

Cancellation and SIGTERM: a transaction that has started is never cancelled half-way. The
executor future is shielded: if a caller is cancelled, its records that were already taken into
a transaction are still committed (its ids are just not returned); if the group-commit task
itself is cancelled (loop shutdown), the running transaction finishes on its thread and its
callers are still answered. Requests still queued when the task is cancelled are cancelled,
never half-written. :meth:`AsyncOutbox.aclose` waits for everything in flight, then checkpoints
and closes.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from edgewise.outbox.config import OutboxConfig
from edgewise.outbox.counters import OutboxStats
from edgewise.outbox.errors import OutboxError
from edgewise.outbox.record import Record, Stored
from edgewise.outbox.sizing import ROW_OVERHEAD, txn_bytes
from edgewise.outbox.store import Outbox

P = TypeVar("P")
R = TypeVar("R")
T = TypeVar("T")

_AppendItem = tuple[list[Record], list[tuple[str, str]]]


@dataclass(slots=True)
class _Request(Generic[P, R]):
    item: P
    size: int
    nbytes: int
    future: asyncio.Future[R]


class _GroupCommitter(Generic[P, R]):
    """Queues requests; one task turns everything queued into one transaction at a time."""

    def __init__(
        self,
        owner: AsyncOutbox,
        work: Callable[[list[P]], tuple[list[R], OutboxStats]],
        max_group: int,
        max_bytes: Callable[[], int],
    ) -> None:
        self._owner = owner
        self._work = work
        self._max_group = max_group
        self._max_bytes = max_bytes
        self._queue: deque[_Request[P, R]] = deque()
        self._task: asyncio.Task[None] | None = None
        self.groups = 0  # transactions started by this committer

    async def submit(self, item: P, size: int, nbytes: int = 0) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append(_Request(item, size, nbytes, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        return await future

    async def wait_idle(self) -> None:
        while self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    def _take(self) -> list[_Request[P, R]]:
        group: list[_Request[P, R]] = []
        size = nbytes = 0
        max_bytes = self._max_bytes()
        while self._queue and (
            not group
            or (
                size + self._queue[0].size <= self._max_group
                and nbytes + self._queue[0].nbytes <= max_bytes
            )
        ):
            request = self._queue.popleft()
            if request.future.done():  # its caller was cancelled before it was taken
                continue
            group.append(request)
            size += request.size
            nbytes += request.nbytes
        return group

    async def _run(self) -> None:
        while self._queue:
            group = self._take()
            if not group:
                continue
            self.groups += 1
            running = self._owner._submit(self._work, [r.item for r in group])
            try:
                results, stats = await asyncio.shield(running)
            except asyncio.CancelledError:
                # The transaction goes on in its thread; answer its callers when it is done.
                running.add_done_callback(functools.partial(self._settle, group))
                for request in self._queue:
                    request.future.cancel()
                self._queue.clear()
                raise
            except Exception as exc:
                self._fail(group, exc)
                continue
            self._resolve(group, results, stats)

    def _settle(
        self, group: list[_Request[P, R]], done: asyncio.Future[tuple[list[R], OutboxStats]]
    ) -> None:
        if done.cancelled():
            for request in group:
                request.future.cancel()
        elif (exc := done.exception()) is not None:
            self._fail(group, exc)
        else:
            self._resolve(group, *done.result())

    def _fail(self, group: list[_Request[P, R]], exc: BaseException) -> None:
        for request in group:
            if not request.future.done():
                request.future.set_exception(exc)

    def _resolve(self, group: list[_Request[P, R]], results: list[R], stats: OutboxStats) -> None:
        self._owner._stats = stats
        for request, result in zip(group, results, strict=True):
            if not request.future.done():
                request.future.set_result(result)


class AsyncOutbox:
    """An :class:`Outbox` for asyncio code: ``async with AsyncOutbox(config) as outbox: …``.

    ``max_group`` caps how many records (or ids) one coalesced transaction takes, and
    :attr:`max_txn_bytes` how many bytes of records, so that one transaction's WAL frames fit
    the WAL allowance; a single larger call still goes in one transaction of its own (split it
    with :attr:`max_txn_bytes` where atomicity is not needed).
    """

    def __init__(
        self, config: OutboxConfig, *, max_group: int = 4096, count_evicted_topics: bool = False
    ) -> None:
        if max_group < 1:
            raise ValueError("max_group must be >= 1")
        self._config = config
        self._count_topics = count_evicted_topics
        self._kinds = frozenset(config.eviction_order)
        self._executor: ThreadPoolExecutor | None = None
        self._outbox: Outbox | None = None
        self._protectors: list[Callable[[], AbstractSet[int]]] = []
        self._stats: OutboxStats | None = None
        self._inflight: set[asyncio.Future[Any]] = set()
        self._closed = False
        self._txn_bytes = txn_bytes(config.max_bytes)
        self._appender: _GroupCommitter[_AppendItem, list[int]] = _GroupCommitter(
            self, self._append_group, max_group, lambda: self.max_txn_bytes
        )
        self._deleter: _GroupCommitter[list[int], int] = _GroupCommitter(
            self, self._delete_group, max_group, lambda: 1 << 62
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Open the outbox on its own thread (see :meth:`Outbox.open` for what can go wrong)."""
        if self._executor is not None:
            raise OutboxError("AsyncOutbox is already open (or was closed)")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        try:
            self._outbox = await self._submit(Outbox.open, self._config)
            self._outbox.protect(self._protected)
            if self._count_topics:
                self._outbox.count_evicted_topics()
            self._stats = await self._submit(self._outbox.stats)
        except BaseException:
            self._closed = True
            self._executor.shutdown(wait=False)
            raise

    async def aclose(self) -> None:
        """Wait for queued and running transactions, then checkpoint and close. Idempotent."""
        if self._closed or self._executor is None:
            return
        self._closed = True
        await self._appender.wait_idle()
        await self._deleter.wait_idle()
        if self._inflight:
            await asyncio.wait(set(self._inflight))
        try:
            if self._outbox is not None:
                outbox = self._outbox
                self._stats = await self._submit(outbox.stats)
                await self._submit(outbox.close)
        finally:
            self._executor.shutdown(wait=True)

    # -- the API -----------------------------------------------------------------------------

    def protect(self, unsettled: Callable[[], AbstractSet[int]]) -> None:
        """Add ids eviction must skip (see :meth:`Outbox.protect`): each forwarder of this
        outbox adds its own; may be called before opening."""
        self._protectors.append(unsettled)
        if self._outbox is not None:
            self._outbox.protect(self._protected)

    def _protected(self) -> AbstractSet[int]:
        """On the outbox's thread: the union of every protector's snapshot."""
        if len(self._protectors) == 1:
            return self._protectors[0]()
        return frozenset().union(*(p() for p in self._protectors))

    @property
    def max_txn_bytes(self) -> int:
        """Bytes of records one transaction should take: :func:`edgewise.outbox.sizing.txn_bytes`
        of the bound, less on a volume with little free space (ADR 0075)."""
        if self._outbox is None:
            return self._txn_bytes
        return self._outbox.txn_bytes_now

    @property
    def recovered_from(self) -> Path | None:
        return None if self._outbox is None else self._outbox.recovered_from

    async def append(
        self, records: Sequence[Record], answered: Sequence[tuple[str, str]] = ()
    ) -> list[int]:
        """Append durably; returns one id per record once they are committed (group commit)."""
        self._check_open()
        batch = list(records)
        for record in batch:
            if record.kind not in self._kinds:
                raise ValueError(
                    f"record kind {record.kind!r} is not in eviction_order "
                    f"{self._config.eviction_order}"
                )
        pairs = list(answered)
        # What the records cost in the WAL, roughly (the outbox's own accounting is exact).
        nbytes = sum(len(r.topic) + len(r.payload) + ROW_OVERHEAD for r in batch)
        nbytes += sum(len(k) + len(v) for k, v in pairs) * 2
        return await self._appender.submit((batch, pairs), max(len(batch), len(pairs), 1), nbytes)

    async def delete(self, ids: Iterable[int]) -> int:
        """Delete these ids (coalesced with concurrent deletes); returns how many existed."""
        self._check_open()
        wanted = list(dict.fromkeys(int(i) for i in ids))
        if not wanted:
            return 0
        return await self._deleter.submit(wanted, len(wanted))

    async def pending(
        self,
        limit: int,
        after_id: int = 0,
        *,
        kinds: AbstractSet[str] | None = None,
        exclude: AbstractSet[str] | None = None,
    ) -> list[Stored]:
        outbox = self._check_open()
        return await self._submit(
            functools.partial(outbox.pending, kinds=kinds, exclude=exclude), limit, after_id
        )

    async def records(self, ids: Iterable[int]) -> list[Stored]:
        """The records with these ids still stored (see :meth:`Outbox.records`)."""
        outbox = self._check_open()
        return await self._submit(outbox.records, list(ids))

    async def take_evicted_topics(self) -> Counter[str]:
        """Evicted records per topic since the last call (needs ``count_evicted_topics``)."""
        outbox = self._check_open()
        return await self._submit(outbox.take_evicted_topics)

    async def answered(self, frame_key: str) -> str | None:
        outbox = self._check_open()
        return await self._submit(outbox.answered, frame_key)

    async def answered_many(self, frame_keys: Sequence[str]) -> dict[str, str]:
        """One look-up for many keys: the result ids of those already answered."""
        outbox = self._check_open()
        return await self._submit(outbox.answered_many, list(frame_keys))

    async def answered_keys(self) -> list[str]:
        outbox = self._check_open()
        return await self._submit(outbox.answered_keys)

    def stats(self) -> OutboxStats:
        """The snapshot taken after the last operation (no thread hop)."""
        if self._stats is None:
            raise OutboxError("AsyncOutbox is not open")
        return self._stats

    @property
    def append_groups(self) -> int:
        """Append transactions started (each coalescing one or more ``append`` calls)."""
        return self._appender.groups

    @property
    def delete_groups(self) -> int:
        """Delete transactions started (each coalescing one or more ``delete`` calls)."""
        return self._deleter.groups

    # -- on the outbox thread ----------------------------------------------------------------

    def _append_group(self, items: list[_AppendItem]) -> tuple[list[list[int]], OutboxStats]:
        outbox = self._require()
        records = [record for batch, _ in items for record in batch]
        answered = [pair for _, pairs in items for pair in pairs]
        ids = outbox.append(records, answered)
        split: list[list[int]] = []
        start = 0
        for batch, _ in items:
            split.append(ids[start : start + len(batch)])
            start += len(batch)
        return split, outbox.stats()

    def _delete_group(self, items: list[list[int]]) -> tuple[list[int], OutboxStats]:
        outbox = self._require()
        deleted = set(outbox.delete_returning(i for ids in items for i in ids))
        return [sum(1 for i in ids if i in deleted) for ids in items], outbox.stats()

    # -- plumbing ----------------------------------------------------------------------------

    def _require(self) -> Outbox:
        if self._outbox is None:
            raise OutboxError("AsyncOutbox is not open")
        return self._outbox

    def _check_open(self) -> Outbox:
        if self._closed:
            raise OutboxError("AsyncOutbox is closed")
        return self._require()

    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        if self._executor is None:
            raise OutboxError("AsyncOutbox is not open")
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        return future
