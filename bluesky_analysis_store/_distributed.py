"""Reprocessing on an executor: one task per raw run, on other processes or machines.

The caller settles the reduction plan and its code identity once, finds the raw uids, and
submits one task per run to a :class:`concurrent.futures.Executor` or a Dask
``distributed.Client``. A task carries bytes and strings only: how to open the source and
the store again (a pickled :class:`AnalysisStore` is the way to reopen it, see
``AnalysisStore.__reduce__``), the pickled plan, the raw uid and the child uid. The worker
opens each once per thread (later tasks reuse them), reduces and saves the run through the
usual journal-then-deliver path, and returns a small :class:`RunOutcome`; the caller builds
one :class:`ReprocessReport`.

A worker lost mid-batch (SIGKILL, a machine gone) has its tasks rescheduled by Dask. The
child uid of a run is derived from the raw uid, the code identity and a token the caller
makes for the batch, so a retried task makes the same child run: files and journal left
by the lost attempt are replaced, and the store's partial node of that uid is replaced
whole by delivery; an attempt that had finished is found complete and not redone. Each run
is therefore saved once. A ``ProcessPoolExecutor`` does not retry: a lost process breaks
the pool and its runs are reported failed.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import pickle
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ._errors import AnalysisStoreError
from ._reduction import ReductionPlan
from ._reprocess import ReprocessReport, RunOutcome, _raw_uids, reduce_run

__all__ = ["RunTask", "batch_child_uid", "reprocess_on_executor", "run_task"]

logger = logging.getLogger(__name__)

# The namespace of child uids made for a batch (uuid5): fixed, so that a retried task
# derives the same uid as the attempt it replaces.
_CHILD_UID_NAMESPACE = uuid.UUID("6b0f4a52-37c1-4d0e-9a57-1f6a2f0d8e31")


def batch_child_uid(raw_uid: str, identity: list[tuple[str, ...]], batch_token: str) -> str:
    """The uid of ``raw_uid``'s child in the batch ``batch_token`` by code ``identity``."""
    name = json.dumps([raw_uid, [list(part) for part in identity], batch_token])
    return str(uuid.uuid5(_CHILD_UID_NAMESPACE, name))


# --- how a worker opens the source ---------------------------------------------------------


@dataclass(frozen=True)
class _StoreSource:
    """Raw runs in an analysis store, opened again in the worker (pickled as its recipe)."""

    store: Any

    def client(self) -> Any:
        return self.store.client


@dataclass(frozen=True)
class _TiledSource:
    """Raw runs on a tiled server, by the address and API key of the caller's client."""

    uri: str
    api_key: str | None

    def client(self) -> Any:
        client = self.__dict__.get("_client")
        if client is None:  # once per worker thread and batch: it is opened once
            from tiled.client import from_uri

            client = from_uri(self.uri, api_key=self.api_key)
            object.__setattr__(self, "_client", client)
        return client


def _reopenable_source(source: Any) -> tuple[Any, Any]:
    """The caller's client of ``source``, and how a worker opens it again."""
    from ._store import AnalysisStore

    if isinstance(source, (str, os.PathLike)):
        source = AnalysisStore.open(source)
    if isinstance(source, AnalysisStore):
        _refuse_unpicklable(source, "the source store")
        return source.client, _StoreSource(source)
    context = getattr(source, "context", None)
    if context is None:
        raise AnalysisStoreError(
            f"the source must be an AnalysisStore, a store folder or a tiled client, not "
            f"{type(source).__name__}"
        )
    if getattr(context.http_client, "app", None) is not None:
        raise AnalysisStoreError(
            "the source is a tiled client of an app served inside this process, which other "
            "processes cannot reach; give the store itself (AnalysisStore.open(folder)) or its "
            "folder, or a client of a tiled server (tiled.client.from_uri)"
        )
    return source, _TiledSource(source.uri, context.api_key)


def _refuse_unpicklable(store: Any, what: str) -> None:
    try:
        pickle.dumps(store)
    except TypeError as error:
        raise AnalysisStoreError(
            f"{what} cannot be opened again in another process, which reprocess with an "
            f"executor needs ({error})"
        ) from None


# --- the task ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunTask:
    """One raw run to reduce on a worker. The pickled parts are opened there once per
    batch and thread: the tasks of a batch share the opened store, source and plan."""

    source: bytes
    store: bytes
    plan: bytes
    batch: str
    identity: list[tuple[str, ...]]
    raw_uid: str
    child_uid: str
    force: bool
    derived: bool


_opened = threading.local()


def _open(data: bytes, batch: str) -> Any:
    """``pickle.loads(data)``, once per batch and thread: a new batch opens its stores
    afresh (a store server may have been replaced since), and the last batch's go."""
    if getattr(_opened, "batch", None) != batch:
        _opened.batch, _opened.objects = batch, {}
    cache: dict[bytes, Any] = _opened.objects
    if data not in cache:
        cache[data] = pickle.loads(data)
    return cache[data]


def run_task(task: RunTask) -> RunOutcome:
    """Reduce and save one raw run (in a worker); the run's faults are in the outcome."""
    try:
        client = _open(task.source, task.batch).client()
        store = _open(task.store, task.batch)
        plan: ReductionPlan = _open(task.plan, task.batch)
        outcome = reduce_run(
            client,
            task.raw_uid,
            plan,
            store,
            task.identity,
            force=task.force,
            derived=task.derived,
            child_uid=task.child_uid,
        )
    except Exception as error:  # opening the store or the source: this run fails, not all
        logger.error("run %s not reprocessed: %s", task.raw_uid, error)
        outcome = RunOutcome(task.raw_uid, failed=f"{type(error).__name__}: {error}", error=error)
    outcome.error = _picklable(outcome.error)
    return outcome


def _picklable(error: BaseException | None) -> BaseException | None:
    """``error`` if it survives the trip back to the caller, else one of ours saying it."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return AnalysisStoreError(f"{type(error).__name__}: {error}")
    return error


# --- the caller ----------------------------------------------------------------------------


def _is_dask_client(executor: Any) -> bool:
    return type(executor).__module__.split(".")[0] == "distributed" and hasattr(executor, "gather")


def reprocess_on_executor(
    executor: Any,
    source: Any,
    uids_or_query: Any,
    plan: ReductionPlan,
    store: Any,
    identity: list[tuple[str, ...]],
    *,
    force: bool,
    derived: bool,
    progress: bool,
) -> ReprocessReport:
    """:func:`reprocess` with one task per raw run on ``executor`` (see the module)."""
    from tqdm.auto import tqdm

    dask = _is_dask_client(executor)
    if not dask and not isinstance(executor, concurrent.futures.Executor):
        raise AnalysisStoreError(
            "executor must be a concurrent.futures.Executor or a distributed.Client, not "
            f"{type(executor).__name__}"
        )
    _refuse_unpicklable(store, "the store")
    client, reopen_source = _reopenable_source(source)
    raw_uids = list(dict.fromkeys(_raw_uids(client, uids_or_query)))
    batch_token = uuid.uuid4().hex
    shared = {
        "source": pickle.dumps(reopen_source),
        "store": pickle.dumps(store),
        "plan": pickle.dumps(plan),
    }
    tasks = [
        RunTask(
            **shared,
            batch=batch_token,
            identity=identity,
            raw_uid=raw_uid,
            child_uid=batch_child_uid(raw_uid, identity, batch_token),
            force=force,
            derived=derived,
        )
        for raw_uid in raw_uids
    ]
    outcomes: dict[str, RunOutcome] = {}
    with tqdm(total=len(tasks), desc="runs", unit="run", disable=not progress) as bar:
        for raw_uid, outcome in _submitted(executor, tasks, dask=dask):
            outcomes[raw_uid] = outcome
            bar.update()
    report = ReprocessReport()
    for raw_uid in raw_uids:  # in the order asked for, not the order they finished in
        outcomes[raw_uid].add_to(report)
    logger.info("reprocess: %s", report)
    return report


def _submitted(
    executor: Any, tasks: Iterable[RunTask], *, dask: bool
) -> Iterator[tuple[str, RunOutcome]]:
    """Each task's outcome as it completes; a task whose worker could not finish it (Dask
    gave up after its retries, a broken process pool) is a failed run."""
    if dask:
        from distributed import as_completed

        futures = {
            executor.submit(run_task, task, key=f"reprocess-{task.child_uid}", pure=False): task
            for task in tasks
        }
        completed: Iterable[Any] = as_completed(futures)
        cancel = executor.cancel
    else:
        futures = {executor.submit(run_task, task): task for task in tasks}
        completed = concurrent.futures.as_completed(futures)

        def cancel(pending: list[Any]) -> None:
            for future in pending:
                future.cancel()

    try:
        for future in completed:
            task = futures[future]
            try:
                outcome = future.result()
            except Exception as error:
                logger.error("run %s not reprocessed: its task failed: %s", task.raw_uid, error)
                outcome = RunOutcome(
                    task.raw_uid,
                    failed=f"the task failed ({type(error).__name__}: {error})",
                    error=_picklable(error),
                )
            yield task.raw_uid, outcome
    finally:
        if pending := [future for future in futures if not future.done()]:
            cancel(pending)
