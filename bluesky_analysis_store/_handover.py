"""Handing documents from the RunEngine's thread to a worker, and waiting for its results.

:class:`DocumentQueue` is bounded twice, in documents and in bytes of array data: a count of
documents alone lets a queue of megapixel frames hold gigabytes while the reduction lags
behind the detector. When it is full the producer waits (nothing is dropped). The consumer
takes documents in batches: waking once per document of a fast scan costs ~30 us each, all
of it time the RunEngine's thread waits for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

__all__ = ["DocumentQueue", "RunWaiter", "Worker", "array_bytes"]

logger = logging.getLogger(__name__)

# The queue-full warning is repeated at most this often, not for every waiting document.
_WAIT_WARNING_SECONDS = 10.0
# How often a waiting thread checks that the worker it waits for is still there.
_ALIVE_CHECK_SECONDS = 1.0


class Worker(Protocol):
    """Where the callback's documents are reduced and saved, away from the RunEngine."""

    def submit(self, name: str, doc: dict[str, Any]) -> None:
        """Queue one document (waits while the queue is full)."""

    def wait_for_run(self, raw_uid: str, timeout: float | None) -> bool:
        """Wait until the child run of ``raw_uid`` is saved; False if ``timeout`` passed."""

    def flush(self, timeout: float | None) -> bool:
        """Wait until everything queued so far is saved; False if ``timeout`` passed."""

    def close(self, timeout: float | None) -> None:
        """Finish the queued work and stop."""


class DocumentQueue:
    """A FIFO of ``(item, size)`` bounded in items and in the bytes they hold.

    ``size`` bytes stay reserved until the consumer calls :meth:`done` for them, so the
    bound covers documents being worked on as well as those waiting. One item always fits.
    """

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: deque[tuple[Any, int]] = deque()
        self._bytes = 0
        self._changed = threading.Condition()
        self._urgent = False
        self._consumer_idle = False
        self._last_wait_warning = -_WAIT_WARNING_SECONDS

    def put(
        self,
        item: Any,
        size: int = 0,
        *,
        urgent: bool = False,
        consumer_alive: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Append ``item``, waiting for room; False (not queued) if the consumer is gone.

        ``urgent`` items end the consumer's gathering at once: someone waits for them.
        """
        with self._changed:
            while self._is_full(size):
                if not consumer_alive():
                    return False
                self._warn_waiting(size)
                self._changed.wait(_ALIVE_CHECK_SECONDS)
            self._items.append((item, size))
            self._bytes += size
            self._urgent = self._urgent or urgent
            if self._consumer_idle or urgent:
                self._changed.notify_all()
        return True

    def get_batch(
        self, timeout: float | None, gather: float, max_bytes: int | None = None
    ) -> list[tuple[Any, int]]:
        """The items queued, after waiting up to ``timeout`` for a first item (an empty list
        if none came) and then ``gather`` seconds for more, unless one is urgent.

        With ``max_bytes`` the batch stops before the item that would take it over (it
        always holds one); the rest stays queued.
        """
        with self._changed:
            if not self._items:
                self._consumer_idle = True
                try:
                    self._changed.wait(timeout)
                finally:
                    self._consumer_idle = False
                if not self._items:
                    return []
            if gather > 0 and not self._urgent:
                self._changed.wait(gather)  # put() wakes it only for an urgent item
            if max_bytes is None:
                batch = list(self._items)
                self._items.clear()
            else:
                batch = [self._items.popleft()]
                total = batch[0][1]
                while self._items and total + self._items[0][1] <= max_bytes:
                    total += self._items[0][1]
                    batch.append(self._items.popleft())
            if not self._items:
                self._urgent = False
            self._changed.notify_all()  # producers waiting for room
            return batch

    def done(self, size: int) -> None:
        """Release ``size`` bytes of items the consumer has finished with."""
        if not size:
            return
        with self._changed:
            self._bytes -= size
            self._changed.notify_all()

    def __len__(self) -> int:
        return len(self._items)

    def _is_full(self, size: int) -> bool:
        if len(self._items) >= self.max_items:
            return True
        return bool(size and self._bytes and self._bytes + size > self.max_bytes)

    def _warn_waiting(self, size: int) -> None:
        now = time.monotonic()
        if now - self._last_wait_warning < _WAIT_WARNING_SECONDS:
            return
        self._last_wait_warning = now
        if len(self._items) >= self.max_items:
            limit = f"{self.max_items} documents"
        else:
            limit = f"{self.max_bytes / 2**20:.0f} MiB of arrays"
        logger.warning("analysis queue full (%s): the scan waits for the reduction", limit)


class RunWaiter:
    """Lets the RunEngine's thread wait for the child run of a raw run to be saved."""

    def __init__(self) -> None:
        self._finished: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def expect(self, raw_uid: str) -> None:
        with self._lock:
            self._finished.setdefault(raw_uid, threading.Event())

    def finished(self, raw_uid: str) -> None:
        with self._lock:
            event = self._finished.get(raw_uid)
        if event is not None:
            event.set()

    def wait(
        self,
        raw_uid: str,
        timeout: float | None,
        worker_alive: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Wait for ``raw_uid`` (forgotten afterwards); False if ``timeout`` passed or the
        worker went away first."""
        with self._lock:
            event = self._finished.get(raw_uid)
        if event is None:
            return True
        try:
            return wait_while_alive(event, timeout, worker_alive)
        finally:
            with self._lock:
                self._finished.pop(raw_uid, None)


def wait_while_alive(
    event: threading.Event, timeout: float | None, worker_alive: Callable[[], bool]
) -> bool:
    """Wait for ``event``; give up early if the worker that would set it is gone.

    Returns whether ``event`` was set.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = _ALIVE_CHECK_SECONDS
        if deadline is not None:
            step = min(step, deadline - time.monotonic())
            if step <= 0:
                return event.is_set()
        if event.wait(step):
            return True
        if not worker_alive():
            return event.is_set()


def array_bytes(doc: Mapping[str, Any]) -> int:
    """Bytes of the arrays in an event's (or event page's) data."""
    total = 0
    for value in doc.get("data", {}).values():
        if isinstance(value, list):  # an event page: one value per event
            total += sum(getattr(v, "nbytes", 0) for v in value)
        else:
            total += getattr(value, "nbytes", 0)
    return total
