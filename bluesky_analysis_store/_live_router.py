"""The reducing end of the live callback: raw documents in, child runs saved.

:class:`LiveRouter` routes each raw run to a :class:`RunReduction` of its own (interleaved
and nested runs stay apart) and keeps every failure away from its caller unless the plan
says ``on_error="raise"``. It runs wherever the callback's work runs: on the RunEngine's
thread (foreground), on a worker thread, or in the worker process.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from event_model import RunRouter, UnresolvableForeignKeyError

from ._filling import EventShortcut, RouterFiller
from ._reduction import ReductionPlan, RunReduction

__all__ = ["LiveRouter"]

logger = logging.getLogger(__name__)


class LiveRouter:
    """Reduce every raw run it is given into a child run saved in ``store``.

    ``on_run_finished(raw_uid)`` is called once a raw run's stop has been dealt with,
    whether or not its child run could be completed. A store that can leave closing a
    run's streams for later (``store(name, doc, close_streams=False)`` and
    ``store.close_streams()``, as :class:`AnalysisStore` can) closes them after that call:
    a scan waiting for its child run does not wait for those requests.
    ``private_documents=True`` says no one else sees the documents (they were unpickled
    here), so reducers get their arrays without a copy.
    """

    def __init__(
        self,
        plan: ReductionPlan,
        store: Any,
        on_run_finished: Callable[[str], None] = lambda raw_uid: None,
        *,
        private_documents: bool = False,
    ) -> None:
        self.plan = plan
        self.store = store
        self._private_documents = private_documents
        self._on_run_finished = on_run_finished
        self._close_streams = getattr(store, "close_streams", None)
        self._sink = functools.partial(store, close_streams=False) if self._close_streams else store
        self._router = RunRouter([self._factory], filler_class=RouterFiller)
        self._runs: dict[str, RunReduction] = {}
        self._shortcut = EventShortcut(self._runs)
        self._unknown_runs_logged: set[str] = set()

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        try:
            if not self._shortcut.route(name, doc):
                self._router(name, doc)
                self._shortcut.learn(name, doc)
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
            self._shortcut.forget(run)
            self._on_run_finished(doc["run_start"])
            if run is not None and not run.done:
                logger.error("child run of %s was not completed", doc["run_start"])
            if self._close_streams is not None:
                self._guard(self._close_streams, "closing the child run's streams")

    def flush_store(self) -> None:
        """Write rows the store buffers, so that readers see them now."""
        flush = getattr(self.store, "flush", None)
        if flush is not None:
            self._guard(flush, "writing buffered derived data to the store")

    def _guard(self, action: Callable[[], None], what: str) -> None:
        try:
            action()
        except Exception:
            if self.plan.on_error == "raise":
                raise
            logger.exception("%s failed", what)

    def close(self) -> None:
        """Release the files of runs that will not be completed."""
        for run in self._runs.values():
            run.close()
        self._runs.clear()

    def _factory(self, name: str, start: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        run = RunReduction(self.plan, self._sink, copy_inputs=not self._private_documents)
        self._runs[start["uid"]] = run
        return [run], []
