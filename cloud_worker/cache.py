"""A bounded map of escalation id -> the answer given, so a duplicate gets the same answer."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Generic, TypeVar

V = TypeVar("V")


class BoundedCache(Generic[V]):
    """Least-recently-used eviction once ``max_entries`` is reached (0 disables the cache)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, V] = OrderedDict()

    def get(self, key: str) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: V) -> None:
        if self.max_entries == 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def put_many(self, keys: Sequence[str], values: Sequence[V]) -> None:
        """``put`` each key with its value, in order."""
        if self.max_entries == 0:
            return
        items = self._items
        for key, value in zip(keys, values, strict=True):
            if key in items:
                items.move_to_end(key)
            items[key] = value
        for _ in range(len(items) - self.max_entries):
            items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
