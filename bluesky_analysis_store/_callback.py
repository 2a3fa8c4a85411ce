"""The live callback: subscribe it to the RunEngine and every scan gets a derived child run."""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from event_model import RunRouter, UnresolvableForeignKeyError

from ._errors import AnalysisStoreError
from ._filling import RouterFiller
from ._reduction import OnError, ReductionPlan, RunReduction

__all__ = ["AnalysisStoreCallback"]

logger = logging.getLogger(__name__)

_STOP_WORKER = object()
# How long the worker waits for a document before flushing buffered rows to the store.
_IDLE_FLUSH_SECONDS = 0.1
# When the worker has caught up, it lets documents gather this long before it takes the
# next one: waking once per document of a fast scan costs ~30 us each (a third of reducing a
# scalar event), all of it GIL time the RunEngine waits for.
_GATHER_SECONDS = 0.02
# The queue-full warning is repeated at most this often, not for every waiting document.
_WAIT_WARNING_SECONDS = 10.0
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

    With ``background=True`` the reduction, the file writing and the saving happen on a
    worker thread behind a queue of at most ``queue_size`` documents holding at most
    ``queue_bytes`` of array data (one document always fits); when it is full the RunEngine
    waits (nothing is dropped). At a raw run's stop the RunEngine waits until the child run
    is saved, for at most ``stop_timeout`` seconds (None: as long as it takes).

    Failures never reach the RunEngine with ``on_error="record"``: they are logged with their
    traceback, counted and written into the child run's stop document. ``on_error="raise"``
    lets them propagate (for tests, in foreground mode).
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
        background: bool = True,
        on_error: OnError = "record",
        strict: bool = True,
        queue_size: int = 1000,
        queue_bytes: int = 256 * 2**20,
        stop_timeout: float | None = None,
        root_map: Mapping[str, str] | None = None,
    ) -> None:
        if background and on_error == "raise":
            # An error on the worker thread cannot reach the RunEngine; it would end the
            # worker, and the next raw stop would then wait for the child run forever.
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
        self.background = background
        self.stop_timeout = stop_timeout
        self._router = RunRouter([self._factory], filler_class=RouterFiller)
        self._runs: dict[str, RunReduction] = {}
        self._finished: dict[str, threading.Event] = {}
        self._unknown_runs_logged: set[str] = set()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        # Bytes of array data in the queue: a count of documents alone lets a queue of
        # megapixel frames hold gigabytes while the reduction lags behind the detector.
        self.queue_bytes = queue_bytes
        self._queued_bytes = 0
        self._bytes_freed = threading.Condition()
        self._last_wait_warning = -_WAIT_WARNING_SECONDS
        self._worker: threading.Thread | None = None
        self._closed = False
        if background:
            self._worker = threading.Thread(
                target=self._work, name="analysis-store-worker", daemon=True
            )
            self._worker.start()
        else:
            # In the foreground nothing runs between documents: without this, rows written
            # while the scan waits (a long exposure, a sleep) would wait for the next one.
            threading.Thread(
                target=_flush_while_open,
                args=(weakref.ref(self),),
                name="analysis-store-flusher",
                daemon=True,
            ).start()

    # --- the RunEngine side ------------------------------------------------------------

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if self._closed:
            logger.warning("the analysis callback is closed; %s document ignored", name)
            return
        if not self.background:
            self._process(name, doc)
            return
        if name == "start":
            self._finished[doc["uid"]] = threading.Event()
        size = _array_bytes(doc) if name in ("event", "event_page") else 0
        if size:
            self._reserve_bytes(size)
        try:
            self._queue.put_nowait((name, doc, size))
        except queue.Full:
            self._warn_waiting(f"{self._queue.maxsize} documents")
            self._put_while_worker_alive((name, doc, size))
        if name == "stop":
            self._wait_for_run(doc["run_start"])

    def _put_while_worker_alive(self, item: Any) -> None:
        while self._worker is not None and self._worker.is_alive():
            try:
                self._queue.put(item, timeout=1.0)
                return
            except queue.Full:
                continue
        logger.error("the analysis worker is not running; a document was dropped")

    def _reserve_bytes(self, size: int) -> None:
        """Wait until ``size`` more bytes fit in the queue (always, when it is empty)."""
        with self._bytes_freed:
            while self._queued_bytes and self._queued_bytes + size > self.queue_bytes:
                if self._worker is None or not self._worker.is_alive():
                    break
                self._warn_waiting(f"{self.queue_bytes / 2**20:.0f} MiB of arrays")
                self._bytes_freed.wait(timeout=1.0)
            self._queued_bytes += size

    def _release_bytes(self, size: int) -> None:
        with self._bytes_freed:
            self._queued_bytes -= size
            self._bytes_freed.notify_all()

    def _warn_waiting(self, limit: str) -> None:
        now = time.monotonic()
        if now - self._last_wait_warning >= _WAIT_WARNING_SECONDS:
            self._last_wait_warning = now
            logger.warning("analysis queue full (%s): the scan waits for the reduction", limit)

    def _wait_for_run(self, raw_uid: str) -> None:
        finished = self._finished.get(raw_uid)
        if finished is None:
            return
        if not finished.wait(self.stop_timeout):
            logger.warning(
                "derived data of run %s is still being saved after %s s; the scan returns now",
                raw_uid,
                self.stop_timeout,
            )
        self._finished.pop(raw_uid, None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every document handed over so far is reduced and saved.

        Returns False if ``timeout`` seconds passed first.
        """
        if self.background and self._worker is not None and self._worker.is_alive():
            deadline = None if timeout is None else time.monotonic() + timeout
            done = threading.Event()
            self._put_while_worker_alive(done)
            if not done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                return False
        self._flush_store()
        return True

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued work, then stop the worker. Runs still open stay unfinished."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        if self._worker is not None:
            self._put_while_worker_alive(_STOP_WORKER)
            self._worker.join(timeout)

    def __enter__(self) -> AnalysisStoreCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the worker side ---------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=_IDLE_FLUSH_SECONDS)
            except queue.Empty:
                self._flush_store()
                continue
            if item is _STOP_WORKER:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            name, doc, size = item
            try:
                self._process(name, doc)
            finally:
                if size:
                    self._release_bytes(size)
            if self._queue.empty():
                time.sleep(_GATHER_SECONDS)

    def _process(self, name: str, doc: dict[str, Any]) -> None:
        try:
            self._router(name, doc)
        except (KeyError, UnresolvableForeignKeyError) as error:
            if any(run.raised is error for run in self._runs.values()):
                raise  # a reducer's own KeyError (on_error="raise"), not an unknown run
            # A document of a run whose start this callback never saw (subscribed mid-run).
            key = str(error)
            if key not in self._unknown_runs_logged:
                self._unknown_runs_logged.add(key)
                logger.warning("%s document of a run whose start was not seen is ignored", name)
        except Exception:
            if self.plan.on_error == "raise":
                raise
            logger.exception("the analysis callback failed on a %s document", name)
        if name == "stop":
            run = self._runs.pop(doc["run_start"], None)
            finished = self._finished.get(doc["run_start"])
            if finished is not None:
                finished.set()
            if run is not None and not run.done:
                logger.error("child run of %s was not completed", doc["run_start"])

    def _flush_store(self) -> None:
        flush = getattr(self.store, "flush", None)
        if flush is None:
            return
        try:
            flush()
        except Exception:
            if self.plan.on_error == "raise":
                raise
            logger.exception("writing buffered derived data to the store failed")

    def _factory(self, name: str, start: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        run = RunReduction(self.plan, self.store)
        self._runs[start["uid"]] = run
        return [run], []


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


def _array_bytes(doc: Mapping[str, Any]) -> int:
    """Bytes of the arrays in an event's (or event page's) data."""
    total = 0
    for value in doc.get("data", {}).values():
        if isinstance(value, list):  # an event page: one value per event
            total += sum(getattr(v, "nbytes", 0) for v in value)
        else:
            total += getattr(value, "nbytes", 0)
    return total
