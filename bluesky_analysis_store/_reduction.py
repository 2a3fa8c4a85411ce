"""One raw run in, one child run out: the pipeline shared by live and offline reduction.

:class:`RunReduction` receives the documents of one raw run, loads external data, runs the
reducers on each event and hands the child run's documents to a sink (the analysis store).
The live callback feeds it from the RunEngine, :func:`reprocess` from a catalog; both give
the same child data for the same raw run.
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from event_model import DocumentRouter, unpack_event_page

from ._access_tags import inherit_access_tags, start_access_tags
from ._composer import RunComposer, check_metadata
from ._confinement import check_readable
from ._data_keys import check_stream_name
from ._errors import AnalysisStoreError
from ._filling import EventFiller
from ._provenance import CheckedParent, make_provenance
from ._reducers import Reducer, as_reducer, fresh_copy, reducer_provenance
from ._writer_specs import WriterSpec, resolve_writers

__all__ = ["OnError", "ReductionPlan", "RunReduction"]

logger = logging.getLogger(__name__)

OnError = Literal["record", "raise"]
Sink = Callable[[str, dict[str, Any]], None]

# Inline key of every child event that points back at the raw event it came from: the
# child stream has the raw stream's name, so the raw seq_num identifies the event. (The raw
# event uid is not kept: a catalog does not store it, so an offline replay could not repeat
# it, and live and offline child data must be identical.)
PARENT_EVENT_KEYS = ("parent_seq_num",)
SUMMARY_STREAM = "summary"
_ASSET_DOCUMENTS = frozenset({"resource", "datum", "datum_page", "stream_resource", "stream_datum"})
# Failures kept in the child's stop document in full; the rest are only counted.
MAX_RECORDED_FAILURES = 100
MAX_LOGGED_TRACEBACKS = 5


@dataclass(frozen=True)
class ReductionPlan:
    """What to do with every raw run: settled once, before the first run arrives."""

    reducers: Sequence[Reducer]
    code: list[dict[str, Any]]
    writers: Mapping[str, WriterSpec] = field(default_factory=dict)
    array_writer: WriterSpec | None = None
    table_writer: WriterSpec | None = None
    variable_length_keys: frozenset[str] = frozenset()
    inline_keys: frozenset[str] = frozenset()
    md: Mapping[str, Any] = field(default_factory=dict)
    asset_documents: Literal["stream", "resource"] = "stream"
    on_error: OnError = "record"
    strict: bool = True
    handlers: Mapping[str, type] | None = None
    root_map: Mapping[str, str] | None = None

    @classmethod
    def for_store(
        cls,
        reducers: Iterable[Any] | Any,
        store: Any,
        *,
        streams: Iterable[str] = ("primary",),
        root: str | None = None,
        **options: Any,
    ) -> ReductionPlan:
        """The plan for a user's reducers (one or a list of functions and :class:`Reducer`
        instances) whose files go under ``root``, by default the store's asset folder."""
        if callable(reducers) or isinstance(reducers, Reducer):
            reducers = [reducers]
        streams = tuple(streams)
        plan = cls.build(
            [as_reducer(r, streams) for r in reducers],
            root=root if root is not None else getattr(store, "asset_root", None),
            **options,
        )
        # Every file a writer makes stays under its root (``confined_path``), so a root the
        # store may read means files it may read: refused now, not after the first frame.
        if (readable := getattr(store, "readable_roots", None)) is not None:
            specs = [
                *plan.writers.values(),
                *filter(None, [plan.array_writer, plan.table_writer]),
            ]
            for root_folder in sorted({spec.root for spec in specs}):
                check_readable(root_folder, readable, what="the writer root")
        return plan

    @classmethod
    def build(
        cls,
        reducers: Iterable[Reducer],
        *,
        writers: Mapping[str, Any] | None = None,
        root: str | None = None,
        md: Mapping[str, Any] | None = None,
        on_error: OnError = "record",
        strict: bool = True,
        handlers: Mapping[str, type] | None = None,
        root_map: Mapping[str, str] | None = None,
        asset_documents: Literal["stream", "resource"] = "stream",
        default_format: str | None = "HDF5",
        table_format: str | None = "PARQUET",
    ) -> ReductionPlan:
        """Check everything that can be checked before a scan: provenance, writers, md."""
        if on_error not in ("record", "raise"):
            raise AnalysisStoreError(f"on_error must be 'record' or 'raise', not {on_error!r}")
        reducers = list(reducers)
        if not reducers:
            raise AnalysisStoreError("give at least one reducer")
        code = [reducer_provenance(r) for r in reducers]
        # Refuse code that could not be imported again now, not at the first scan.
        make_provenance(["<raw run>"], (), code, strict=strict)
        writers = dict(writers or {})
        inline = frozenset(k for k, v in writers.items() if v is None or v == "inline")
        resolved = resolve_writers({k: v for k, v in writers.items() if k not in inline}, root)
        array_writer = None
        if default_format is not None:
            array_writer = resolve_writers({"*": default_format}, root)["*"]
        return cls(
            reducers=reducers,
            code=code,
            writers=resolved,
            array_writer=array_writer,
            table_writer=(
                resolve_writers({"*": table_format}, root)["*"] if table_format else None
            ),
            inline_keys=inline,
            md=check_metadata(md),
            asset_documents=asset_documents,
            on_error=on_error,
            strict=strict,
            handlers=handlers,
            root_map=root_map,
        )


class RunReduction(DocumentRouter):
    """Reduce one raw run into one child run, sent document by document to ``sink``."""

    def __init__(
        self,
        plan: ReductionPlan,
        sink: Sink,
        *,
        copy_inputs: bool = True,
        child_uid: str | None = None,
    ) -> None:
        """``copy_inputs=False`` hands reducers the raw events' own arrays, for documents
        nobody else sees (a worker process's copies). ``child_uid`` fixes the child run's
        uid (a new random one by default), so that a retried task makes the same run."""
        super().__init__()
        self._plan = plan
        self._child_uid = child_uid
        self._sink = sink
        self._reducers = [fresh_copy(r) for r in plan.reducers]
        self._filler = EventFiller(plan.handlers, plan.root_map, copy_values=copy_inputs)
        self._composer: RunComposer | None = None
        self._stream_names: dict[str, str] = {}
        # Raw streams whose name cannot name a child stream (e.g. '../x'): their events fail.
        self._refused_streams: dict[str, AnalysisStoreError] = {}
        self.events_reduced = 0
        self.events_failed = 0
        self.failures: list[dict[str, Any]] = []
        self.child_uid: str | None = None
        self.parent_scan_id: int | None = None
        self.exit_status: str | None = None  # the child stop's, once it is journaled
        self.done = False
        self.raised: Exception | None = None  # what on_error="raise" let through

    # --- raw documents ------------------------------------------------------------------

    def __call__(self, name: str, doc: dict[str, Any], validate: bool = False) -> Any:
        if name in _ASSET_DOCUMENTS:  # they only tell the filler where external data is
            self._filler(name, doc)
            return name, doc
        return super().__call__(name, doc, validate)

    def start(self, doc: dict[str, Any]) -> None:
        # The parent's own start document is in hand: the parent is verified.
        parent = CheckedParent(doc["uid"], "start document")
        self.parent_scan_id = doc.get("scan_id")
        parent_uids, provenance = make_provenance(
            [parent], (), self._plan.code, strict=self._plan.strict
        )
        md = {
            **self._plan.md,
            "parent_uids": parent_uids,
            "provenance": provenance,
        }
        for raw_key, child_key in (
            ("scan_id", "parent_scan_id"),
            ("plan_name", "parent_plan_name"),
        ):
            if raw_key in doc and child_key not in md:
                md[child_key] = doc[raw_key]
        md = inherit_access_tags(md, [start_access_tags(doc)])
        self._composer = RunComposer(
            md,
            self._plan.writers,
            asset_documents=self._plan.asset_documents,
            array_writer=self._plan.array_writer,
            table_writer=self._plan.table_writer,
            variable_length_keys=self._plan.variable_length_keys,
            inline_keys=self._plan.inline_keys,
            uid=self._child_uid,
        )
        self.child_uid = self._composer.uid
        self._filler("start", doc)
        self._emit(self._composer.start(), stage="saving the child start")
        for reducer in self._reducers:
            self._guard(reducer.start, doc, stage=f"{_name(reducer)}.start")

    def descriptor(self, doc: dict[str, Any]) -> None:
        self._stream_names[doc["uid"]] = doc["name"]
        if doc["name"] not in self._refused_streams:
            try:  # the child stream takes the raw stream's name: a folder and a catalog node
                check_stream_name(doc["name"])
            except AnalysisStoreError as error:
                self._refused_streams[doc["name"]] = error
                self._fail(error, "naming the child stream", {"stream": doc["name"]})
        self._filler("descriptor", doc)
        for reducer in self._reducers:
            self._guard(reducer.descriptor, doc, stage=f"{_name(reducer)}.descriptor")

    def event_page(self, doc: dict[str, Any]) -> None:
        for event in unpack_event_page(doc):
            self.event(event)

    def event(self, doc: dict[str, Any]) -> None:
        stream = self._stream_names.get(doc["descriptor"])
        if stream is None or self._composer is None:
            logger.warning("event %s of an unknown stream or run is skipped", doc["uid"])
            return
        where = {"stream": stream, "seq_num": doc["seq_num"], "event_uid": doc["uid"]}
        if stream in self._refused_streams:
            self.events_failed += 1  # recorded once, at its descriptor
            return
        stage = "loading external data"
        try:
            data = self._filler.fill(doc)
            derived: dict[str, Any] = {}
            for reducer in self._reducers:
                stage = f"{_name(reducer)}.event"
                _merge(derived, reducer.event(stream, data, doc), reducer)
            if not derived:
                return
            stage = "writing derived data"
            derived["parent_seq_num"] = doc["seq_num"]
            documents = self._composer.event(stream, derived)
        except Exception as error:
            self._fail(error, stage, where)
            return
        if self._emit(documents, stage="saving derived data", where=where):
            self.events_reduced += 1

    def stop(self, doc: dict[str, Any]) -> None:
        if self._composer is None:
            return
        for reducer in self._reducers:
            stage = f"{_name(reducer)}.stop"
            try:
                values = reducer.stop(doc)
                if values:
                    summary: dict[str, Any] = {}
                    _merge(summary, values, reducer)
                    self._emit(self._composer.event(SUMMARY_STREAM, summary), stage=stage)
            except Exception as error:
                self._fail(error, stage, {"stream": SUMMARY_STREAM})
        self._filler("stop", doc)
        self._filler.close()
        reduction = {
            "events_reduced": self.events_reduced,
            "events_failed": self.events_failed,
            "failures": self.failures,
            "raw_exit_status": doc.get("exit_status"),
        }
        self._finish(doc.get("exit_status", "success"), doc.get("reason", ""), reduction)
        # The live callback's session prints its own summary line of each scan.
        logger.debug(
            "child run %s of raw run %s: %d events reduced, %d failed",
            self.child_uid,
            doc.get("run_start"),
            self.events_reduced,
            self.events_failed,
        )

    def interrupt(self, reason: str) -> None:
        """End the child run of a raw run that will not be completed: a stop of
        ``exit_status: "fail"`` saying why, with what was reduced until now."""
        if self._composer is None or self.done:
            return
        self._filler.close()
        reduction = {
            "events_reduced": self.events_reduced,
            "events_failed": self.events_failed,
            "failures": self.failures,
            "raw_exit_status": None,
            "interrupted": True,
        }
        self._finish("fail", reason, reduction)

    def _finish(self, exit_status: str, reason: str, reduction: dict[str, Any]) -> None:
        assert self._composer is not None
        documents = self._composer.stop(exit_status=exit_status, reason=reason, reduction=reduction)
        # Done only once the stop is journaled: until then the child is not closed.
        self.done = self._emit(documents, stage="saving the child stop")
        if self.done:
            self.exit_status = exit_status

    def close(self) -> None:
        """Release open files of a run that will not be completed."""
        if self._composer is not None:
            self._composer.close()
        self._filler.close()

    # --- failures -----------------------------------------------------------------------

    def _guard(self, func: Callable[..., Any], *args: Any, stage: str) -> None:
        try:
            func(*args)
        except Exception as error:
            self._fail(error, stage, {})

    def _emit(
        self,
        documents: Iterable[tuple[str, dict[str, Any]]],
        *,
        stage: str,
        where: Mapping[str, Any] | None = None,
    ) -> bool:
        try:
            write_all = getattr(self._sink, "write_all", None)
            if write_all is not None:  # one event's documents: journaled all or none
                write_all(list(documents))
            else:
                for name, doc in documents:
                    self._sink(name, doc)
        except Exception as error:
            self._fail(error, stage, where or {})
            return False
        return True

    def _fail(self, error: Exception, stage: str, where: Mapping[str, Any]) -> None:
        if self._plan.on_error == "raise":
            self.raised = error
            raise error
        if where.get("seq_num") is not None:
            self.events_failed += 1
        record = {
            **where,
            "stage": stage,
            "error": f"{type(error).__name__}: {error}",
            "time": time.time(),
        }
        if len(self.failures) < MAX_RECORDED_FAILURES:
            record["traceback"] = "".join(traceback.format_exception(error))
            self.failures.append(record)
        if len(self.failures) <= MAX_LOGGED_TRACEBACKS:
            logger.error("reduction failed while %s (%s)", stage, where, exc_info=error)
        else:
            logger.error("reduction failed while %s (%s): %s", stage, where, record["error"])


def _name(reducer: Reducer) -> str:
    code = reducer.code
    while isinstance(code, functools.partial):
        code = code.func
    return getattr(code, "__qualname__", None) or type(code).__qualname__


def _merge(into: dict[str, Any], values: Any, reducer: Reducer) -> None:
    if values is None:
        return
    if not isinstance(values, Mapping):
        raise AnalysisStoreError(
            f"reducer {_name(reducer)} returned {type(values).__name__}, not a dict of "
            "derived values"
        )
    if taken := into.keys() & values.keys():
        raise AnalysisStoreError(
            f"reducer {_name(reducer)} returns {sorted(taken)}, which another reducer returns too"
        )
    if reserved := set(PARENT_EVENT_KEYS) & values.keys():
        raise AnalysisStoreError(
            f"reducer {_name(reducer)} returns reserved keys {sorted(reserved)}"
        )
    into.update(values)
