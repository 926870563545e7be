"""A small time-to-live cache for what clients poll (job status, the leaderboard): hundreds of polls a second
then cost one database read per entry and TTL instead of one each. Staleness is bounded by the TTL."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Any

_MISSING = object()


class TTLCache:
    def __init__(self, ttl_s: float, max_entries: int = 10000):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._data: dict[Hashable, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, default=_MISSING):
        with self._lock:
            hit = self._data.get(key)
        if hit is None or time.monotonic() - hit[0] > self.ttl_s:
            return default
        return hit[1]

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            if len(self._data) >= self.max_entries:
                self._data.clear()
            self._data[key] = (time.monotonic(), value)

    def drop(self, key: Hashable) -> None:
        with self._lock:
            self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    MISSING = _MISSING
