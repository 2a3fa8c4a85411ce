"""Handing documents from the RunEngine's thread to a worker, and waiting for its results.

:class:`RunWaiter` knows which raw runs' child runs are still being made; a thread waits for
one with :meth:`RunWaiter.wait`, the RunEngine's event loop with :func:`wait_async`, which
polls instead of blocking so that the loop goes on serving everything else meanwhile.

:class:`DocumentQueue` is bounded twice, in documents and in bytes of array data: a count of
documents alone lets a queue of megapixel frames hold gigabytes while the reduction lags
behind the detector. When it is full the producer waits (nothing is dropped). The consumer
takes documents in batches: waking once per document of a fast scan costs ~30 us each, all
of it time the RunEngine's thread waits for.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "Abandoned",
    "ClosesOnce",
    "DocumentQueue",
    "RunWaiter",
    "Worker",
    "array_bytes",
    "close_at_exit",
    "unfinished_runs",
    "wait_async",
]

logger = logging.getLogger(__name__)

# The queue-full warning is repeated at most this often, not for every waiting document.
_WAIT_WARNING_SECONDS = 10.0
# How often a waiting thread checks that the worker it waits for is still there.
_ALIVE_CHECK_SECONDS = 1.0
# How often the event loop looks whether the runs it waits for are saved: often enough
# that a scan's return is not noticeably delayed, rarely enough to cost nothing.
_POLL_SECONDS = 0.02
# At interpreter exit, how long all callbacks together may take to finish their work.
EXIT_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Abandoned:
    """What closing left undone: documents never reduced, and raw runs whose child run
    was not finished (still open, or stopped but not saved in time)."""

    documents: int = 0
    runs: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.documents or self.runs)

    def __str__(self) -> str:
        return f"{self.documents} documents not reduced, {len(self.runs)} child runs unfinished"


def unfinished_runs(open_runs: Mapping[str, Any], pending: Iterable[str]) -> tuple[str, ...]:
    """Raw runs whose child run closing leaves unfinished: still open, or not yet saved."""
    return tuple(dict.fromkeys([*list(open_runs), *pending]))


class ClosesOnce:
    """``close`` for a worker: done once, by the first caller; a second caller (the exit
    hook while a collected callback's close runs) waits for the first, and what the first
    left undone is its to report. Subclasses set ``runs``, ``_queue`` and ``_open_runs``
    and implement ``_close``."""

    runs: RunWaiter
    _queue: DocumentQueue
    _open_runs: dict[str, None]

    def __init__(self) -> None:
        self._close_lock = threading.Lock()
        self._closed = False

    def close(self, timeout: float | None) -> Abandoned:
        if not self._close_lock.acquire(timeout=-1 if timeout is None else timeout):
            pending = unfinished_runs(self._open_runs, self.runs.pending())
            return Abandoned(len(self._queue), pending)
        try:
            if self._closed:
                return Abandoned()
            self._closed = True
            return self._close(timeout)
        finally:
            self._close_lock.release()

    def _close(self, timeout: float | None) -> Abandoned:
        raise NotImplementedError


class Worker(Protocol):
    """Where the callback's documents are reduced and saved, away from the RunEngine."""

    runs: RunWaiter

    def alive(self) -> bool:
        """Whether the documents handed over now will be reduced."""

    def submit(self, name: str, doc: dict[str, Any]) -> None:
        """Queue one document (waits while the queue is full)."""

    def wait_for_run(self, raw_uid: str, timeout: float | None) -> bool:
        """Wait until the child run of ``raw_uid`` is saved; False if ``timeout`` passed."""

    def set_forwarding(self, on: bool) -> None:
        """Whether the child documents are handed to the callback's live view."""

    def flush(self, timeout: float | None) -> bool:
        """Wait until everything queued so far is saved; False if ``timeout`` passed."""

    def close(self, timeout: float | None) -> Abandoned:
        """Finish the queued work (within ``timeout``) and stop; say what was left undone."""


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

    def snapshot(self) -> list[tuple[Any, int]]:
        """The items queued now (they stay queued)."""
        with self._changed:
            return list(self._items)

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
    """Which raw runs' child runs are still being made, and waiting for them.

    A run is expected from its start on. :meth:`finished` says its child run is saved (and
    forgets it); :meth:`abandon` says the worker that had it is gone, so it never will be.
    A run never expected has nothing to wait for.
    """

    def __init__(self) -> None:
        self._finished: dict[str, threading.Event] = {}
        self._lost: set[str] = set()
        self._lock = threading.Lock()

    def expect(self, raw_uid: str) -> None:
        with self._lock:
            self._finished.setdefault(raw_uid, threading.Event())
            self._lost.discard(raw_uid)

    def finished(self, raw_uid: str) -> None:
        with self._lock:
            event = self._finished.pop(raw_uid, None)
        if event is not None:
            event.set()

    def abandon(self) -> tuple[str, ...]:
        """Every run still expected is lost: wake its waiters. Returns those runs."""
        with self._lock:
            lost = dict(self._finished)
            self._finished.clear()
            self._lost.update(lost)
        for event in lost.values():
            event.set()
        return tuple(lost)

    def pending(self) -> tuple[str, ...]:
        """The runs expected and neither finished nor lost."""
        with self._lock:
            return tuple(self._finished)

    def outcome(self, raw_uid: str) -> bool | None:
        """True once the child run is saved (or nothing was expected), False if it is lost,
        None while it is still being made."""
        with self._lock:
            if raw_uid in self._finished:
                return None
            return raw_uid not in self._lost

    def wait(
        self,
        raw_uid: str,
        timeout: float | None,
        worker_alive: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Wait for ``raw_uid`` from a thread; False if ``timeout`` passed, the run was lost
        or the worker went away first."""
        with self._lock:
            event = self._finished.get(raw_uid)
        if event is not None:
            wait_while_alive(event, timeout, worker_alive)
        return self.outcome(raw_uid) is True


async def wait_async(
    runs: RunWaiter,
    raw_uids: Iterable[str],
    timeout: float | None,
    worker_alive: Callable[[], bool] = lambda: True,
) -> tuple[list[str], list[str]]:
    """Wait on the event loop, without blocking it, for the child runs of ``raw_uids``.

    Returns the runs lost (their worker went away) and those still being made when
    ``timeout`` passed. Cancelling it (a pause, an abort) just stops the waiting.
    """
    waiting = list(raw_uids)
    deadline = None if timeout is None else time.monotonic() + timeout
    lost: list[str] = []
    while waiting:
        outcomes = {uid: runs.outcome(uid) for uid in waiting}
        lost += [uid for uid, outcome in outcomes.items() if outcome is False]
        waiting = [uid for uid, outcome in outcomes.items() if outcome is None]
        if not waiting:
            break
        if not worker_alive():
            return lost + waiting, []
        if deadline is not None and time.monotonic() >= deadline:
            return lost, waiting
        step = _POLL_SECONDS
        if deadline is not None:
            step = max(0.0, min(step, deadline - time.monotonic()))
        await asyncio.sleep(step)
    return lost, []


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


# --- interpreter exit -------------------------------------------------------------------------

_exit_deadline: float | None = None


def close_at_exit(worker: Worker, what: str) -> None:
    """Close ``worker`` at interpreter exit (if it is still there), within the time left of
    :data:`EXIT_TIMEOUT_SECONDS` for all of them, and log what had to be left behind.

    It runs among threading's exit hooks, registered after the store's own (a tiled client
    closes its in-process server there), so that it runs first while the store still works;
    plain ``atexit`` hooks run only after those.
    """
    ref = weakref.ref(worker)

    def close() -> None:
        global _exit_deadline
        target = ref()
        if target is None:
            return
        if _exit_deadline is None:
            _exit_deadline = time.monotonic() + EXIT_TIMEOUT_SECONDS
        abandoned = target.close(max(0.0, _exit_deadline - time.monotonic()))
        if abandoned:
            logger.error(
                "at exit the analysis %s could not finish within %s s: %s (runs %s); that "
                "derived data is not saved",
                what,
                EXIT_TIMEOUT_SECONDS,
                abandoned,
                ", ".join(abandoned.runs) or "none",
            )

    at_threading_exit(close)


def at_threading_exit(hook: Callable[[], None]) -> None:
    """Run ``hook`` among threading's exit hooks (newest first, before the older ones that
    shut a tiled client's in-process server down), else with ``atexit``."""
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("no threading exit hooks")
        register(hook)
    except RuntimeError:  # already shutting down, or an interpreter without them
        import atexit

        atexit.register(hook)
