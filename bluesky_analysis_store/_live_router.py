"""The reducing end of the live callback: raw documents in, child runs saved.

:class:`LiveRouter` routes each raw run to a :class:`RunReduction` of its own (interleaved
and nested runs stay apart) and keeps every failure away from its caller unless the plan
says ``on_error="raise"``. It runs wherever the callback's work runs: on the RunEngine's
thread (foreground), on a worker thread, or in the worker process; in each, child documents
go the same way: journaled first, then delivered to the store by a :class:`Delivery` thread.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from event_model import RunRouter, UnresolvableForeignKeyError

from ._delivery import Delivery, JournaledSink
from ._filling import EventShortcut, RouterFiller
from ._reduction import ReductionPlan, RunReduction

__all__ = ["LiveRouter"]

logger = logging.getLogger(__name__)


class LiveRouter:
    """Reduce every raw run it is given into a child run saved in ``store``.

    ``on_run_finished(raw_uid)`` is called once a raw run's child run is delivered to the
    store, or is safe in its journal while the store fails, or could not be made at all.
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
        self.delivery = Delivery(store)
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
            raw_uid = doc["run_start"]
            run = self._runs.pop(raw_uid, None)
            self._shortcut.forget(run)
            if run is not None and not run.done:
                logger.error("child run of %s was not completed", raw_uid)
            child_uid = run.child_uid if run is not None and run.done else None
            self.delivery.when_settled(child_uid, functools.partial(self._on_run_finished, raw_uid))

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
        for raw_uid, run in list(self._runs.items()):
            if reason is not None:
                self._guard(functools.partial(run.interrupt, reason), "closing a child run")
            run.close()
            self._on_run_finished(raw_uid)
        self._runs.clear()
        self.delivery.close(timeout)

    def _factory(self, name: str, start: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        sink = JournaledSink(self.delivery)
        run = RunReduction(self.plan, sink, copy_inputs=not self._private_documents)
        self._runs[start["uid"]] = run
        return [run], []
