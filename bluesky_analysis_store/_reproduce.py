"""Checking that a saved child run still follows from its recorded inputs and code."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._errors import AnalysisStoreError, ProvenanceError
from ._provenance import code_record, resolve_code_name, sha256_of_file
from ._reducers import FunctionReducer, Reducer
from ._reduction import ReductionPlan, RunReduction
from ._replay import count_events, replay_run, stop_document, stream_lengths

__all__ = ["Difference", "ReproduceReport", "reproduce"]

logger = logging.getLogger(__name__)

# What must match between the recorded and the importable code for a faithful re-run.
_IDENTITY_FIELDS = ("version", "commit", "dirty", "sha256")


@dataclass(frozen=True)
class Difference:
    """The first place where the re-run and the saved child run disagree."""

    stream: str
    key: str | None
    seq_num: int | None
    detail: str

    def __str__(self) -> str:
        where = f"stream {self.stream!r}"
        if self.key is not None:
            where += f", key {self.key!r}"
        if self.seq_num is not None:
            where += f", event seq_num {self.seq_num}"
        return f"{where}: {self.detail}"


@dataclass
class ReproduceReport:
    child_uid: str
    identical: bool = True
    events_compared: int = 0
    difference: Difference | None = None
    code_changes: list[str] = field(default_factory=list)
    file_changes: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    """Runs without a stop document met on the way: the child, or a parent."""

    def __str__(self) -> str:
        notes = [f"  incomplete: {note}" for note in self.incomplete]
        if self.identical:
            first = f"child run {self.child_uid} reproduced: {self.events_compared} events"
            return "\n".join([first + " identical", *notes])
        lines = [f"child run {self.child_uid} NOT reproduced", *notes]
        lines += [f"  input file changed: {c}" for c in self.file_changes]
        lines += [f"  code changed: {c}" for c in self.code_changes]
        if self.difference is not None:
            lines.append(f"  first difference: {self.difference}")
        return "\n".join(lines)


def _load_code(record: Mapping[str, Any]) -> Any:
    name = record["name"]
    module_name, _, qualname = name.partition(":")
    if module_name == "__main__" and record.get("file"):
        # Code from a script or an IPython profile: load its file again.
        spec = importlib.util.spec_from_file_location("_reproduced_main", record["file"])
        if spec is None or spec.loader is None:
            raise ProvenanceError(f"cannot load {record['file']!r} to find {name!r}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        obj: Any = module
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj
    return resolve_code_name(name)


def _code_change(record: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """How the importable code differs from the record, or None if it is the same.

    A source file identical to the byte (same sha256) is the same code even where the
    checkout has moved to another commit; otherwise the version, commit and dirty state
    decide.
    """
    same_source = "sha256" in record and record["sha256"] == current.get("sha256")
    fields = ("version",) if same_source and "distribution" in record else _IDENTITY_FIELDS
    if same_source and "distribution" not in record:
        return None
    changed = [
        f"{f} {record[f]!r} -> {current.get(f)!r}"
        for f in fields
        if f in record and record[f] != current.get(f)
    ]
    return f"{record['name']}: " + ", ".join(changed) if changed else None


def _reducer_from(record: Mapping[str, Any], obj: Any) -> Reducer:
    params = dict(record.get("params", {}))
    summarised = [k for k, v in params.items() if isinstance(v, Mapping) and "sha256" in v]
    if summarised:
        raise ProvenanceError(
            f"{record['name']} has parameters recorded only as summaries ({summarised}); "
            "pass reducers=[...] built with the same values"
        )
    if isinstance(obj, type) and issubclass(obj, Reducer):
        return obj(**params)
    args = params.pop("args", [])
    func = functools.partial(obj, *args, **params) if (args or params) else obj
    return FunctionReducer(func, record.get("streams", ("primary",)))


def reproduce(
    store: Any,
    child_uid: str,
    source: Any = None,
    *,
    reducers: list[Reducer] | None = None,
    allow_changed_code: bool = False,
    progress: bool | None = None,
) -> ReproduceReport:
    """Re-run a child run's recorded code on its recorded inputs and compare, value by value.

    The code is imported again by its recorded name; if its version, commit or source hash
    differs from the record, :class:`ProvenanceError` says how, unless
    ``allow_changed_code``. Input files are checked against their sha256. Parents are read
    from ``source`` (a tiled client or :class:`AnalysisStore`; default: ``store``) and
    replayed through the live pipeline. Arrays are compared exactly (value, dtype, shape).

    A child without a stop document (interrupted while it was written) is compared as far
    as it goes: a re-run that makes more events than it holds does not reproduce it. A
    parent without one is re-run up to its last saved event. Both are named in the report's
    ``incomplete``.
    """
    from tqdm.auto import tqdm

    child = store[child_uid]
    start = child.start
    provenance = start.get("provenance")
    if not provenance:
        raise ProvenanceError(f"run {child_uid} has no provenance record")
    report = ReproduceReport(child_uid)
    if stop_document(child) is None:
        report.incomplete.append(
            f"child run {child_uid} has no stop document (interrupted?): compared as far as it goes"
        )

    for record in provenance.get("files", []):
        path = record["path"]
        if not os.path.isfile(path):
            report.file_changes.append(f"{path} is missing")
        elif (digest := sha256_of_file(path)) != record["sha256"]:
            report.file_changes.append(f"{path}: sha256 {record['sha256'][:12]}… -> {digest[:12]}…")

    code = provenance.get("code", [])
    loaded = []
    for record in code:
        if not record.get("importable", True):
            raise ProvenanceError(f"{record['name']} was recorded as not importable")
        obj = _load_code(record)
        change = _code_change(record, code_record(obj))
        if change:
            report.code_changes.append(change)
        loaded.append((record, obj))
    if report.code_changes and not allow_changed_code:
        raise ProvenanceError(
            "the code differs from the recorded code: "
            + "; ".join(report.code_changes)
            + ". Install the recorded version, or allow the changed code to run anyway."
        )

    parents = provenance.get("parents", [])
    if parents:
        if reducers is None:
            reducers = [_reducer_from(record, obj) for record, obj in loaded]
        plan = ReductionPlan.build(reducers, default_format=None, strict=False)
        client = getattr(source if source is not None else store, "client", source)
        if progress is None:
            progress = sys.stderr.isatty()
        for parent in parents:
            raw = client[parent["uid"]]
            if stop_document(raw) is None:
                report.incomplete.append(
                    f"parent run {parent['uid']} has no stop document (interrupted?): "
                    "re-run up to its last saved event"
                )
            _compare_with_rerun(raw, child, plan, report, progress, tqdm)
    report.identical = (
        not report.file_changes and report.difference is None and (not report.code_changes)
    )
    logger.info("%s", report)
    return report


class _Comparison:
    """A sink for the re-run's documents that compares each event with the saved child."""

    def __init__(self, child: Any, report: ReproduceReport) -> None:
        self._child = child
        self._report = report
        self._streams = set(child)
        self._lengths = stream_lengths(child)
        self._descriptor_streams: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "descriptor":
            self._descriptor_streams[doc["uid"]] = doc["name"]
        elif name == "event" and self._report.difference is None:
            self._compare(self._descriptor_streams[doc["descriptor"]], doc)

    def _differ(self, stream: str, key: str | None, seq_num: int | None, detail: str) -> None:
        self._report.difference = Difference(stream, key, seq_num, detail)

    def _compare(self, stream: str, event: dict[str, Any]) -> None:
        seq_num = event["seq_num"]
        self.counts[stream] = self.counts.get(stream, 0) + 1
        self._report.events_compared += 1
        if stream not in self._streams:
            return self._differ(stream, None, seq_num, "the saved child run has no such stream")
        rows = self._lengths[stream]
        if seq_num > rows:  # first: an interrupted child's stream may not even have columns
            return self._differ(stream, None, seq_num, f"the saved stream has only {rows} events")
        saved_stream = self._child[stream]
        saved_keys = set(saved_stream) - {"seq_num", "time"} - {f"ts_{k}" for k in event["data"]}
        if saved_keys != set(event["data"]):
            return self._differ(
                stream,
                None,
                seq_num,
                f"keys differ: saved {sorted(saved_keys)}, re-run {sorted(event['data'])}",
            )
        for key, value in event["data"].items():
            saved = np.asarray(saved_stream[key][seq_num - 1])
            fresh = np.asarray(value)
            if detail := _array_difference(saved, fresh):
                return self._differ(stream, key, seq_num, detail)
        return None

    def check_counts(self) -> None:
        if self._report.difference is not None:
            return
        for stream in sorted(self._streams):
            saved = self._lengths[stream]
            fresh = self.counts.get(stream, 0)
            if saved != fresh:
                self._differ(stream, None, None, f"saved {saved} events, re-run made {fresh}")
                return


def _array_difference(saved: np.ndarray, fresh: np.ndarray) -> str | None:
    if saved.shape != fresh.shape:
        return f"shape {saved.shape} saved, {fresh.shape} re-run"
    if saved.dtype.kind in "US" or fresh.dtype.kind in "US":
        return None if saved.tolist() == fresh.tolist() else f"{saved!r} saved, {fresh!r} re-run"
    if saved.dtype != fresh.dtype:
        return f"dtype {saved.dtype} saved, {fresh.dtype} re-run"
    if np.array_equal(saved, fresh, equal_nan=saved.dtype.kind in "fc"):
        return None
    if saved.ndim == 0:
        return f"{saved.item()!r} saved, {fresh.item()!r} re-run"
    same = saved == fresh
    if saved.dtype.kind in "fc":
        same |= np.isnan(saved) & np.isnan(fresh)
    unequal = np.argwhere(~same)
    first = tuple(int(i) for i in unequal[0])
    return (
        f"{len(unequal)} of {saved.size} elements differ; first at index {first}: "
        f"{saved[first]!r} saved, {fresh[first]!r} re-run"
    )


def _compare_with_rerun(
    raw: Any, child: Any, plan: ReductionPlan, report: ReproduceReport, progress: bool, tqdm: Any
) -> None:
    comparison = _Comparison(child, report)
    reduction = RunReduction(plan, comparison)
    with tqdm(total=count_events(raw), desc="reproduce", unit="event", disable=not progress) as bar:
        for name, doc in replay_run(raw, stand_in=True):
            reduction(name, doc)
            if name == "event":
                bar.update()
    if failures := [f for f in reduction.failures if "seq_num" in f]:
        saved_failed = (stop_document(child) or {}).get("reduction", {}).get("events_failed", 0)
        if len(failures) != saved_failed and report.difference is None:
            first = failures[0]
            report.difference = Difference(
                first.get("stream", "?"),
                None,
                first.get("seq_num"),
                f"the re-run failed: {first['error']}",
            )
    comparison.check_counts()
    if report.difference is None and not reduction.done:
        raise AnalysisStoreError("the re-run did not complete")
