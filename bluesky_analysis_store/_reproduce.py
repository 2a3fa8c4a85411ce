"""Checking that a saved child run still follows from its recorded inputs and code."""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from ._errors import AnalysisStoreError, ProvenanceError
from ._provenance import code_record, resolve_code_name, sha256_of_file
from ._recorded_code import load_definition_from_file, load_recorded_code
from ._reducers import FunctionReducer, Reducer
from ._reduction import ReductionPlan, RunReduction
from ._replay import (
    StreamNode,
    count_events,
    events_of_value_table,
    replay_run,
    stop_document,
    stream_lengths,
)
from ._table_values import is_ragged_key

__all__ = ["Difference", "ReproduceReport", "reproduce"]

logger = logging.getLogger(__name__)

# What must match between the recorded and the importable code for a faithful re-run.
_IDENTITY_FIELDS = ("version", "commit", "dirty", "sha256")
# A saved column is read in one piece up to this size, else in blocks of rows of this size.
_READ_BYTES = 64 << 20
_TABLE_COLUMNS = frozenset({"seq_num", "time"})

Verdict = Literal["identical", "within tolerance", "differ", "not compared", "nothing compared"]
KeyVerdict = Literal["identical", "within tolerance", "differ", "not compared"]


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
class KeyComparison:
    """How one key of one stream compared, over every event of the re-run."""

    verdict: KeyVerdict = "identical"
    events: int = 0
    """Events whose values of this key were compared."""
    detail: str | None = None
    """Where it first differed, or why it could not be compared."""

    def note(self, verdict: KeyVerdict, detail: str) -> None:
        """Record a worse verdict than the one so far (the first detail of each is kept)."""
        order = ("identical", "within tolerance", "not compared", "differ")
        if order.index(verdict) > order.index(self.verdict):
            self.verdict, self.detail = verdict, detail


@dataclass
class ReproduceReport:
    """What :func:`reproduce` found. ``identical``: unchanged code and input files, and every
    value equal (value, dtype, shape). ``reproduced``: the same, with values equal within
    the tolerances given."""

    child_uid: str
    identical: bool = True
    events_compared: int = 0
    difference: Difference | None = None
    code_changes: list[str] = field(default_factory=list)
    file_changes: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    """Runs without a stop document met on the way: the child, or a parent."""
    values: Verdict = "not compared"
    """The re-run's values against the saved ones, whatever code ran: ``identical``,
    ``within tolerance`` (of ``rtol``/``atol``), ``differ`` (see ``difference``), or ``not
    compared`` (a run with no parents, such as an ingested one: only its files are checked)."""
    rtol: float = 0.0
    atol: float = 0.0
    largest_deviation: str | None = None
    """Where the values differ most while within tolerance."""
    code_loaded: list[str] = field(default_factory=list)
    """Which code ran for each code record: installed, or recorded (and its hash checked)."""
    keys: dict[str, dict[str, KeyComparison]] = field(default_factory=dict)
    """stream -> key -> how that key compared (every key of the saved child and of the
    re-run)."""
    events_saved: int = 0
    """Events the saved child holds, over all its streams."""
    events_failed_saved: int = 0
    """Events that failed when the child was made (its stop's reduction record)."""
    events_failed: int = 0
    """Events on which the re-run failed."""
    first_failure: str | None = None
    """The re-run's first failure: where, in which reducer, and the error."""
    first_failure_at: tuple[str, int | None] | None = field(default=None, repr=False)

    @property
    def reproduced(self) -> bool:
        """Files and code unchanged and the values equal (within the tolerances); a child
        with parents of which no value could be compared (every event failed, or it has no
        events) is not reproduced: nothing was."""
        return (
            not self.file_changes
            and not self.code_changes
            and self.values in ("identical", "within tolerance", "not compared")
        )

    def __str__(self) -> str:
        notes = [f"  incomplete: {note}" for note in self.incomplete]
        comparison = self._comparison_lines()
        if self.identical:
            first = f"child run {self.child_uid} reproduced: {self.events_compared} events"
            return "\n".join([first + " identical", *notes, *comparison])
        if self.reproduced:
            first = (
                f"child run {self.child_uid} reproduced: {self.events_compared} events "
                f"{self._verdict()}"
            )
            return "\n".join([first, *notes, *comparison])
        nothing = ": nothing was compared" if self.values == "nothing compared" else ""
        lines = [f"child run {self.child_uid} NOT reproduced{nothing}", *notes]
        lines += [f"  input file changed: {c}" for c in self.file_changes]
        lines += [f"  code changed: {c}" for c in self.code_changes]
        if self.values not in ("not compared", "nothing compared"):
            lines.append(f"  values: {self._verdict()}")
        lines += comparison
        if self.difference is not None:
            lines.append(f"  first difference: {self.difference}")
        return "\n".join(lines)

    def _comparison_lines(self) -> list[str]:
        """What was compared: per stream, its events and which keys were identical, which
        differed, which could not be compared; and the events that failed."""
        if self.values == "not compared":
            return []
        lines = []
        if self.values == "nothing compared":
            saved = f"the saved child holds {self.events_saved} events"
            if self.events_failed_saved:
                saved += f"; {self.events_failed_saved} failed when it was made"
            lines.append(f"  {saved}")
        for stream, keys in sorted(self.keys.items()):
            events = max((c.events for c in keys.values()), default=0)
            lines.append(f"  stream {stream!r}: {events} events compared, {len(keys)} keys")
            for verdict in ("identical", "within tolerance", "differ", "not compared"):
                named = [
                    key + (f" ({c.detail})" if c.detail and verdict != "identical" else "")
                    for key, c in sorted(keys.items())
                    if c.verdict == verdict
                ]
                if named:
                    lines.append(f"    {verdict}: {', '.join(named)}")
        if self.events_failed:
            lines.append(
                f"  the re-run failed on {self.events_failed} events (the child records "
                f"{self.events_failed_saved} failed); first: {self.first_failure}"
            )
        return lines

    def _verdict(self) -> str:
        if self.values == "within tolerance":
            deviation = f"; largest: {self.largest_deviation}" if self.largest_deviation else ""
            return f"within tolerance (rtol={self.rtol:g}, atol={self.atol:g}){deviation}"
        return self.values


def _load_code(
    record: Mapping[str, Any], trust_recorded_code: bool, report: ReproduceReport
) -> Any:
    """The code a record names: installed code of the same identity first, then the code
    recorded with the child (only if trusted, and after its hash is checked), then installed
    code that changed (named in ``report.code_changes``). Nothing is run from a file that
    the record names: a script's or a profile's top level never runs again."""
    name = record["name"]
    module_name = name.partition(":")[0]
    installed, change = None, None
    try:
        installed = resolve_code_name(name)
    except ProvenanceError:
        pass
    if installed is not None:
        current = code_record(installed)
        if module_name == "__main__":
            # ``__main__`` here is this process's: the same definition only by its source.
            if record.get("source_sha256") and current.get("source_sha256") == record.get(
                "source_sha256"
            ):
                report.code_loaded.append(f"{name}: the same definition in this session")
                return installed
            installed = None
        elif not (change := _code_change(record, current)):
            report.code_loaded.append(f"{name}: installed, same identity")
            return installed
    if "recorded_code" in record or (module_name == "__main__" and record.get("file")):
        if trust_recorded_code:
            if "recorded_code" in record:
                obj = load_recorded_code(record)
                how = f"recorded source, sha256 {record['source_sha256'][:12]}… checked"
            else:
                obj = load_definition_from_file(record)
                how = f"its definition alone from {record['file']}, sha256 checked"
            note = f" (installed code differs: {change})" if change else ""
            report.code_loaded.append(f"{name}: {how}{note}")
            return obj
        if installed is None:
            raise ProvenanceError(_untrusted_message(record))
    if installed is None:
        raise ProvenanceError(
            f"{name} cannot be imported here and no code is recorded for it: install it, or "
            "pass reducers=[...]"
        )
    report.code_changes.append(change or f"{name}: changed")
    report.code_loaded.append(f"{name}: installed, changed")
    return installed


def _untrusted_message(record: Mapping[str, Any]) -> str:
    name = record["name"]
    if "recorded_code" in record:
        what = (
            f"its source is recorded with the child run (source sha256 "
            f"{str(record.get('source_sha256'))[:12]}…)"
        )
    else:
        what = f"it can be taken alone from {record['file']} if that file's sha256 matches"
    return (
        f"{name} cannot be imported here (it was defined in a script, an IPython profile or at "
        f"the prompt); {what}. Read it (bluesky-analysis-store show UID --json), then pass "
        "trust_recorded_code=True (--trust-recorded-code) to run that definition alone"
    )


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
    trust_recorded_code: bool = False,
    rtol: float = 0.0,
    atol: float = 0.0,
    allow_changed_code: bool | None = None,
    progress: bool | None = None,
) -> ReproduceReport:
    """Re-run a child run's recorded code on its recorded inputs and compare, value by value.

    Code is taken, for each code record, from (1) code installed here, importable by its
    recorded name, of the same identity (version, commit, source hash); else (2) the code
    recorded with the child (the definition of a reducer made in a script, an IPython
    profile or at the prompt), only when ``trust_recorded_code`` and after its sha256 is
    checked; only that definition runs, never the rest of its file; else (3) installed code
    that changed, which runs and is named in ``code_changes``: the report then says how the
    values compare all the same. Input files are checked against their sha256. Parents are
    read from ``source`` (a tiled client or :class:`AnalysisStore`; default: ``store``) and
    replayed through the live pipeline. Values are compared by dtype and shape, and by value
    exactly, or within ``rtol``/``atol`` (as :func:`numpy.isclose`) for numbers.

    A child without a stop document (interrupted while it was written) is compared as far
    as it goes: a re-run that makes more events than it holds does not reproduce it. A
    parent without one is re-run up to its last saved event. Both are named in the report's
    ``incomplete``.

    ``allow_changed_code`` is deprecated: changed code is always run and compared now
    (``False`` still refuses it with :class:`ProvenanceError`).
    """
    from tqdm.auto import tqdm

    if allow_changed_code is not None:
        warnings.warn(
            "reproduce(allow_changed_code=...) is deprecated: changed code is run and "
            "compared, and the report names the change",
            DeprecationWarning,
            stacklevel=2,
        )
    for name, tolerance in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance)) or tolerance < 0:
            raise AnalysisStoreError(f"{name} must be a finite number >= 0, not {tolerance!r}")

    child = store[child_uid]
    start = child.start
    provenance = start.get("provenance")
    if not provenance:
        raise ProvenanceError(f"run {child_uid} has no provenance record")
    report = ReproduceReport(child_uid, rtol=float(rtol), atol=float(atol))
    saved_reduction = (stop_document(child) or {}).get("reduction") or {}
    if isinstance(saved_reduction.get("events_failed"), int):
        report.events_failed_saved = saved_reduction["events_failed"]
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

    parents = provenance.get("parents", [])
    code = provenance.get("code", [])
    loaded = []
    if reducers is None or not parents:
        for record in code:
            if not record.get("importable", True) and "recorded_code" not in record:
                raise ProvenanceError(f"{record['name']} was recorded as not importable")
            loaded.append((record, _load_code(record, trust_recorded_code, report)))
    if report.code_changes and allow_changed_code is False:
        raise ProvenanceError(
            "the code differs from the recorded code: "
            + "; ".join(report.code_changes)
            + ". Install the recorded version, or allow the changed code to run anyway."
        )

    if parents:
        if reducers is None:
            reducers = [_reducer_from(record, obj) for record, obj in loaded]
        else:
            report.code_loaded.append("reducers given by the caller: the recorded code not run")
        # Nothing is written: every value, tables too, stays in the events compared; the
        # keys saved as variable-length may change length in the re-run too.
        plan = ReductionPlan.build(reducers, default_format=None, table_format=None, strict=False)
        plan = replace(plan, variable_length_keys=_variable_length_keys(child))
        client = getattr(source if source is not None else store, "client", source)
        if progress is None:
            progress = sys.stderr.isatty()
        comparison = _Comparison(child, report, rtol=float(rtol), atol=float(atol))
        for parent in parents:
            raw = client[parent["uid"]]
            if stop_document(raw) is None:
                report.incomplete.append(
                    f"parent run {parent['uid']} has no stop document (interrupted?): "
                    "re-run up to its last saved event"
                )
            _rerun(raw, child, plan, comparison, report, progress, tqdm)
        if report.events_failed != report.events_failed_saved and report.difference is None:
            stream, seq_num = report.first_failure_at or ("?", None)
            failed = f"the re-run failed on {report.events_failed} events, the child records "
            report.difference = Difference(
                stream,
                None,
                seq_num,
                failed + f"{report.events_failed_saved}; first: {report.first_failure}",
            )
        comparison.check_counts()
        report.values = comparison.verdict()
    report.identical = (
        not report.file_changes
        and not report.code_changes
        and (report.values in ("identical", "not compared"))
    )
    logger.info("%s", report)
    return report


class _SavedStream:
    """One stream of the saved child, each column read once (in blocks of bounded size when
    large) and kept for the comparison: not one request per event and key."""

    def __init__(self, node: Any) -> None:
        self._node = node
        self._parts = StreamNode(node)  # a table-valued key is one key, not its columns
        names = set(self._parts.keys)
        self.keys = {
            k
            for k in names - _TABLE_COLUMNS
            if not (k.startswith("ts_") and k.removeprefix("ts_") in names)
        }
        descriptors = getattr(node, "descriptors", None) or [{}]
        self._data_keys = descriptors[0].get("data_keys", {})
        self._scalars = {
            k for k in self.keys if self._data_keys.get(k, {}).get("shape", [None]) == []
        }
        self._table: dict[str, np.ndarray] | None = None
        self._blocks: dict[str, tuple[int, np.ndarray]] = {}
        self._value_tables: dict[str, Any] = {}

    def value(self, key: str, row: int) -> Any:
        if self._data_keys.get(key, {}).get("shape") == [None]:  # tables, variable lengths
            if key not in self._value_tables:
                self._value_tables[key] = events_of_value_table(
                    self._parts[key], key, self._data_keys[key]
                )
            return self._value_tables[key](row + 1)
        if key in self._scalars:
            table = self._read_table()
            if key in table:
                return np.asarray(table[key][row])
        start, block = self._blocks.get(key, (0, None))
        if block is None or not start <= row < start + len(block):
            column = self._node[key]
            shape = tuple(column.shape)
            row_bytes = max(1, column.dtype.itemsize * math.prod(shape[1:]))
            rows = max(1, _READ_BYTES // row_bytes)
            start = row - row % rows
            block = np.asarray(column.read() if rows >= shape[0] else column[start : start + rows])
            self._blocks[key] = (start, block)
        return np.asarray(block[row - start])

    def _read_table(self) -> dict[str, np.ndarray]:
        if self._table is None:
            self._table = {}
            base = getattr(self._node, "base", None)
            try:
                internal = base["internal"] if base is not None and "internal" in base else None
            except (KeyError, TypeError):
                internal = None
            if internal is not None:  # every scalar column of the stream in one request
                frame = internal.read()
                self._table = {str(c): frame[c].to_numpy() for c in frame.columns}
        return self._table


class _Comparison:
    """A sink for the re-run's documents that compares each event with the saved child,
    key by key, over every event: the report's ``difference`` is the first place they
    disagree, its ``keys`` how each key compared."""

    def __init__(self, child: Any, report: ReproduceReport, *, rtol: float, atol: float) -> None:
        self._child = child
        self._report = report
        self._rtol, self._atol = rtol, atol
        self._streams = set(child)
        self._lengths = stream_lengths(child)
        self._saved: dict[str, _SavedStream] = {}
        self._descriptor_streams: dict[str, str] = {}
        self._largest = (0.0, "")
        self.counts: dict[str, int] = {}
        report.events_saved = sum(self._lengths.values())

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "descriptor":
            self._descriptor_streams[doc["uid"]] = doc["name"]
        elif name == "event":
            self._compare(self._descriptor_streams[doc["descriptor"]], doc)

    def _differ(self, stream: str, key: str | None, seq_num: int | None, detail: str) -> None:
        if self._report.difference is None:
            self._report.difference = Difference(stream, key, seq_num, detail)

    def _key(self, stream: str, key: str) -> KeyComparison:
        return self._report.keys.setdefault(stream, {}).setdefault(key, KeyComparison())

    def _not_compared(self, stream: str, keys: Any, why: str) -> None:
        for key in keys:
            self._key(stream, key).note("not compared", why)

    def _compare(self, stream: str, event: dict[str, Any]) -> None:
        seq_num = event["seq_num"]
        self.counts[stream] = self.counts.get(stream, 0) + 1
        if stream not in self._streams:
            self._not_compared(stream, event["data"], "the saved child has no such stream")
            return self._differ(stream, None, seq_num, "the saved child run has no such stream")
        rows = self._lengths[stream]
        if seq_num > rows:  # first: an interrupted child's stream may not even have columns
            why = f"the saved stream has only {rows} events"
            self._not_compared(stream, event["data"], why)
            return self._differ(stream, None, seq_num, why)
        if stream not in self._saved:
            self._saved[stream] = _SavedStream(self._child[stream])
            for key in self._saved[stream].keys:
                self._key(stream, key)
        saved_stream = self._saved[stream]
        fresh_keys = set(event["data"])
        if saved_stream.keys != fresh_keys:
            self._not_compared(stream, fresh_keys - saved_stream.keys, "not in the saved child")
            self._not_compared(stream, saved_stream.keys - fresh_keys, "the re-run made none")
            self._differ(
                stream,
                None,
                seq_num,
                f"keys differ: saved {sorted(saved_stream.keys)}, re-run {sorted(fresh_keys)}",
            )
        self._report.events_compared += 1
        for key in [k for k in event["data"] if k in saved_stream.keys]:  # the event's order
            comparison = self._key(stream, key)
            comparison.events += 1
            saved = saved_stream.value(key, seq_num - 1)
            detail, deviation = _value_difference(saved, event["data"][key], self._rtol, self._atol)
            if detail:
                comparison.note("differ", f"first at seq_num {seq_num}")
                self._differ(stream, key, seq_num, detail)
            elif deviation is not None:
                comparison.note("within tolerance", deviation[1])
                if deviation[0] > self._largest[0]:
                    where = f"stream {stream!r}, key {key!r}, event seq_num {seq_num}"
                    self._largest = (deviation[0], f"{where}: {deviation[1]}")
        return None

    def check_counts(self) -> None:
        for stream in sorted(self._streams):
            saved = self._lengths[stream]
            fresh = self.counts.get(stream, 0)
            if saved != fresh:
                self._differ(stream, None, None, f"saved {saved} events, re-run made {fresh}")
                if stream not in self._saved and saved:  # its keys were never reached
                    keys = _SavedStream(self._child[stream]).keys
                    self._not_compared(stream, keys, "the re-run made no event of this stream")

    def verdict(self) -> Verdict:
        if self._report.difference is not None:
            return "differ"
        if not self._report.events_compared:
            return "nothing compared"
        if self._largest[1]:
            self._report.largest_deviation = self._largest[1]
            return "within tolerance"
        return "identical"


def _variable_length_keys(child: Any) -> frozenset[str]:
    """The keys of ``child``'s streams saved as variable-length arrays (not tables)."""
    keys = set()
    for name in child:
        for descriptor in getattr(child[name], "descriptors", None) or []:
            for key, data_key in (descriptor.get("data_keys") or {}).items():
                if is_ragged_key(data_key):
                    keys.add(key)
    return frozenset(keys)


def _value_difference(
    saved: Any, fresh: Any, rtol: float, atol: float
) -> tuple[str | None, tuple[float, str] | None]:
    """:func:`_array_difference` of two values; tables column by column (same columns, in
    the same order, each compared as an array)."""
    if not (hasattr(saved, "columns") or hasattr(fresh, "columns")):
        return _array_difference(np.asarray(saved), np.asarray(fresh), rtol, atol)
    if not (hasattr(saved, "columns") and hasattr(fresh, "columns")):
        return f"{type(saved).__name__} saved, {type(fresh).__name__} re-run", None
    if list(saved.columns) != list(fresh.columns):
        return f"columns {list(saved.columns)} saved, {list(fresh.columns)} re-run", None
    largest: tuple[float, str] | None = None
    for column in saved.columns:
        detail, deviation = _array_difference(
            _column_array(saved[column]), _column_array(fresh[column]), rtol, atol
        )
        if detail:
            return f"column {column!r}: {detail}", None
        if deviation is not None and (largest is None or deviation[0] > largest[0]):
            largest = (deviation[0], f"column {column!r}: {deviation[1]}")
    return None, largest


def _column_array(column: Any) -> np.ndarray:
    values = column.to_numpy()
    return values.astype(str) if values.dtype.kind == "O" else values


def _array_difference(
    saved: np.ndarray, fresh: np.ndarray, rtol: float = 0.0, atol: float = 0.0
) -> tuple[str | None, tuple[float, str] | None]:
    """``(how they differ or None, (deviation, description) when equal only within the
    tolerances)``; the deviation is the largest ``|saved - fresh| - rtol * |fresh|``
    relative to ``atol`` (how close to the tolerance), or the largest absolute difference."""
    if saved.shape != fresh.shape:
        return f"shape {saved.shape} saved, {fresh.shape} re-run", None
    if saved.dtype.kind in "USO" or fresh.dtype.kind in "USO":
        same = saved.tolist() == fresh.tolist()
        return (None if same else f"{saved!r} saved, {fresh!r} re-run"), None
    if saved.dtype != fresh.dtype:
        return f"dtype {saved.dtype} saved, {fresh.dtype} re-run", None
    floating = saved.dtype.kind in "fc"
    if np.array_equal(saved, fresh, equal_nan=floating):
        return None, None
    numeric = saved.dtype.kind in "iufc"
    if numeric and (rtol or atol):
        close = np.isclose(saved, fresh, rtol=rtol, atol=atol, equal_nan=floating)
        if close.all():
            gap = np.abs(
                saved.astype(np.complex128 if saved.dtype.kind == "c" else np.float64) - fresh
            )
            largest = float(np.max(gap))
            return None, (largest, f"|saved - re-run| up to {largest:.3g}")
    if saved.ndim == 0:
        return f"{saved.item()!r} saved, {fresh.item()!r} re-run", None
    same = saved == fresh
    if floating:
        same |= np.isnan(saved) & np.isnan(fresh)
    if numeric and (rtol or atol):
        same = np.isclose(saved, fresh, rtol=rtol, atol=atol, equal_nan=floating)
    unequal = np.argwhere(~same)
    first = tuple(int(i) for i in unequal[0])
    beyond = " beyond the tolerances" if numeric and (rtol or atol) else ""
    return (
        f"{len(unequal)} of {saved.size} elements differ{beyond}; first at index {first}: "
        f"{saved[first]!r} saved, {fresh[first]!r} re-run"
    ), None


def _rerun(
    raw: Any,
    child: Any,
    plan: ReductionPlan,
    comparison: _Comparison,
    report: ReproduceReport,
    progress: bool,
    tqdm: Any,
) -> None:
    reduction = RunReduction(plan, comparison)
    with tqdm(
        total=count_events(raw) if progress else None,
        desc="reproduce",
        unit="event",
        disable=not progress,
    ) as bar:
        for name, doc in replay_run(raw, stand_in=True):
            reduction(name, doc)
            if name == "event":
                bar.update()
    report.events_failed += reduction.events_failed
    failures = [f for f in reduction.failures if "seq_num" in f]
    if failures and report.first_failure is None:
        first = failures[0]
        report.first_failure = (
            f"stream {first.get('stream', '?')!r}, event seq_num {first.get('seq_num')}, "
            f"while {first.get('stage', '?')}: {first['error']}"
        )
        report.first_failure_at = (first.get("stream", "?"), first.get("seq_num"))
    if report.difference is None and not reduction.done:
        raise AnalysisStoreError("the re-run did not complete")
