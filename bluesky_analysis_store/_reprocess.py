"""Offline reduction: raw runs from a catalog through the live pipeline, into the store."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._dask_reads import local_dask_reads
from ._delivery import save_documents
from ._errors import AnalysisStoreError, ProvenanceError, RunNotFoundError
from ._provenance import code_identity
from ._reducers import FunctionReducer
from ._reduction import ReductionPlan, RunReduction
from ._replay import count_events, replay_run, stop_document
from ._store import ChildRun
from ._trust import claims_derivation

__all__ = ["ReprocessReport", "RunOutcome", "code_versions", "reduce_run", "reprocess"]

logger = logging.getLogger(__name__)

_LOADING_STAGE = "loading external data"


@dataclass
class ReprocessReport:
    """What became of each raw run."""

    saved: dict[str, str] = field(default_factory=dict)
    """raw uid -> uid of the new child run"""
    skipped: dict[str, str] = field(default_factory=dict)
    """raw uid -> uid of the child run already made by the same code"""
    failed: dict[str, str] = field(default_factory=dict)
    """raw uid -> why it was not reduced: no child run was saved, or one on which every
    event failed (listed in ``failed_children`` too)"""
    failed_children: dict[str, str] = field(default_factory=dict)
    """raw uid -> uid of the saved child run on which every event failed"""
    incomplete: dict[str, str] = field(default_factory=dict)
    """raw uid -> what was done with a raw run that has no stop document"""
    not_counted: dict[str, dict[str, str]] = field(default_factory=dict)
    """raw uid -> {earlier child uid: its status}: children made by the same code that do
    not count as a reduction (incomplete, failed, or with failed events)"""
    reductions: dict[str, dict[str, Any]] = field(default_factory=dict)
    """raw uid -> the reduction record of its new child, as its stop keeps it
    (``events_reduced``, ``events_failed``, ``failures``)"""
    errors: dict[str, BaseException] = field(default_factory=dict)
    """raw uid -> the error that kept it from being reduced (no child run was saved)"""

    def __str__(self) -> str:
        lines = [
            f"{len(self.saved)} saved, {len(self.skipped)} already reduced, "
            f"{len(self.failed)} failed"
        ]
        lines += [f"  failed {uid}: {why}" for uid, why in self.failed.items()]
        lines += [f"  incomplete raw run {uid}: {what}" for uid, what in self.incomplete.items()]
        for raw_uid, children in self.not_counted.items():
            lines += [
                f"  earlier child {child_uid} of {raw_uid} is {status}: not counted as reduced"
                for child_uid, status in children.items()
            ]
        return "\n".join(lines)


def code_versions(code: Iterable[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """What makes two reductions the same code (see :func:`code_identity`)."""
    return code_identity(code)


def _client_of(source: Any) -> Any:
    if isinstance(source, (str, os.PathLike)):
        from ._store import AnalysisStore

        return AnalysisStore.open(source).client
    return getattr(source, "client", source)


def _raw_uids(client: Any, uids_or_query: Any) -> list[str]:
    if isinstance(uids_or_query, str):
        return [uids_or_query]
    if isinstance(uids_or_query, Iterable) and not isinstance(uids_or_query, Mapping):
        items = list(uids_or_query)
        if all(isinstance(u, str) for u in items):
            return items
        results = client
        for query in items:
            results = results.search(query)
        return list(results)
    return list(client.search(uids_or_query))


def _same_code_children(
    store: Any, raw_uid: str, identity: list[tuple[str, ...]]
) -> list[ChildRun]:
    """The children of ``raw_uid`` this package wrote with the same code identity, newest
    first, each with its status (a child without a stop document is listed too). A run
    that only claims to be a child (unsealed) never counts."""
    return [child for child in store._children_of(raw_uid) if child.identity == identity]


def _refuse_derived(run: Any, raw_uid: str) -> None:
    if claims_derivation(run.start):
        raise ProvenanceError(
            f"run {raw_uid} is a derived run (its start names parent_uids or provenance), "
            "not raw data; reprocess(..., derived=True) (--derived) reduces it anyway, as "
            "the parent of a new child"
        )


def _refuse_missing_streams(run: Any, raw_uid: str, plan: ReductionPlan) -> None:
    """A function reducer given only streams the run does not have would make a child with
    no events that looks like a success: refused, naming the streams the run has."""
    wanted = {
        stream
        for reducer in plan.reducers
        if isinstance(reducer, FunctionReducer)
        for stream in reducer.streams
    }
    present = set(run)
    if wanted and present and not wanted & present:
        raise AnalysisStoreError(
            f"run {raw_uid} has no stream {', '.join(map(repr, sorted(wanted)))}; its streams "
            f"are {', '.join(map(repr, sorted(present)))}: choose them with streams=[...]"
        )


@dataclass
class RunOutcome:
    """What became of one raw run: small and picklable, so that a task on another process
    or machine can hand it back; :meth:`add_to` puts it into the batch's report."""

    raw_uid: str
    saved: str | None = None
    """uid of the new child run (saved, or every event failed: see ``failed_child``)"""
    skipped: str | None = None
    """the child run already made by the same code"""
    failed: str | None = None
    failed_child: bool = False
    incomplete: str | None = None
    not_counted: dict[str, str] = field(default_factory=dict)
    reduction: dict[str, Any] | None = None
    error: BaseException | None = None

    def add_to(self, report: ReprocessReport) -> None:
        uid = self.raw_uid
        if self.skipped is not None:
            report.skipped[uid] = self.skipped
            return
        if self.not_counted:
            report.not_counted[uid] = dict(self.not_counted)
        if self.incomplete is not None:
            report.incomplete[uid] = self.incomplete
        if self.reduction is not None:
            report.reductions[uid] = self.reduction
        if self.failed is not None:
            report.failed[uid] = self.failed
            if self.failed_child and self.saved:
                report.failed_children[uid] = self.saved
            if self.error is not None:
                report.errors[uid] = self.error
        elif self.saved is not None:
            report.saved[uid] = self.saved


def reprocess(
    source: Any,
    uids_or_query: Any,
    reducers: Iterable[Any] | Any,
    store: Any,
    *,
    streams: Iterable[str] = ("primary",),
    writers: Mapping[str, str | None] | None = None,
    root: str | None = None,
    md: Mapping[str, Any] | None = None,
    force: bool = False,
    strict: bool = True,
    progress: bool | None = None,
    derived: bool = False,
    executor: Any = None,
) -> ReprocessReport:
    """Reduce saved raw runs again and save the child runs into ``store``.

    ``source`` is the raw catalog: a tiled client, an :class:`AnalysisStore`, or a store
    folder. ``uids_or_query`` is a uid, a list of uids, or tiled queries. Each run goes
    through the same pipeline as :class:`AnalysisStoreCallback`. A run already reduced by the
    same code is skipped unless ``force``; nothing is ever overwritten: new code gives a new
    child run beside the old one. A run whose data cannot be read is reported in the result
    and skipped, and the batch goes on. ``progress`` shows bars over runs and events
    (default: when stderr is a terminal).

    ``executor`` spreads the runs over other processes or machines, one task per raw run:
    a :class:`concurrent.futures.Executor` (``ProcessPoolExecutor``, ``ThreadPoolExecutor``)
    or a Dask ``distributed.Client``. Each task opens the source and the store again (both
    must be reopenable: see ``_distributed.py``), reduces and saves its run, and returns a
    small record; one progress bar counts the runs. A task retried after its worker was
    lost (Dask reschedules them) makes the same child uid and delivers it whole, so each
    run is saved once. Without ``executor`` everything runs in this process.

    "The same code" is the same code identity (:func:`code_identity`): for each reducer its
    name, version, source file sha256, git commit and dirty state, and parameters, read
    afresh at each call, so an edit (committed or not) reduces again. Only a child this
    package wrote (:attr:`ChildRun.verified`) that :attr:`ChildRun.succeeded` counts as
    "already reduced": one with a stop document, exit status ``"success"`` and no failed
    event. An incomplete child (no stop: its process died, or it is still being written),
    a failed or aborted one, or one with any failed event never blocks a new reduction;
    the report lists it in ``not_counted``. A new child on which every event failed is
    saved (its stop records the failures) but reported in ``failed``, not ``saved``.

    A derived run (its start names ``parent_uids`` or ``provenance``) is not raw data:
    it is refused (reported in ``failed``) unless ``derived=True``, which reduces it as the
    parent of a new child.

    A raw run without a stop document (its scan is still running, or was interrupted) is
    reduced as far as its saved events go, and listed in ``incomplete``; its child run's
    stop says ``exit_status "fail"`` with the reason that the raw run is incomplete, so it
    never counts as a reduction of the raw run and the next ``reprocess`` reduces it again,
    with whatever events have been saved by then.
    """
    from tqdm.auto import tqdm

    plan = ReductionPlan.for_store(
        reducers, store, streams=streams, writers=writers, root=root, md=md, strict=strict
    )
    identity = code_identity(plan.code)
    if progress is None:
        progress = sys.stderr.isatty()
    if executor is not None:
        from ._distributed import reprocess_on_executor

        return reprocess_on_executor(
            executor,
            source,
            uids_or_query,
            plan,
            store,
            identity,
            force=force,
            derived=derived,
            progress=progress,
        )
    client = _client_of(source)
    raw_uids = _raw_uids(client, uids_or_query)
    report = ReprocessReport()
    for raw_uid in tqdm(raw_uids, desc="runs", unit="run", disable=not progress):
        outcome = reduce_run(
            client, raw_uid, plan, store, identity, force=force, derived=derived, progress=progress
        )
        outcome.add_to(report)
    logger.info("reprocess: %s", report)
    return report


def reduce_run(
    client: Any,
    raw_uid: str,
    plan: ReductionPlan,
    store: Any,
    identity: list[tuple[str, ...]],
    *,
    force: bool,
    derived: bool,
    child_uid: str | None = None,
    progress: bool = False,
) -> RunOutcome:
    """Reduce one raw run of ``client`` into ``store`` unless the same code already did;
    never raises for the run's own faults (they are in the outcome).

    ``child_uid`` fixes the new child's uid: a child of that uid already complete and
    successful is this very reduction done by an earlier attempt (its outcome is "saved");
    one left incomplete by an attempt whose process died is replaced whole, files too.
    """
    outcome = RunOutcome(raw_uid)
    earlier = _same_code_children(store, raw_uid, identity)
    mine = next((child for child in earlier if child == child_uid), None)
    if mine is not None and mine.succeeded:
        outcome.saved = str(mine)
        outcome.reduction = _reduction_record(store, mine)
        logger.info("run %s was reduced as %s by an earlier attempt", raw_uid, mine)
        return outcome
    earlier = [child for child in earlier if child != child_uid]
    if not force and (done := [child for child in earlier if child.succeeded]):
        outcome.skipped = done[0]
        logger.info("run %s already reduced by this code as %s; skipped", raw_uid, done[0])
        return outcome
    if not_counted := {child: child.status for child in earlier if not child.succeeded}:
        outcome.not_counted = dict(not_counted)
        logger.info(
            "run %s: earlier children by this code do not count as reduced (%s)",
            raw_uid,
            "; ".join(f"{uid} {status}" for uid, status in not_counted.items()),
        )
    if child_uid is not None:  # files of an earlier attempt that did not finish
        _remove_child_files(plan, child_uid)
    try:
        with local_dask_reads():
            reduction, outcome.incomplete = _reprocess_one(
                client, raw_uid, plan, store, progress, derived=derived, child_uid=child_uid
            )
    except Exception as error:
        outcome.failed = f"{type(error).__name__}: {error}"
        outcome.error = error
        logger.error("run %s not reprocessed: %s", raw_uid, error)
        return outcome
    outcome.saved = reduction.child_uid or ""
    outcome.reduction = {
        "events_reduced": reduction.events_reduced,
        "events_failed": reduction.events_failed,
        "failures": list(reduction.failures),
    }
    if reduction.events_failed and not reduction.events_reduced:
        first = reduction.failures[0]["error"] if reduction.failures else "unknown"
        outcome.failed = (
            f"every event failed ({reduction.events_failed}; first: {first}); the child "
            f"run {outcome.saved} records the failures"
        )
        outcome.failed_child = True
        logger.error("run %s: %s", raw_uid, outcome.failed)
    return outcome


def _reduction_record(store: Any, child_uid: str) -> dict[str, Any]:
    stop = store.catalog[child_uid].metadata.get("stop") or {}
    record = stop.get("reduction") or {}
    return {
        "events_reduced": record.get("events_reduced"),
        "events_failed": record.get("events_failed"),
        "failures": list(record.get("failures") or []),
    }


def _reprocess_one(
    client: Any,
    raw_uid: str,
    plan: ReductionPlan,
    store: Any,
    progress: bool,
    *,
    derived: bool,
    child_uid: str | None = None,
) -> tuple[RunReduction, str | None]:
    """The run's reduction, saved, and what to say of a raw run without a stop."""
    from tqdm.auto import tqdm

    try:
        run = client[raw_uid]
    except KeyError:
        raise RunNotFoundError(f"no run {raw_uid!r} in the source catalog") from None
    if not derived:
        _refuse_derived(run, raw_uid)
    _refuse_missing_streams(run, raw_uid, plan)
    complete = stop_document(run) is not None
    documents: list[tuple[str, dict[str, Any]]] = []
    reduction = RunReduction(
        plan, lambda name, doc: documents.append((name, doc)), child_uid=child_uid
    )
    bar = tqdm(
        total=count_events(run) if progress else None,
        desc=raw_uid[:8],
        unit="event",
        leave=False,
        disable=not progress,
    )
    try:
        events = 0
        for name, doc in replay_run(run, stand_in=True):
            reduction(name, doc)
            if name == "event":
                events += 1
                bar.update()
        unreadable = [f for f in reduction.failures if f["stage"] == _LOADING_STAGE]
        if unreadable:
            raise AnalysisStoreError(f"raw data could not be loaded: {unreadable[0]['error']}")
    except Exception:
        reduction.close()
        _remove_child_files(plan, reduction.child_uid)
        raise
    finally:
        bar.close()
    # The child run reaches the store only once it is complete: a failed run leaves nothing.
    save_documents(store, documents)
    incomplete = None
    if not complete:
        incomplete = (
            f"no stop document (still running, or interrupted): replayed the {events} events "
            f"saved so far; child run {reduction.child_uid} is marked exit_status 'fail'"
        )
        logger.info("raw run %s: %s", raw_uid, incomplete)
    return reduction, incomplete


def _remove_child_files(plan: ReductionPlan, child_uid: str | None) -> None:
    if not child_uid:
        return
    roots = {spec.root for spec in plan.writers.values()}
    for default in (plan.array_writer, plan.table_writer):
        if default is not None:
            roots.add(default.root)
    for root in roots:
        shutil.rmtree(os.path.join(root, child_uid), ignore_errors=True)
