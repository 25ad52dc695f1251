"""A bounded queue with a named policy for when it is full, and a sentinel that is never dropped.

``DropPolicy.DROP_OLDEST`` (stream mode): a full queue discards its oldest item to take the new one, so
the consumer always gets the newest frames; every discarded item is counted.
``DropPolicy.BLOCK`` (trigger mode, results): the producer waits; nothing is ever discarded.

The producer ends the stream by ``close()`` (called from a ``finally``): consumers then drain what is
left and get :data:`STOP`.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class DropPolicy(str, enum.Enum):
    DROP_OLDEST = "drop_oldest"
    BLOCK = "block"


class _Stop:
    def __repr__(self) -> str:
        return "STOP"


STOP: Any = _Stop()


class BoundedQueue(Generic[T]):
    def __init__(self, maxsize: int, policy: DropPolicy, name: str = "queue",
                 on_drop: Callable[[T], None] | None = None):
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = int(maxsize)
        self.policy = DropPolicy(policy)
        self.name = name
        self._items: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._on_drop = on_drop
        self.put_count = 0
        self.dropped = 0
        self.high_water = 0

    def __len__(self) -> int:
        with self._cv:
            return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        """Add an item. BLOCK: waits for room (False on timeout, on ``cancel`` or once closed).
        DROP_OLDEST: never waits; a full queue discards (and counts) its oldest item."""
        dropped = None
        with self._cv:
            if self._closed:
                return False
            if self.policy is DropPolicy.BLOCK:
                deadline = None if timeout is None else time.monotonic() + timeout
                while len(self._items) >= self.maxsize and not self._closed:
                    if cancel is not None and cancel.is_set():
                        return False
                    wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                    if wait <= 0:
                        return False
                    self._cv.wait(wait)
                if self._closed:
                    return False
            elif len(self._items) >= self.maxsize:
                dropped = self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self.put_count += 1
            self.high_water = max(self.high_water, len(self._items))
            self._cv.notify_all()
        if dropped is not None and self._on_drop is not None:
            self._on_drop(dropped)
        return True

    def close(self) -> None:
        """No more items will come: consumers drain what is left, then get STOP."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def get_batch(self, max_items: int, timeout: float | None = None) -> list[T] | Any:
        """Wait for one item, then take up to ``max_items`` of those already waiting (no extra wait).

        Returns a non-empty list, ``[]`` on timeout, or STOP once the queue is closed and empty.
        """
        with self._cv:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._items:
                if self._closed:
                    return STOP
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    return []
                self._cv.wait(wait)
            n = min(max_items, len(self._items))
            out = [self._items.popleft() for _ in range(n)]
            self._cv.notify_all()
            return out

    def get(self, timeout: float | None = None) -> T | Any:
        got = self.get_batch(1, timeout)
        if got is STOP:
            return STOP
        return got[0] if got else None

    def drain_all(self) -> list[T]:
        """Remove and return everything waiting (used to count frames discarded at a bounded stop)."""
        with self._cv:
            out = list(self._items)
            self._items.clear()
            self._cv.notify_all()
            return out
