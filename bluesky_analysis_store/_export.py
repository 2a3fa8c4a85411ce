"""A derived run exported in the forms papers and archives take: a Workflow Run RO-Crate, or
a NeXus file with an ``NXprocess`` group.

Both carry the derived data (every data key of every stream, read with
:meth:`AnalysisStore.read_stream`) beside the facts of the start document: the parents, the
input files with their sha256, the code (name, version, commit) and its parameters, and how
the run ended.

- RO-Crate (https://w3id.org/ro/crate/1.1, Process Run Crate profile
  https://w3id.org/ro/wfrun/process/0.5): a folder holding ``ro-crate-metadata.json`` and one
  ``STREAM.npz`` per stream. The run is a ``CreateAction`` whose ``instrument`` is the code
  (``SoftwareApplication``), whose ``object`` are the parents and input files and whose
  ``result`` are the data files.
- NeXus: one HDF5 file, ``/entry`` (``NXentry``) with an ``NXdata`` group per stream and
  ``/entry/process`` (``NXprocess``): ``program``, ``version``, ``date`` and ``notes``, and a
  ``parameters`` (``NXparameters``) group per code record.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ._store import AnalysisStore

__all__ = ["FORMATS", "export_nexus", "export_ro_crate"]

FORMATS = ("ro-crate", "nexus")
_PROCESS_RUN_CRATE = "https://w3id.org/ro/wfrun/process/0.5"


def export_ro_crate(store: AnalysisStore, uid: str, folder: str | os.PathLike[str]) -> Path:
    """Write run ``uid`` as a Workflow Run RO-Crate into ``folder`` (made; it must not hold
    a crate already); returns the path of its ``ro-crate-metadata.json``."""
    start, stop, streams = _run_contents(store, uid)
    uid = start["uid"]
    folder = Path(folder)
    metadata_path = folder / "ro-crate-metadata.json"
    if metadata_path.exists():
        raise FileExistsError(f"{metadata_path} exists: export into a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    data_files = []
    for stream, columns in streams.items():
        name = f"{stream}.npz"
        np.savez(folder / name, **columns)
        data_files.append({"@id": name, "@type": "File", "name": f"stream {stream}",
                           "encodingFormat": "application/x-npz",
                           "description": "keys: " + ", ".join(columns)})  # fmt: skip
    provenance = start.get("provenance") or {}
    code = _code_records(start)
    tools = [
        {"@id": f"#code-{n}", "@type": "SoftwareApplication", "name": c.get("name"),
         "softwareVersion": str(c.get("version", "")),
         **({"identifier": c["commit"]} if c.get("commit") else {})}
        for n, c in enumerate(code)
    ]  # fmt: skip
    parents = [
        {"@id": f"urn:bluesky:run:{p}", "@type": "Dataset", "name": f"bluesky run {p}"}
        for p in start.get("parent_uids") or []
        if isinstance(p, str)
    ]
    files = [
        {"@id": "file://" + str(f["path"]), "@type": "File", "name": os.path.basename(f["path"]),
         "sha256": f.get("sha256"), "contentSize": f.get("size")}
        for f in provenance.get("files") or [] if isinstance(f, Mapping) and f.get("path")
    ]  # fmt: skip
    action = {
        "@id": f"#run-{uid}",
        "@type": "CreateAction",
        "name": f"reduction that made bluesky run {uid}",
        "instrument": [{"@id": t["@id"]} for t in tools],
        "object": [{"@id": e["@id"]} for e in parents + files],
        "result": [{"@id": f["@id"]} for f in data_files],
        "startTime": _iso(start.get("time")),
        "actionStatus": {"@id": _action_status(stop)},
        "identifier": uid,
    }
    if stop:
        action["endTime"] = _iso(stop.get("time"))
    parameters = [
        {"@id": f"#code-{n}-params", "@type": "PropertyValue", "name": "params",
         "value": json.dumps(c.get("params"), sort_keys=True, default=str)}
        for n, c in enumerate(code) if c.get("params") is not None
    ]  # fmt: skip
    if parameters:
        action["object"] += [{"@id": p["@id"]} for p in parameters]
    root = {
        "@id": "./",
        "@type": "Dataset",
        "name": f"bluesky derived run {uid}",
        "datePublished": _iso(datetime.datetime.now(datetime.timezone.utc).timestamp()),
        "hasPart": [{"@id": f["@id"]} for f in data_files],
        "mentions": [{"@id": action["@id"]}],
        "conformsTo": [{"@id": _PROCESS_RUN_CRATE}],
    }
    graph = [
        {"@id": "ro-crate-metadata.json", "@type": "CreativeWork", "about": {"@id": "./"},
         "conformsTo": {"@id": "https://w3id.org/ro/crate/1.1"}},
        root, action, *tools, *parents, *files, *parameters, *data_files,
        {"@id": _PROCESS_RUN_CRATE, "@type": "CreativeWork", "name": "Process Run Crate",
         "version": "0.5"},
    ]  # fmt: skip
    crate = {"@context": "https://w3id.org/ro/crate/1.1/context", "@graph": graph}
    metadata_path.write_text(json.dumps(crate, indent=2, default=str) + "\n")
    return metadata_path


def export_nexus(store: AnalysisStore, uid: str, path: str | os.PathLike[str]) -> Path:
    """Write run ``uid`` as a NeXus (HDF5) file at ``path`` (not overwritten); returns it."""
    import h5py

    start, stop, streams = _run_contents(store, uid)
    uid = start["uid"]
    path = Path(path)
    code = _code_records(start)
    with h5py.File(path, "x") as file:  # "x": an existing file is refused
        file.attrs["default"] = "entry"
        entry = _group(file, "entry", "NXentry")
        entry["title"] = f"bluesky derived run {uid}"
        entry["entry_identifier"] = uid
        entry["start_time"] = _iso(start.get("time")) or ""
        if stop:
            entry["end_time"] = _iso(stop.get("time")) or ""
        for stream, columns in streams.items():
            data = _group(entry, stream, "NXdata")
            for key, values in columns.items():
                data[key] = _hdf5_values(values)
            if columns:
                data.attrs["signal"] = next(iter(columns))
        if "primary" in streams:
            entry.attrs["default"] = "primary"
        process = _group(entry, "process", "NXprocess")
        process["program"] = ", ".join(str(c.get("name")) for c in code) or "(no code)"
        process["version"] = ", ".join(str(c.get("version", "")) for c in code)
        process["date"] = _iso(start.get("time")) or ""
        notes = _group(process, "notes", "NXnote")
        notes["type"] = "application/json"
        notes["description"] = "the provenance of the run's start document"
        notes["data"] = json.dumps(
            {"parent_uids": start.get("parent_uids") or [], **(start.get("provenance") or {}),
             "exit_status": (stop or {}).get("exit_status")},
            default=str, sort_keys=True,
        )  # fmt: skip
        for n, record in enumerate(code):
            parameters = _group(process, f"parameters_{n}", "NXparameters")
            parameters["code"] = str(record.get("name"))
            for name, value in (record.get("params") or {}).items():
                parameters[str(name)] = json.dumps(value, default=str)
    return path


# --- reading the run --------------------------------------------------------------------


def _run_contents(
    store: AnalysisStore, uid: str
) -> tuple[Mapping[str, Any], Mapping[str, Any] | None, dict[str, dict[str, np.ndarray]]]:
    from ._errors import AnalysisStoreError
    from ._replay import start_document, stop_document

    run = store[store.resolve_parent_uid(uid)]
    start = start_document(run)
    if not (start.get("parent_uids") or start.get("provenance")):
        raise AnalysisStoreError(
            f"run {start.get('uid')} is raw data: only a derived run is exported"
        )
    streams = {name: _flat(store.read_stream(start["uid"], name)) for name in run}
    return start, stop_document(run), streams


def _flat(values: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A stream's keys as flat arrays: a table's columns as ``KEY.COLUMN`` (its
    ``KEY.seq_num`` too), a variable-length key's values one event after the other, with
    ``KEY.offsets`` where each event's begin (and the last ends)."""
    flat: dict[str, np.ndarray] = {}
    for key, value in values.items():
        if hasattr(value, "columns"):  # a table (DataFrame)
            for column in value.columns:
                array = value[column].to_numpy()
                flat[f"{key}.{column}"] = array.astype(str) if array.dtype.kind == "O" else array
        elif isinstance(value, list):  # variable-length
            lengths = [len(v) for v in value]
            flat[key] = np.concatenate(value) if value else np.empty(0)
            flat[f"{key}.offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        else:
            flat[key] = value
    return flat


def _code_records(start: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    code = (start.get("provenance") or {}).get("code") or []
    return [c for c in code if isinstance(c, Mapping)]


def _action_status(stop: Mapping[str, Any] | None) -> str:
    if stop and stop.get("exit_status") == "success":
        reduction = stop.get("reduction") or {}
        if not reduction.get("events_failed"):
            return "http://schema.org/CompletedActionStatus"
    if not stop:
        return "http://schema.org/ActiveActionStatus"
    return "http://schema.org/FailedActionStatus"


def _iso(timestamp: Any) -> str | None:
    if not isinstance(timestamp, (int, float)):
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat()


def _hdf5_values(values: np.ndarray) -> np.ndarray:
    """Values as HDF5 holds them: strings as bytes, times as ISO 8601 text, durations as
    integers of their unit."""
    if values.dtype.kind == "U":
        return values.astype("S")
    if values.dtype.kind == "M":
        return np.datetime_as_string(values).astype("S")
    if values.dtype.kind == "m":
        return values.astype(np.int64)
    return values


def _group(parent: Any, name: str, nx_class: str) -> Any:
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    return group
