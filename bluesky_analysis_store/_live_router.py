"""The reducing end of the live callback: raw documents in, child runs saved.

:class:`LiveRouter` routes each raw run to a :class:`RunReduction` of its own (interleaved
and nested runs stay apart) and keeps every failure away from its caller unless the plan
says ``on_error="raise"``. It runs wherever the callback's work runs: on the RunEngine's
thread (foreground), on a worker thread, or in the worker process; in each, child documents
go the same way: journaled first, then delivered to the store by a :class:`Delivery` thread.
While ``forward`` is set, the child documents a live view shows (``_live_view``) are handed to
it too, once journaled.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from event_model import RunRouter, UnresolvableForeignKeyError

from ._delivery import Delivery, JournaledSink
from ._filling import EventShortcut, RouterFiller
from ._journal import JOURNAL_SUFFIX
from ._live_view import DISPLAYED_DOCUMENTS
from ._reduction import ReductionPlan, RunReduction
from ._run_summary import ReductionOutcome

__all__ = ["LiveRouter"]

logger = logging.getLogger(__name__)


class LiveRouter:
    """Reduce every raw run it is given into a child run saved in ``store``.

    ``on_run_finished(outcome)`` is called once a raw run's child run is delivered to the
    store, or is safe in its journal while the store fails, or could not be made at all;
    ``outcome`` says which, with the reduction's counts. ``private_documents=True`` says no
    one else sees the documents (they were unpickled here), so reducers get their arrays
    without a copy. ``forward(name, doc)``, while set, is given the child documents a live
    view shows, once they are journaled (what it raises is logged).
    """

    def __init__(
        self,
        plan: ReductionPlan,
        store: Any,
        on_run_finished: Callable[[ReductionOutcome], None] = lambda outcome: None,
        *,
        private_documents: bool = False,
    ) -> None:
        self.plan = plan
        self.store = store
        self._private_documents = private_documents
        self._on_run_finished = on_run_finished
        self.delivery = Delivery(store)
        self._router = RunRouter([self._factory], filler_class=RouterFiller)
        self._runs: dict[str, RunReduction] = {}
        self._shortcut = EventShortcut(self._runs)
        self._unknown_runs_logged: set[str] = set()
        self.forward: Callable[[str, dict[str, Any]], None] | None = None

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
            raw_uid = doc["run_start"]
            run = self._runs.pop(raw_uid, None)
            self._shortcut.forget(run)
            if run is not None and not run.done:
                logger.error("child run of %s was not completed", raw_uid)
            child_uid = run.child_uid if run is not None and run.done else None
            self.delivery.when_settled(child_uid, functools.partial(self._finished, raw_uid, run))

    def flush_store(self, timeout: float | None = None) -> bool:
        """Deliver every child document made so far and write the rows buffered for open
        runs, so that readers see them now; False if the store failed (they stay in the
        journal and are delivered later) or ``timeout`` passed."""
        return self.delivery.flush(timeout)

    def _guard(self, action: Callable[[], None], what: str) -> None:
        try:
            action()
        except Exception:
            if self.plan.on_error == "raise":
                raise
            logger.exception("%s failed", what)

    def close(self, reason: str | None = None, timeout: float | None = None) -> None:
        """End the child runs whose raw run will not be completed (with a stop of
        ``exit_status: "fail"`` and ``reason``; without one if ``reason`` is None, leaving
        them to ``recover``), then deliver what is journaled, for at most ``timeout``."""
        closed = list(self._runs.items())
        for _, run in closed:
            if reason is not None:
                self._guard(functools.partial(run.interrupt, reason), "closing a child run")
            run.close()
        self._runs.clear()
        self.delivery.close(timeout)
        for raw_uid, run in closed:  # told after delivery: the outcome says where it is
            self._finished(raw_uid, run)

    def _finished(self, raw_uid: str, run: RunReduction | None) -> None:
        try:
            outcome = self._outcome(raw_uid, run)
        except Exception:  # the run's waiters must be told all the same
            logger.exception("the outcome of the child run of %s could not be told", raw_uid)
            outcome = ReductionOutcome(raw_uid, None, None, 0, 0, None, False, None)
        self._on_run_finished(outcome)

    def _outcome(self, raw_uid: str, run: RunReduction | None) -> ReductionOutcome:
        child_uid = run.child_uid if run is not None else None
        journal = None
        if child_uid is not None:
            path = Path(self.delivery.folder) / f"{child_uid}{JOURNAL_SUFFIX}"
            journal = str(path) if path.exists() else None  # a delivered run's is removed
        return ReductionOutcome(
            raw_uid=raw_uid,
            child_uid=child_uid,
            scan_id=run.parent_scan_id if run is not None else None,
            events_reduced=run.events_reduced if run is not None else 0,
            events_failed=run.events_failed if run is not None else 0,
            exit_status=run.exit_status if run is not None else None,
            saved=child_uid is not None and journal is None,
            store=getattr(self.store, "location", None),
            journal=journal,
        )

    def _factory(self, name: str, start: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        sink = _ForwardingSink(JournaledSink(self.delivery), self)
        run = RunReduction(self.plan, sink, copy_inputs=not self._private_documents)
        self._runs[start["uid"]] = run
        return [run], []


class _ForwardingSink:
    """The journaled sink, then the router's ``forward`` for the documents a view shows."""

    def __init__(self, sink: JournaledSink, router: LiveRouter) -> None:
        self._sink = sink
        self._router = router

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.write_all([(name, doc)])

    def write_all(self, documents: list[tuple[str, dict[str, Any]]]) -> None:
        self._sink.write_all(documents)
        forward = self._router.forward
        if forward is None:
            return
        try:
            for name, doc in documents:
                if name in DISPLAYED_DOCUMENTS:
                    forward(name, doc)
        except Exception:  # the live view is for display: the child run is journaled
            logger.exception("a child document could not be handed to the live view")
