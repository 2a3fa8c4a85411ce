"""The live callback: subscribe it to the RunEngine and every scan gets a derived child run."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from ._errors import AnalysisStoreError
from ._handover import Abandoned, RunWaiter, Worker, close_at_exit, wait_async
from ._live_router import LiveRouter
from ._live_view import LiveView, finished_through
from ._pending_writes import import_writer_in_background, make_imports_exit_safe
from ._plans import wait_for_derived_wrapper
from ._reduction import OnError, ReductionPlan
from ._run_summary import SUMMARY_LOGGER, show_summaries

__all__ = ["AnalysisStoreCallback"]

logger = logging.getLogger(__name__)

Background = bool | Literal["process", "thread"]

# How often a foreground callback's store is flushed while the scan waits.
_FOREGROUND_FLUSH_SECONDS = 0.5
# How long a callback that was dropped without close() may take to finish its work.
_COLLECTED_CLOSE_SECONDS = 60.0


class AnalysisStoreCallback:
    """Reduce each raw run live and save the derived data as a child run in ``store``.

    ``callback.subscribe(RE)`` (or ``RE.subscribe(callback)``, see below). ``reducers`` are
    plain functions of one event's data (applied to ``streams``) or :class:`Reducer`
    instances. Arrays they return are written to files (``writers`` maps a derived key to a
    format name, or to ``None`` to keep it inline; other numeric arrays go to HDF5) under
    ``root``, by default the store's asset folder; scalars go inline. ``md`` is added to
    every child start document.

    Where the work happens, ``background``:

    - ``True`` (or ``"process"``; the default): in a worker process, started now, so that
      reduction and saving run on another core and never hold the RunEngine's interpreter
      lock. It is forked from the user's fork server, which has imported what a worker
      needs (see ``_forkserver``); while none is up, it starts from scratch (seconds).
      The reducers and the store are sent to it (the store is opened again there); their
      log records come back and are logged here. If it ends unexpectedly (or cannot
      start), a new one is started after 1 s, 2 s, 4 s ... (at most 60 s); the child runs
      it had are closed as failed from their journals by the new one, and runs that start
      before the new one is up get no child run. ``memory_limit`` (bytes of resident
      memory) stops a worker that grows beyond it (a leaking reducer): its open child runs
      end with ``exit_status: "fail"`` and a reason saying so, and a new worker starts.
    - ``"thread"``: on a worker thread of this process.
    - ``False`` (foreground): on the RunEngine's event loop, document by document. Each
      event's reduction and saving then runs on the loop by design, between the plan's
      messages; choose a background mode for anything slower than a few milliseconds.

    ``mode`` tells which of the three it is (``"process"``, ``"thread"`` or
    ``"foreground"``); ``worker_pid`` is the worker process's id.

    In the background modes the callback only queues documents, at most ``queue_size`` of
    them holding at most ``queue_bytes`` of array data (one document always fits); when the
    queue is full the RunEngine waits (nothing is dropped, a warning says so): that is the
    only time it blocks the RunEngine's loop. It never waits at a raw run's stop.

    What ``RE(plan)`` returning guarantees:

    - After ``callback.subscribe(RE)`` (the callback plus the :func:`wait_for_derived_wrapper`
      preprocessor): for every raw run the plan closed, the child run is saved (complete,
      with its stop document), or its worker ended and it is known lost (logged as an
      error), or ``stop_timeout`` seconds passed (logged once as a warning; the derived data
      goes on being saved in the background). The plan waits through bluesky's
      ``wait_for`` message, so the RunEngine's loop runs meanwhile: Ctrl-C pauses the
      wait (``RE.resume()`` waits again, ``RE.abort()`` stops waiting).
    - After a plain ``RE.subscribe(callback)``: every document has been handed over, nothing
      more. The child run is being saved in the background; ``callback.flush()`` waits for
      it (blocking), ``yield from wait_for_derived(callback)`` in a plan waits on the loop,
      ``await callback.derived_saved()`` from asyncio code.

    The foreground mode is no different: there each event is reduced on the loop, but the
    child run's documents are delivered to the store on a thread of their own.

    Failures never reach the RunEngine with ``on_error="record"``: they are logged with their
    traceback, counted and written into the child run's stop document. ``on_error="raise"``
    lets them propagate (for tests, with ``background=False``).

    Live view: ``callback.subscribe(LivePlot("roi_total", "motor"))`` (any ``f(name, doc)``,
    e.g. bluesky's ``LiveTable`` or ``BestEffortCallback``) hands that subscriber the child
    runs' documents while they are made, in this process whatever ``background`` is, on a
    thread of the callback (never the RunEngine's), each event joined with the scalar
    readings of the raw event it came from (so the scan's motor is there for the x axis);
    file-backed derived keys are left out. See ``_live_view`` for the details; the documents
    saved in the store are unchanged.

    ``summary`` (default True): after each raw run's stop, once its child run is saved (or
    kept in its journal, or lost), one line says so on the ``bluesky_analysis_store.summary``
    logger, e.g. ``derived run 1a2b3c4d of scan 12 (raw 9f8e7d6c): 21 events reduced, 0
    failed; saved in ./analysis-store``; ``FAILED`` (every event failed), ``PARTLY FAILED``,
    ``NOT SAVED`` or ``LOST`` when it is not a success, logged at WARNING or ERROR then. The
    logger is set to INFO (unless a level was set for it) and prints to ``sys.stderr``
    while no logging handler of the session would show it. ``RE(plan)`` after
    :meth:`subscribe` returns after that line, and after the live subscribers were handed
    the whole child run.

    :meth:`close` finishes the queued work and stops the worker, returning what it had to
    leave undone. A callback dropped without ``close()`` is closed when it is collected; at
    interpreter exit every callback still open is closed within 60 s in all (whatever is
    left then is logged as an error).
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
        memory_limit: int | None = None,
        summary: bool = True,
    ) -> None:
        self.mode = _mode(background)
        if memory_limit is not None and self.mode != "process":
            raise AnalysisStoreError("memory_limit needs the worker process (background=True)")
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
        # Raw runs whose stop was handed over and whose child run is not known saved yet.
        self._stopped: dict[str, None] = {}
        self._late_reported: set[str] = set()
        self._said_starting = False
        self._open_runs: dict[str, None] = {}
        self._preprocessor: Any = None
        self._tokens: dict[int, int] = {}
        if summary:
            show_summaries(SUMMARY_LOGGER)
        self._view = LiveView(summary=summary)
        if self.mode == "process":
            from ._worker_process import ProcessWorker

            self._worker = ProcessWorker(
                self.plan,
                store,
                queue_size=queue_size,
                queue_bytes=queue_bytes,
                memory_limit=memory_limit,
                view=self._view,
            )
        elif self.mode == "thread":
            from ._worker_thread import ThreadWorker

            self._worker = ThreadWorker(
                self.plan, store, queue_size=queue_size, queue_bytes=queue_bytes, view=self._view
            )
        else:
            # The foreground delivers on a thread of its own too: waiting for the child run
            # is the same wait as in the background modes.
            self._foreground_runs = RunWaiter()
            self._router = LiveRouter(
                self.plan,
                store,
                on_run_finished=finished_through(self._view, self._foreground_runs.finished),
            )
            # In the foreground nothing runs between documents: without this, rows written
            # while the scan waits (a long exposure, a sleep) would wait for the next one.
            threading.Thread(
                target=_flush_while_open,
                args=(weakref.ref(self),),
                name="analysis-store-flusher",
                daemon=True,
            ).start()
        self._work: Any = self._worker or _Foreground(self._router, self._open_runs)
        if self._worker is None:
            close_at_exit(self._work, "callback")
            make_imports_exit_safe()  # the delivery thread imports the run writer
        # Neither this nor the worker's threads hold the callback: dropping it closes them.
        self._finalizer = weakref.finalize(self, _close_collected, self._work, self._view)
        self._finalizer.atexit = False  # close_at_exit's hooks see to that, earlier
        if self._worker is not None:
            # The session saves runs too (``RE.subscribe(store)``), and a thread worker
            # delivers from here: the run writer's imports (a second) start now, in the
            # background, so that the documents the store keeps until they are done
            # (_pending_writes) are written sooner.
            import_writer_in_background()

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
        if name == "start":
            self._open_runs[doc["uid"]] = None
        elif name == "stop":
            self._open_runs.pop(doc["run_start"], None)
        self._view.raw(name, doc)  # before its child documents can come
        if self._worker is None:
            assert self._router is not None
            if name == "start":
                self._foreground_runs.expect(doc["uid"])
            self._router(name, doc)
        else:
            self._worker.submit(name, doc)
        if name == "stop":
            # Not waited for here: this runs on the RunEngine's loop (see derived_saved).
            runs = self._runs
            for uid in [uid for uid in self._stopped if runs.outcome(uid) is not None]:
                del self._stopped[uid]
            self._stopped[doc["run_start"]] = None

    @property
    def _runs(self) -> RunWaiter:
        return self._foreground_runs if self._worker is None else self._worker.runs

    def _alive(self) -> bool:
        return self._worker is None or self._worker.alive()

    async def derived_saved(self, timeout: float | None = None) -> bool:
        """Wait, without blocking the event loop, for the child runs of every raw run whose
        stop this callback has been handed so far.

        ``timeout`` defaults to ``stop_timeout``. Returns True when all are saved; False
        when one was lost with its worker (logged as an error) or is still being saved
        when ``timeout`` passed (logged once per run as a warning: it goes on in the
        background). Cancelling it only stops the waiting.
        """
        if not self._stopped:
            return True
        uids = list(self._stopped)
        timeout = self.stop_timeout if timeout is None else timeout
        self._say_why_waiting()
        lost, late = await wait_async(self._runs, uids, timeout, self._alive)
        for uid in uids:
            if uid not in late:
                self._stopped.pop(uid, None)
        if lost:
            logger.error(
                "derived data of run(s) %s is not saved: the analysis worker ended first",
                ", ".join(lost),
            )
        unreported = [uid for uid in late if uid not in self._late_reported]
        if unreported:
            self._late_reported.update(unreported)
            logger.warning(
                "derived data of run(s) %s is not saved after %s s (stop_timeout); the "
                "plan goes on and the derived data continues to be saved in the background",
                ", ".join(unreported),
                timeout,
            )
        return not lost and not late

    def _say_why_waiting(self) -> None:
        """Once per callback: the plan waits for a worker process still starting."""
        starting_for = getattr(self._worker, "starting_for", None)
        if starting_for is None or self._said_starting:
            return
        self._said_starting = True
        logger.warning(
            "the derived data of this scan waits for the analysis worker process, started "
            "%.1f s ago and still loading its imports (the first scan after the callback is "
            "made waits for it; later ones do not)",
            starting_for,
        )

    def subscribe(self, target: Any, *, timeout: float | None = None) -> int:
        """Subscribe this callback to a RunEngine, or a live subscriber to this callback.

        ``callback.subscribe(RE)``: ``RE.subscribe(self)``, and make every plan ``RE`` runs
        wait for this callback's child runs after each run it closes (a preprocessor in
        ``RE.preprocessors``), so that ``RE(plan)`` returns once the derived data is saved,
        without blocking the RunEngine's loop. ``timeout`` defaults to ``stop_timeout``.
        Returns the RunEngine's subscription token; ``unsubscribe(RE)`` undoes both.

        ``callback.subscribe(f)``, for any other callable ``f(name, doc)`` (``LivePlot``,
        ``LiveTable``, ``BestEffortCallback``...): ``f`` is handed the documents of every
        child run that starts from now on, as they are made (see the class docstring).
        Returns a token; ``unsubscribe(token)`` (or ``unsubscribe(f)``) removes it.
        """
        if _is_run_engine(target):
            return self._subscribe_to(target, timeout)
        if target is self or not callable(target):
            raise AnalysisStoreError(
                "subscribe a RunEngine, or a callable f(name, doc) to be given the child "
                f"runs' documents, not {target!r}"
            )
        token = self._view.subscribe(target)
        self._set_forwarding(True)
        return token

    def _subscribe_to(self, RE: Any, timeout: float | None) -> int:  # noqa: N803
        token = RE.subscribe(self)
        if self._preprocessor is None:
            self._preprocessor = functools.partial(
                wait_for_derived_wrapper, callback=self, timeout=timeout
            )
        if self._preprocessor not in RE.preprocessors:
            RE.preprocessors.append(self._preprocessor)
        self._tokens[id(RE)] = token
        return token

    def unsubscribe(self, target: Any) -> None:
        """Undo :meth:`subscribe`: of a RunEngine (give the RunEngine), or of a live
        subscriber (give its token or the subscriber). Unknown ones are ignored."""
        if not _is_run_engine(target):
            if not isinstance(target, int) and not callable(target):
                raise AnalysisStoreError(
                    f"unsubscribe a RunEngine, a live subscriber or its token, not {target!r}"
                )
            self._view.unsubscribe(target)
            if not self._view.active:
                self._set_forwarding(False)
            return
        RE = target  # noqa: N806
        token = self._tokens.pop(id(RE), None)
        if token is not None:
            RE.unsubscribe(token)
        if self._preprocessor in RE.preprocessors:
            RE.preprocessors.remove(self._preprocessor)

    def _set_forwarding(self, on: bool) -> None:
        if self._worker is not None:
            self._worker.set_forwarding(on)
        else:
            assert self._router is not None
            self._router.forward = self._view.child if on else None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every document handed over so far is reduced and saved (this blocks:
        not on the RunEngine's loop; in a plan, ``yield from wait_for_derived(callback)``).

        Returns False if ``timeout`` seconds passed first (or the worker ended).
        """
        if self._worker is not None:
            return self._worker.flush(timeout)
        assert self._router is not None
        return self._router.flush_store(timeout)

    def close(self, timeout: float | None = None) -> Abandoned:
        """Finish the queued work (within ``timeout`` seconds), then stop the worker.

        Runs still open stay unfinished. Returns what was left undone (documents never
        reduced, raw runs whose child run is unfinished); a warning lists it too.
        """
        if self._closed:
            return Abandoned()
        self._closed = True
        self._finalizer.detach()
        abandoned = self._work.close(timeout)
        self._view.close(timeout)
        if abandoned:
            logger.warning(
                "closing the analysis callback left %s (runs %s)",
                abandoned,
                ", ".join(abandoned.runs),
            )
        return abandoned

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


class _Foreground:
    """What closing a foreground callback does: its work is done document by document."""

    def __init__(self, router: LiveRouter, open_runs: dict[str, None]) -> None:
        self._router = router
        self._open_runs = open_runs
        self._closed = False

    def close(self, timeout: float | None) -> Abandoned:
        if self._closed:
            return Abandoned()
        self._closed = True
        open_runs = tuple(self._open_runs)
        self._router.close(
            reason="interrupted: the analysis callback was closed before the raw run's stop",
            timeout=timeout,
        )
        return Abandoned(0, open_runs)


def _is_run_engine(target: Any) -> bool:
    """A bluesky RunEngine, or something that works like one (it has preprocessors)."""
    from bluesky import RunEngine

    if isinstance(target, RunEngine):
        return True
    return all(hasattr(target, name) for name in ("subscribe", "unsubscribe", "preprocessors"))


def _close_collected(work: Any, view: LiveView) -> None:
    """Close the work of a callback that was collected without ``close()``, on a thread of
    its own: the collection may happen on the RunEngine's loop."""

    def close() -> None:
        abandoned = work.close(_COLLECTED_CLOSE_SECONDS)
        view.close(_COLLECTED_CLOSE_SECONDS)
        if abandoned:
            logger.warning("an analysis callback was dropped unclosed; it left %s", abandoned)

    threading.Thread(target=close, name="analysis-store-closer", daemon=True).start()


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
