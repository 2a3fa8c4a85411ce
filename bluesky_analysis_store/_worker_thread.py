"""A worker thread in the RunEngine's process: the callback's ``background="thread"``.

Reducers and the store run beside the RunEngine and share the interpreter lock with it, so
Python-heavy work slows the scan; in exchange nothing is copied and the reducers and the
store are the very objects the callback was given.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ._handover import (
    Abandoned,
    ClosesOnce,
    DocumentQueue,
    RunWaiter,
    array_bytes,
    close_at_exit,
    unfinished_runs,
    wait_while_alive,
)
from ._live_router import LiveRouter
from ._live_view import LiveView, finished_through
from ._reduction import ReductionPlan

__all__ = ["ThreadWorker"]

logger = logging.getLogger(__name__)

# How long the worker waits for a document before flushing buffered rows to the store.
IDLE_FLUSH_SECONDS = 0.1
# When the worker has caught up, it lets documents gather this long before taking them.
GATHER_SECONDS = 0.02

_STOP = object()


class ThreadWorker(ClosesOnce):
    """Reduces on a daemon thread; closed at interpreter exit (see :func:`close_at_exit`),
    since a daemon thread is otherwise stopped wherever it happens to be."""

    def __init__(
        self,
        plan: ReductionPlan,
        store: Any,
        *,
        queue_size: int,
        queue_bytes: int,
        view: LiveView | None = None,
    ):
        super().__init__()
        self.runs = RunWaiter()
        self._view = view
        self._router = LiveRouter(
            plan, store, on_run_finished=finished_through(view, self.runs.finished)
        )
        self._queue = DocumentQueue(queue_size, queue_bytes)
        self._open_runs: dict[str, None] = {}  # started, not stopped: closing leaves them
        self._thread = threading.Thread(
            target=self._work, name="analysis-store-worker", daemon=True
        )
        self._thread.start()
        close_at_exit(self, "worker thread")

    @property
    def queue(self) -> DocumentQueue:
        return self._queue

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            self.runs.expect(doc["uid"])
            self._open_runs[doc["uid"]] = None
        elif name == "stop":
            self._open_runs.pop(doc["run_start"], None)
        size = array_bytes(doc) if name in ("event", "event_page") else 0
        self._put((name, doc), size, urgent=name == "stop")

    def wait_for_run(self, raw_uid: str, timeout: float | None) -> bool:
        return self.runs.wait(raw_uid, timeout, self.alive)

    def set_forwarding(self, on: bool) -> None:
        self._router.forward = self._view.child if on and self._view is not None else None

    def flush(self, timeout: float | None) -> bool:
        done = threading.Event()
        if not self._put(done, urgent=True):
            return False
        if not wait_while_alive(done, timeout, self.alive):
            return False
        return self._router.flush_store(timeout)

    def _close(self, timeout: float | None) -> Abandoned:
        deadline = None if timeout is None else time.monotonic() + timeout
        self.flush(timeout)
        self._put(_STOP, urgent=True)
        self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._view is not None:  # the runs it finished are told through the view
            self._view.drain(None if deadline is None else max(0.0, deadline - time.monotonic()))
        # What the thread did not get to (it may still be busy with a reducer that hangs).
        documents = sum(1 for item, _ in self._queue.snapshot() if isinstance(item, tuple))
        return Abandoned(documents, unfinished_runs(self._open_runs, self.runs.pending()))

    def _put(self, item: Any, size: int = 0, *, urgent: bool = False) -> bool:
        if not self._queue.put(item, size, urgent=urgent, consumer_alive=self.alive):
            logger.error("the analysis worker is not running; a document was dropped")
            return False
        return True

    def _work(self) -> None:
        try:
            while True:
                batch = self._queue.get_batch(IDLE_FLUSH_SECONDS, GATHER_SECONDS)
                for n, (item, size) in enumerate(batch):
                    try:
                        if item is _STOP:
                            self._queue.done(sum(s for _, s in batch[n + 1 :]))
                            return
                        if isinstance(item, threading.Event):
                            item.set()
                        else:
                            self._router(*item)
                    finally:
                        self._queue.done(size)
        finally:
            self._router.close(
                reason="interrupted: the analysis callback was closed before the raw run's stop",
                timeout=30.0,
            )
