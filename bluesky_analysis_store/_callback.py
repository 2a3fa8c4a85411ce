"""The live callback: subscribe it to the RunEngine and every scan gets a derived child run."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from ._errors import AnalysisStoreError
from ._handover import RunWaiter, Worker
from ._live_router import LiveRouter
from ._reduction import OnError, ReductionPlan

__all__ = ["AnalysisStoreCallback"]

logger = logging.getLogger(__name__)

Background = bool | Literal["process", "thread"]

# How often a foreground callback's store is flushed while the scan waits.
_FOREGROUND_FLUSH_SECONDS = 0.5


class AnalysisStoreCallback:
    """Reduce each raw run live and save the derived data as a child run in ``store``.

    ``RE.subscribe(AnalysisStoreCallback([my_reducer], store))``. ``reducers`` are plain
    functions of one event's data (applied to ``streams``) or :class:`Reducer` instances.
    Arrays they return are written to files (``writers`` maps a derived key to a format name,
    or to ``None`` to keep it inline; other numeric arrays go to HDF5) under ``root``, by
    default the store's asset folder; scalars go inline. ``md`` is added to every child
    start document.

    Where the work happens, ``background``:

    - ``True`` (or ``"process"``; the default): in a worker process, started now, so that
      reduction and saving run on another core and never hold the RunEngine's interpreter
      lock. The reducers and the store are sent to it (the store is opened again there);
      their log records come back and are logged here. If it ends unexpectedly, a new one
      starts with the next run.
    - ``"thread"``: on a worker thread of this process.
    - ``False``: on the RunEngine's thread, document by document.

    ``mode`` tells which of the three it is (``"process"``, ``"thread"`` or
    ``"foreground"``); ``worker_pid`` is the worker process's id.

    In the background modes the RunEngine only queues documents, at most ``queue_size`` of
    them holding at most ``queue_bytes`` of array data (one document always fits); when the
    queue is full the RunEngine waits (nothing is dropped). At a raw run's stop the RunEngine
    waits until the child run is saved, for at most ``stop_timeout`` seconds (None: as long
    as it takes).

    Failures never reach the RunEngine with ``on_error="record"``: they are logged with their
    traceback, counted and written into the child run's stop document. ``on_error="raise"``
    lets them propagate (for tests, with ``background=False``).
    """

    def __init__(
        self,
        reducers: Iterable[Any] | Any,
        store: Any,
        *,
        streams: Iterable[str] = ("primary",),
        writers: Mapping[str, str | None] | None = None,
        root: str | None = None,
        md: Mapping[str, Any] | None = None,
        background: Background = True,
        on_error: OnError = "record",
        strict: bool = True,
        queue_size: int = 1000,
        queue_bytes: int = 256 * 2**20,
        stop_timeout: float | None = None,
        root_map: Mapping[str, str] | None = None,
    ) -> None:
        self.mode = _mode(background)
        if self.mode != "foreground" and on_error == "raise":
            # An error in the worker cannot reach the RunEngine; it would end the worker,
            # and the next raw stop would then wait for the child run in vain.
            raise AnalysisStoreError("on_error='raise' needs background=False")
        self.store = store
        self.plan = ReductionPlan.for_store(
            reducers,
            store,
            streams=streams,
            writers=writers,
            root=root,
            md=md,
            on_error=on_error,
            strict=strict,
            root_map=root_map,
        )
        self.stop_timeout = stop_timeout
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self._closed = False
        self._worker: Worker | None = None
        self._router: LiveRouter | None = None
        if self.mode == "process":
            from ._worker_process import ProcessWorker

            self._worker = ProcessWorker(
                self.plan, store, queue_size=queue_size, queue_bytes=queue_bytes
            )
        elif self.mode == "thread":
            from ._worker_thread import ThreadWorker

            self._worker = ThreadWorker(
                self.plan, store, queue_size=queue_size, queue_bytes=queue_bytes
            )
        else:
            # The foreground delivers on a thread of its own too: waiting at a stop is the
            # same wait for the child run as in the background modes.
            self._foreground_runs = RunWaiter()
            self._router = LiveRouter(
                self.plan, store, on_run_finished=self._foreground_runs.finished
            )
            # In the foreground nothing runs between documents: without this, rows written
            # while the scan waits (a long exposure, a sleep) would wait for the next one.
            threading.Thread(
                target=_flush_while_open,
                args=(weakref.ref(self),),
                name="analysis-store-flusher",
                daemon=True,
            ).start()

    @property
    def background(self) -> bool:
        return self._worker is not None

    @property
    def worker_pid(self) -> int | None:
        """The worker process's id (None unless the work happens in a worker process)."""
        return getattr(self._worker, "pid", None)

    @property
    def queued_documents(self) -> int:
        """Documents handed over and not yet taken by the worker (0 in the foreground)."""
        queue = getattr(self._worker, "queue", None)
        return len(queue) if queue is not None else 0

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if self._closed:
            logger.warning("the analysis callback is closed; %s document ignored", name)
            return
        if self._worker is None:
            assert self._router is not None
            if name == "start":
                self._foreground_runs.expect(doc["uid"])
            self._router(name, doc)
            if name == "stop":
                self._foreground_runs.wait(doc["run_start"], self.stop_timeout)
            return
        self._worker.submit(name, doc)
        if name == "stop" and not self._worker.wait_for_run(doc["run_start"], self.stop_timeout):
            logger.warning(
                "derived data of run %s is not saved yet (stop_timeout %s s, or the worker "
                "ended); the scan returns now",
                doc["run_start"],
                self.stop_timeout,
            )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every document handed over so far is reduced and saved.

        Returns False if ``timeout`` seconds passed first (or the worker ended).
        """
        if self._worker is not None:
            return self._worker.flush(timeout)
        assert self._router is not None
        return self._router.flush_store(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued work, then stop the worker. Runs still open stay unfinished."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self._worker.close(timeout)
        else:
            assert self._router is not None
            self._router.close(
                reason="interrupted: the analysis callback was closed before the raw run's stop",
                timeout=timeout,
            )

    def __enter__(self) -> AnalysisStoreCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mode(background: Background) -> str:
    # The worker process is handed its pipes' descriptors (pass_fds): POSIX only.
    if background is True:
        return "process" if os.name == "posix" else "thread"
    if background == "process":
        if os.name != "posix":
            raise AnalysisStoreError("background='process' needs a POSIX system; use 'thread'")
        return "process"
    if background == "thread":
        return "thread"
    if background is False:
        return "foreground"
    raise AnalysisStoreError(
        f"background must be True, False, 'process' or 'thread', not {background!r}"
    )


def _flush_while_open(callback_ref: weakref.ref[AnalysisStoreCallback]) -> None:
    """Flush a foreground callback's store every so often, until it is closed or gone."""
    while True:
        time.sleep(_FOREGROUND_FLUSH_SECONDS)
        callback = callback_ref()
        if callback is None or callback._closed:
            return
        try:
            getattr(callback.store, "flush", lambda: None)()
        except Exception:  # no scan to reach from here; the run's stop writes it again
            logger.exception("writing buffered derived data to the store failed")
        del callback
