"""Cloud verdicts by input hash: a bounded LRU with a time to live."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


def input_key(model: str, release: int, tensor: np.ndarray) -> str:
    """What identifies an input for a model release: dtype, shape and bytes, hashed."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{model}\x00{release}\x00{tensor.dtype.str}\x00{tensor.shape}\x00".encode())
    h.update(np.ascontiguousarray(tensor).data)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class CloudVerdict:
    label: int
    confidence: float


class VerdictCache:
    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, CloudVerdict]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str, now: float | None = None) -> CloudVerdict | None:
        now = time.monotonic() if now is None else now
        item = self._items.get(key)
        if item is None or item[0] <= now:
            if item is not None:
                del self._items[key]
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[1]

    def put(self, key: str, verdict: CloudVerdict, now: float | None = None) -> None:
        if self.max_entries == 0:
            return
        now = time.monotonic() if now is None else now
        self._items[key] = (now + self.ttl_s, verdict)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
