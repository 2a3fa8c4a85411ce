"""Describing runs for ``ls`` and ``show``: summaries and records, printed as text or JSON.

A run may have no stop document (its scan still runs, or its process died before the stop
was saved): it is described as incomplete, with the events saved so far, never as an error.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from .._replay import start_document, stop_document, stream_lengths
from .._store import ChildRun
from .._versions import pin_time
from ._exits import command_line_text, error_text
from ._opening import MIN_UID_PREFIX

_NOT_DATA_KEYS = frozenset({"seq_num", "time"})
_TEXT_VALUE_WIDTH = 100
_STATUS_REASON_WIDTH = 60
SHOWN_FAILURES = 10
INCOMPLETE_TEXT = "no stop document: the run is incomplete (interrupted?)"


# --- output helpers -----------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """tiled's read-only views (DictView, ListView) as plain dicts and lists, for JSON."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout."""
    print(json.dumps(_plain(value), indent=2, default=str))


def _format_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "?"
    moment = datetime.datetime.fromtimestamp(timestamp).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _iso_time(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _short(text: str, width: int = _TEXT_VALUE_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(_plain(value), default=str)


# --- describing runs -------------------------------------------------------------------------


def _kind(start: Mapping[str, Any]) -> str:
    return "derived" if start.get("parent_uids") or start.get("provenance") else "raw"


def _code_summaries(start: Mapping[str, Any]) -> list[dict[str, Any]]:
    code = (start.get("provenance") or {}).get("code") or []
    return [
        {k: record[k] for k in ("name", "version", "commit", "dirty") if k in record}
        for record in code
    ]


def _version_text(record: Mapping[str, Any]) -> str:
    version = str(record.get("version", "?"))
    if re.fullmatch(r"[0-9a-f]{40}", version):  # a git commit: the first 12 are enough here
        version = version[:12]
    return version + (" (dirty)" if record.get("dirty") else "")


def failed_text(events_failed: int, events_reduced: int | None) -> str:
    """How a child on which every event failed is described: never like a success."""
    total = events_failed + (events_reduced or 0)
    return f"FAILED: {events_failed} of {total} events failed"


def _child(uid: str, start: Mapping[str, Any], stop: Mapping[str, Any] | None) -> ChildRun:
    return ChildRun.from_start(uid, start, stop)


def _status(uid: str, start: Mapping[str, Any], stop: Mapping[str, Any] | None) -> str:
    """How the run ended in a few words: ``success``, ``fail (reason)``, ``success, 2 of 5
    events failed``, ``FAILED: 5 of 5 events failed`` (the stop's exit status may say
    success: the raw run ended well, but nothing was reduced), ``incomplete (no stop)``; a
    long reason is cut short."""
    if stop and stop.get("reason"):
        stop = {**stop, "reason": _short(str(stop["reason"]), _STATUS_REASON_WIDTH)}
    child = _child(uid, start, stop)
    if child.complete and child.all_failed:
        assert child.events_failed is not None
        text = failed_text(child.events_failed, child.events_reduced)
        return text + (f" ({child.reason})" if child.reason else "")
    return child.status


def run_summary(uid: str, run: Any, *, current: bool | None = None) -> dict[str, Any]:
    """One run in a line of ``ls``: when, raw or derived, what made it, how it ended.

    ``status`` says how it ended; a run without a stop document is ``incomplete (no
    stop)``, with ``exit_status`` None and ``events_saved``, the events saved so far, per
    stream. ``pinned`` says whether a user pinned it as its reducer's current result;
    ``current`` whether it is that result (None where the listing did not work it out:
    that is a question about the children of one parent).
    """
    start = start_document(run)
    stop = stop_document(run)
    summary: dict[str, Any] = {
        "uid": uid,
        "time": start.get("time"),
        "time_iso": _iso_time(start.get("time")),
        "kind": _kind(start),
        "plan_name": start.get("plan_name"),
        "scan_id": start.get("scan_id"),
        "parent_uids": list(start.get("parent_uids") or []),
        "files": [f.get("path") for f in (start.get("provenance") or {}).get("files") or []],
        "code": _code_summaries(start),
        "complete": stop is not None,
        "status": _status(uid, start, stop),
        "failed": _child(uid, start, stop).all_failed,
        "exit_status": stop.get("exit_status") if stop else None,
        "num_events": dict(stop.get("num_events") or {}) if stop else {},
        "pinned": pin_time(run.metadata or {}) is not None,
        "current": current,
    }
    if stop is None:
        summary["events_saved"] = stream_lengths(run)
    return summary


def store_header(store: Any) -> str:
    """The line ``ls`` starts with: the store, and the only folders it may read files from
    (its asset folder and the ``readable`` folders its owner gave, kept in store.json)."""
    roots = store.readable_roots
    readable = ", ".join(roots) if roots is not None else "not checked here (the server decides)"
    return f"# store {store.location}; files readable under: {readable}"


def summary_text(summary: Mapping[str, Any]) -> str:
    """A :func:`run_summary` as the line ``ls`` prints."""
    if summary["kind"] == "derived":
        what = "; ".join(f"{c['name']} {_version_text(c)}" for c in summary["code"]) or "(no code)"
        origins = [p[:MIN_UID_PREFIX] for p in summary["parent_uids"]]
        origins += [os.path.basename(f or "?") for f in summary["files"]]
        if origins:
            more = f" +{len(origins) - 3} more" if len(origins) > 3 else ""
            what += " <- " + ", ".join(origins[:3]) + more
    else:
        what = summary["plan_name"] or "(no plan name)"
        if summary["scan_id"] is not None:
            what += f" (scan_id {summary['scan_id']})"
    status = summary["status"]
    if not summary["complete"]:
        saved = sum(summary["events_saved"].values())
        status += f", {saved} event{'s' if saved != 1 else ''} saved"
    if status != "success":
        what += f" [{status}]"
    marks = ["current"] if summary.get("current") else []
    marks += ["pinned"] if summary.get("pinned") else []
    if marks:
        what += f"  ({', '.join(marks)})"
    return f"{summary['uid']}  {_format_time(summary['time'])}  {summary['kind']:<7}  {what}"


def lineage_record(node: Any) -> dict[str, Any]:
    """A lineage tree (:class:`LineageNode`) as JSON: each run's :func:`run_summary`
    (None for a run not in this store), and its ``links`` one generation further."""
    return {
        "uid": node.uid,
        "summary": run_summary(node.uid, node.run, current=node.current) if node.run else None,
        "seen": node.seen,
        "truncated": node.truncated,
        "links": [lineage_record(link) for link in node.links],
    }


def lineage_lines(node: Any, arrow: str, depth: int = 0) -> list[str]:
    """A lineage tree as indented ``ls`` lines, ``arrow`` before each run of a later
    generation."""
    lead = "   " * (depth - 1) + f"{arrow} " if depth else ""
    if node.run is None:
        text = f"{node.uid}  (not in this store)"
    else:
        text = summary_text(run_summary(node.uid, node.run, current=node.current))
    if node.seen:
        text += "  (listed above)"
    lines = [lead + text]
    if node.truncated:
        lines.append("   " * depth + f"{arrow} ... (more generations: raise --depth)")
    for link in node.links:
        lines += lineage_lines(link, arrow, depth + 1)
    return lines


def data_keys(node: Any) -> list[str]:
    """The data keys of a stream, without its event numbers and timestamps."""
    keys = list(node)
    names = set(keys)
    return [
        k for k in keys if k not in _NOT_DATA_KEYS and not (k.startswith("ts_") and k[3:] in names)
    ]


def _streams(run: Any, stop: Mapping[str, Any] | None) -> dict[str, Any]:
    """Each stream's keys and event count: the stop's, or without one the rows saved."""
    streams: dict[str, Any] = {}
    saved = stream_lengths(run) if stop is None else {}
    for name in run:
        node = run[name]
        events = saved[name] if stop is None else (stop.get("num_events") or {}).get(name)
        keys = _described_keys(node, events)
        if keys is None:
            keys = {}
            for key in data_keys(node):
                item = node[key]
                shape = getattr(item, "shape", None)
                keys[key] = {
                    "shape": list(shape) if shape is not None else None,
                    "dtype": str(getattr(item, "dtype", "?")),
                }
        streams[name] = {"events": events, "keys": keys}
    return streams


def _described_keys(node: Any, events: int | None) -> dict[str, Any] | None:
    """A composite stream's keys with shapes and dtypes, from the listing of its parts and
    its descriptor, without a client for each array (tiled's array client imports dask:
    a second); None for another layout, or a key neither describes."""
    import numpy as np

    get_contents = getattr(node, "get_contents", None)
    if not callable(get_contents) or events is None:
        return None
    described = (node.metadata or {}).get("data_keys") or {}
    keys: dict[str, Any] = {}
    names: list[str] = []
    from .._replay import is_stream_table

    for item_id, item in get_contents().items():
        attributes = item["attributes"]
        if attributes["structure_family"] == "table" and not is_stream_table(item_id):
            # A table-valued or variable-length key: rows of its own, any number an event.
            names.append(item_id)
            keys[item_id] = {"shape": [events, None], "dtype": _rows_dtype(described, item_id)}
        elif attributes["structure_family"] == "table":
            names += attributes["structure"]["columns"]
        else:
            names.append(item_id)
            structure = attributes.get("structure") or {}
            data_type = structure.get("data_type") or {}
            if "shape" not in structure or "kind" not in data_type:
                return None
            dtype = np.dtype(
                f"{_ENDIAN.get(data_type.get('endianness'), '=')}"
                f"{data_type['kind']}{data_type['itemsize']}"
            )
            keys[item_id] = {"shape": list(structure["shape"]), "dtype": str(dtype)}
    present = set(names)
    for key in names:
        if key in keys or key in _NOT_DATA_KEYS or (key.startswith("ts_") and key[3:] in present):
            continue
        description = described.get(key) or {}
        dtype_text = description.get("dtype_numpy")
        if not dtype_text:
            return None
        keys[key] = {
            "shape": [events, *description.get("shape", [])],
            "dtype": str(np.dtype(dtype_text)),
        }
    return {key: keys[key] for key in names if key in keys}


_ENDIAN = {"little": "<", "big": ">", "not_applicable": "|"}


def _rows_dtype(described: Mapping[str, Any], key: str) -> str:
    """How a table key's rows are made (``table(energy float64, ...)``), or a
    variable-length key's values."""
    import numpy as np

    dtype = (described.get(key) or {}).get("dtype_numpy")
    if isinstance(dtype, list):
        columns = ", ".join(
            f"{name} {'str' if kind == '|O8' else np.dtype(kind)}" for name, kind in dtype
        )
        return f"table({columns})"
    try:
        return f"{np.dtype(dtype)}, variable length"
    except TypeError:
        return "?"


def show_record(uid: str, run: Any) -> dict[str, Any]:
    """Everything ``show`` tells about a run: metadata, provenance, how it ended, streams.

    ``stop`` is None for a run without a stop document (``complete`` False); its streams'
    ``events`` are then the rows saved so far.
    """
    start = _plain(start_document(run))
    stop = stop_document(run)
    return {
        "uid": uid,
        "kind": _kind(start),
        "time_iso": _iso_time(start.get("time")),
        "complete": stop is not None,
        "status": _status(uid, start, stop),
        "failed": _child(uid, start, stop).all_failed,
        "start": start,
        "provenance": start.get("provenance"),
        "stop": _plain(stop) if stop is not None else None,
        "streams": _streams(run, stop),
    }


def _print_provenance(provenance: Mapping[str, Any]) -> None:
    print("provenance:")
    parents = provenance.get("parents") or []
    print(f"  parents ({len(parents)}):")
    for parent in parents:
        streams = parent.get("streams")
        print(f"    {parent['uid']}" + (f"  streams {', '.join(streams)}" if streams else ""))
    files = provenance.get("files") or []
    print(f"  files ({len(files)}):")
    for record in files:
        print(f"    {record.get('path')}")
        print(f"      sha256 {record.get('sha256')}  size {record.get('size')} bytes")
    code = provenance.get("code") or []
    print(f"  code ({len(code)}):")
    for record in code:
        print(f"    {record.get('name')}")
        details = [f"version {record.get('version', '?')}"]
        if "distribution" in record:
            details.append(f"distribution {record['distribution']}")
        if "commit" in record:
            details.append(
                f"commit {record['commit']}" + (" (dirty)" if record.get("dirty") else "")
            )
        if not record.get("importable", True):
            details.append("NOT importable by name")
        print("      " + ", ".join(details))
        if "file" in record:
            print(f"      file {record['file']}")
        if "sha256" in record:
            print(f"      sha256 {record['sha256']}")
        if record.get("params"):
            print(f"      params {_short(_value_text(record['params']))}")
        if record.get("streams"):
            print(f"      streams {', '.join(record['streams'])}")
    environment = provenance.get("environment") or {}
    if environment:
        print("  environment:")
        print(
            f"    python {environment.get('python', '?')} "
            f"({environment.get('implementation', '?')}) on {environment.get('platform', '?')}"
        )
        packages = environment.get("packages") or {}
        for name, version in sorted(packages.items()):
            print(f"    {name} {version}")
    if "strict" in provenance:
        print(f"  strict: {provenance['strict']}")
    for gap in provenance.get("missing") or []:
        print(f"  MISSING: {gap}")


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` as ``1-3, 7``: which events, in a few characters."""
    parts: list[str] = []
    ordered = sorted(set(numbers))
    first = previous = ordered[0]
    for number in [*ordered[1:], None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        parts.append(str(first) if first == previous else f"{first}-{previous}")
        if number is not None:
            first = previous = number
    return ", ".join(parts)


def failure_lines(reduction: Mapping[str, Any], limit: int = SHOWN_FAILURES) -> list[str]:
    """The failures of a reduction record (``stop["reduction"]``), compactly: one line per
    reducer stage, error and stream, with the events it struck (``failed at stream
    primary, seq_num 1-5 (5 events) while spot.event: KeyError: 'cam'``); the first
    ``limit`` such lines, then how many more."""
    groups: dict[tuple[str, str, str | None], list[int | None]] = {}
    for failure in reduction.get("failures") or []:
        group = (
            str(failure.get("stage", "?")),
            str(failure.get("error", "?")),
            failure.get("stream"),
        )
        groups.setdefault(group, []).append(failure.get("seq_num"))
    lines = []
    for (stage, error, stream), seq_nums in list(groups.items())[:limit]:
        numbers = [n for n in seq_nums if isinstance(n, int)]
        where = [f"stream {stream}"] if stream is not None else []
        if numbers:
            count = f" ({len(numbers)} events)" if len(numbers) > 1 else ""
            where.append(f"seq_num {_ranges(numbers)}{count}")
        at = f" at {', '.join(where)}" if where else ""
        lines.append(f"failed{at} while {stage}: {_short(error)}")
    if len(groups) > limit:
        lines.append(f"... {len(groups) - limit} more kinds of failure recorded")
    recorded = sum(
        1 for failure in reduction.get("failures") or [] if failure.get("seq_num") is not None
    )
    failed = reduction.get("events_failed")
    if isinstance(failed, int) and failed > recorded and recorded:
        lines.append(f"... {failed - recorded} more failed events, not recorded one by one")
    return lines


def _print_reduction(reduction: Mapping[str, Any]) -> None:
    """The child's reduction record: its counts and its first failures."""
    counts = {
        key: "?" if reduction.get(key) is None else reduction[key]
        for key in ("events_reduced", "events_failed")
    }
    notes = []
    if reduction.get("interrupted"):
        notes.append("interrupted")
    if reduction.get("raw_exit_status") not in (None, "success"):
        notes.append(f"the raw run's exit status: {reduction['raw_exit_status']}")
    print(
        f"  reduction: {counts['events_reduced']} events reduced, "
        f"{counts['events_failed']} failed" + (f" ({'; '.join(notes)})" if notes else "")
    )
    for line in failure_lines(reduction):
        print(f"    {line}")


def print_show(record: Mapping[str, Any]) -> None:
    """A :func:`show_record` as text."""
    start = record["start"]
    stop = record["stop"]
    print(f"run {record['uid']} ({record['kind']})")
    print(f"  time: {_format_time(start.get('time'))}")
    if stop:
        if record["failed"]:  # nothing was reduced, whatever exit status the stop records
            print(
                f"  exit status: {record['status']} "
                f"(the stop document's exit_status: {stop.get('exit_status')!r})"
            )
        else:
            print(f"  exit status: {stop.get('exit_status')}")
        if stop.get("reason"):
            print(f"  reason: {stop['reason']}")
        if stop.get("reduction"):
            _print_reduction(stop["reduction"])
    else:
        print(f"  {INCOMPLETE_TEXT}")
    print("start metadata:")
    for key, value in start.items():
        if key in ("uid", "time", "provenance"):
            continue
        print(f"  {key}: {_short(_value_text(value))}")
    if record["provenance"]:
        _print_provenance(record["provenance"])
    else:
        print("provenance: none (a raw run)")
    print("streams:")
    if not record["streams"]:
        print("  (none)")
    for name, stream in record["streams"].items():
        events = stream["events"]
        if not stop:
            print(f"  {name} ({events} events saved so far)")
        else:
            print(f"  {name}" + (f" ({events} events)" if events is not None else ""))
        width = max((len(k) for k in stream["keys"]), default=0)
        for key, info in stream["keys"].items():
            shape = tuple(info["shape"]) if info["shape"] is not None else "?"
            print(f"    {key:<{width}}  shape {shape}  dtype {info['dtype']}")


# --- reprocess ---------------------------------------------------------------------------------


def _failure_counts(reduction: Mapping[str, Any]) -> str:
    failed, reduced = reduction.get("events_failed") or 0, reduction.get("events_reduced") or 0
    return f"{failed} of {failed + reduced} events failed"


def reprocess_lines(report: Any) -> list[str]:
    """What ``reprocess`` prints: the counts, then each raw run, and the failures of each new
    child summarised (see :func:`failure_lines`), not one traceback per event."""
    lines = [str(report).splitlines()[0]]
    for raw_uid, child_uid in report.saved.items():
        reduction = report.reductions.get(raw_uid) or {}
        partly = f" ({_failure_counts(reduction)})" if reduction.get("events_failed") else ""
        lines.append(f"  saved {raw_uid}: child run {child_uid}{partly}")
        lines += [f"    {line}" for line in failure_lines(reduction)]
    for raw_uid, child_uid in report.skipped.items():
        lines.append(
            f"  already reduced {raw_uid}: child run {child_uid} (use --force for another)"
        )
    for raw_uid, why in report.failed.items():
        if raw_uid in report.failed_children:
            reduction = report.reductions.get(raw_uid) or {}
            failed = reduction.get("events_failed", "?")
            lines.append(
                f"  FAILED {raw_uid}: every event failed ({failed} of {failed}); "
                f"child run {report.failed_children[raw_uid]} records why"
            )
            lines += [f"    {line}" for line in failure_lines(reduction)]
        else:
            error = report.errors.get(raw_uid)
            text = error_text(error) if error is not None else command_line_text(why)
            lines.append(f"  FAILED {raw_uid}: not reduced: {text}")
    lines += [f"  incomplete raw run {uid}: {what}" for uid, what in report.incomplete.items()]
    for raw_uid, children in report.not_counted.items():
        lines += [
            f"  earlier child {child_uid} of {raw_uid} is {status}: not counted as reduced"
            for child_uid, status in children.items()
        ]
    return lines
