"""Turning derived values into the documents of one complete bluesky run.

:class:`RunComposer` builds a run incrementally (the live callback feeds it one event at a
time); :func:`compose_documents` is DBEP 6's batch API on top of it. Both stand on
event-model's composers, which keep ``seq_num`` per stream, check event keys against the
descriptor, number datums and count events for the stop document.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import time as ttime
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import event_model
import jsonschema
import numpy as np
from event_model import DocumentNames, schema_validators

from ._confinement import check_readable
from ._data_keys import (
    TABLE_SPEC,
    check_data_key,
    check_storable,
    check_stream_keys,
    check_stream_name,
    conform_value,
    merge_data_key,
)
from ._errors import (
    AnalysisStoreError,
    AssetExistsError,
    DataKeyError,
    DataValueError,
    MetadataError,
)
from ._provenance import make_provenance
from ._table_values import (
    conform_ragged,
    conform_table,
    describe_event_value,
    describe_ragged,
    is_ragged_key,
    is_table_key,
    normalise_event_value,
    widen_table_key,
)
from ._writer_specs import PlannedFile, WriterSpec, ensure_writable_root, resolve_writers

__all__ = ["AssetDocuments", "RunComposer", "compose_documents"]

logger = logging.getLogger(__name__)

AssetDocuments = Literal["stream", "resource"]
Document = tuple[str, dict[str, Any]]

# Keys the package fills itself in a child run's start document.
RESERVED_START_KEYS = frozenset({"uid", "time", "parent_uids", "provenance"})


# The catalog keeps metadata as JSON and bluesky-tiled-plugins clips integral numbers to
# JavaScript's safe integers (truncate_json_overflow): only these are kept exactly.
_MAX_JSON_INT = 2**53 - 1
# Deeper metadata is refused: JSON encoders, the schema validator and tiled recurse into it.
_MAX_METADATA_DEPTH = 64


def check_metadata(md: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``md`` that the store keeps exactly, or :class:`MetadataError`.

    Refused: what JSON cannot hold or would change (NaN, infinities, tuples, keys that are
    not strings, lone surrogates, numbers other than ``int``/``float``/``bool``), integral
    numbers beyond +-(2**53 - 1) (the store clips them), and values the start document's
    schema refuses (``scan_id`` must be an integer, ``group`` a string...).
    """
    if md is not None and not isinstance(md, Mapping):
        raise MetadataError(f"metadata must be a mapping, not {type(md).__name__}")
    md = dict(md or {})
    if taken := RESERVED_START_KEYS & md.keys():
        raise MetadataError(
            f"metadata may not set {sorted(taken)}: the package fills them from the provenance"
        )
    try:
        _check_json_exact(md, "md", set())
        json.dumps(md, allow_nan=False)
    except RecursionError:
        raise MetadataError("metadata is nested too deeply to be stored") from None
    except (TypeError, ValueError) as error:
        raise MetadataError(f"metadata is not JSON-serialisable: {error}") from error
    check_start_schema({"uid": "00000000-0000-0000-0000-000000000000", "time": 0.0, **md})
    # The start document must not share nested dicts or lists with the caller's md.
    return copy.deepcopy(md)


def check_start_schema(start: Mapping[str, Any]) -> None:
    """Refuse a start document that event-model's schema refuses, as :class:`MetadataError`."""
    try:
        schema_validators[DocumentNames.start].validate(dict(start))
    except jsonschema.ValidationError as error:
        where = ".".join(str(p) for p in error.absolute_path) or "the start document"
        raise MetadataError(
            f"metadata {where!r} is refused by the start document's schema: {error.message}"
        ) from None


def _check_json_exact(value: Any, where: str, seen: set[int]) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise MetadataError(f"{where} is not valid unicode (a lone surrogate)") from None
        return
    if isinstance(value, int):
        if not -_MAX_JSON_INT <= value <= _MAX_JSON_INT:
            raise MetadataError(
                f"{where} = {value} is beyond +-(2**53 - 1), the integers the store's "
                "metadata keeps exactly; store it as a string"
            )
        return
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise MetadataError(f"{where} = {value}: NaN and infinities are not JSON")
        if value.is_integer() and not -_MAX_JSON_INT <= value <= _MAX_JSON_INT:
            raise MetadataError(
                f"{where} = {value!r} is a whole number beyond +-(2**53 - 1), which the "
                "store's metadata clips; store it as a string"
            )
        return
    if id(value) in seen:
        raise MetadataError(f"{where} contains itself")
    if len(seen) >= _MAX_METADATA_DEPTH:
        raise MetadataError(f"metadata is nested deeper than {_MAX_METADATA_DEPTH} levels")
    if isinstance(value, Mapping):
        seen = seen | {id(value)}
        for key, item in value.items():
            if not isinstance(key, str):
                raise MetadataError(
                    f"{where} has the key {key!r}: metadata keys must be strings (JSON "
                    "would turn it into one)"
                )
            _check_json_exact(key, f"{where} key {key!r}", seen)
            _check_json_exact(item, f"{where}[{key!r}]", seen)
        return
    if isinstance(value, list):
        seen = seen | {id(value)}
        for n, item in enumerate(value):
            _check_json_exact(item, f"{where}[{n}]", seen)
        return
    if isinstance(value, tuple):
        raise MetadataError(f"{where} is a tuple, which the store gives back as a list")
    raise MetadataError(
        f"{where} is a {type(value).__name__}, which JSON cannot hold; give str, int, float, "
        "bool, None, lists and dicts of them"
    )


class _FileKey:
    """The open writer and asset composer of one data key of one stream."""

    def __init__(self, writer: Any, datum_factory: Any, resource_doc: dict[str, Any]) -> None:
        self.writer = writer
        self.compose_datum = datum_factory
        self.resource_doc = resource_doc
        self.index = 0


class _Stream:
    def __init__(self, bundle: Any, data_keys: dict[str, dict[str, Any]]) -> None:
        self.bundle = bundle
        self.data_keys = data_keys
        self.file_keys: dict[str, _FileKey] = {}
        self.planned: dict[str, PlannedFile] = {}


class RunComposer:
    """Compose the documents of one run, event by event, writing file-backed keys on the way.

    Each method returns the documents it made, in the order a consumer must see them. Data
    keys named in ``writers`` are written through their writer and referenced from the
    events (``stream_resource``/``stream_datum`` or ``resource``/``datum``); so are numeric
    arrays when ``array_writer`` is given, except ``inline_keys``. Every other key goes
    inline. Tables (DataFrames, mappings of columns) and keys whose writer is the Parquet
    format (variable-length arrays) are written through that format, by ``table_writer``
    unless ``writers`` names another root for them; without a ``table_writer`` they stay in
    the events (for documents compared, never saved: a store refuses them). Keys in
    ``variable_length_keys`` are 1-D arrays of any length, from the first event on.
    ``close`` (or ``stop``) releases the writers.
    """

    def __init__(
        self,
        start_metadata: Mapping[str, Any],
        writers: Mapping[str, WriterSpec] | None = None,
        *,
        asset_documents: AssetDocuments = "stream",
        uid: str | None = None,
        time: float | None = None,
        validate: bool = True,
        array_writer: WriterSpec | None = None,
        inline_keys: Iterable[str] = (),
        table_writer: WriterSpec | None = None,
        variable_length_keys: Iterable[str] = (),
    ) -> None:
        if asset_documents not in ("stream", "resource"):
            raise AnalysisStoreError(
                f"asset_documents must be 'stream' or 'resource', not {asset_documents!r}"
            )
        self._writers = dict(writers or {})
        self._array_writer = array_writer
        self._table_writer = table_writer
        self._variable_length_keys = frozenset(variable_length_keys)
        self._inline_keys = frozenset(inline_keys)
        self._asset_documents = asset_documents
        self._validate = validate
        if validate:
            check_start_schema({"uid": uid or "0", "time": 0.0, **start_metadata})
        self._bundle = event_model.compose_run(
            uid=uid, time=time, metadata=dict(start_metadata), validate=validate
        )
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        # Descriptors and resources made for an event whose writing failed: sent with the next.
        self._unsent: list[Document] = []

    @property
    def start_doc(self) -> dict[str, Any]:
        return self._bundle.start_doc

    @property
    def uid(self) -> str:
        return self._bundle.start_doc["uid"]

    def start(self) -> list[Document]:
        return [("start", self._bundle.start_doc)]

    def data_keys(self, stream: str) -> dict[str, dict[str, Any]] | None:
        known = self._streams.get(stream)
        return known.data_keys if known else None

    def declare_stream(
        self, stream: str, data_keys: Mapping[str, Mapping[str, Any]]
    ) -> list[Document]:
        """Emit the descriptor of ``stream``; ``data_keys`` describe the values to come."""
        check_stream_name(stream)
        if stream in self._streams:
            raise AnalysisStoreError(f"stream {stream!r} is already declared")
        check_stream_keys(stream, [check_data_key(key) for key in data_keys])
        described = {}
        writers = dict(self._writers)  # taken on only once every key is accepted
        for key, data_key in data_keys.items():
            described[check_data_key(key)] = data_key = dict(data_key)
            if self._writes_by_default(key, data_key):
                writers[key] = self._array_writer
            spec = writers.get(key)
            if key in self._variable_length_keys and len(data_key.get("shape") or ()) == 1:
                data_key["shape"] = [None]
            if (
                is_table_key(data_key)
                or is_ragged_key(data_key)
                or (spec is not None and spec.spec == TABLE_SPEC)
            ):
                if spec is None and self._table_writer is None:
                    continue  # kept in the events: documents that are compared, not saved
                if spec is None:
                    spec = writers[key] = self._table_writer
                if not is_table_key(data_key):  # a Parquet key of arrays: of any length
                    if len(data_key.get("shape") or ()) != 1:
                        raise DataValueError(
                            f"{key!r} is written as Parquet, which holds tables and 1-D "
                            f"arrays of any length, not values of shape {data_key.get('shape')}"
                        )
                    data_key["shape"] = [None]
            check_storable(key, data_key, to_file=spec is not None, spec=spec and spec.spec)
            if key in writers:
                described[key]["external"] = (
                    "STREAM:" if self._asset_documents == "stream" else "FILESTORE:"
                )
        self._writers = writers
        bundle = self._bundle.compose_descriptor(
            name=stream, data_keys=described, validate=self._validate
        )
        self._streams[stream] = _Stream(bundle, described)
        return [("descriptor", bundle.descriptor_doc)]

    def event(
        self,
        stream: str,
        data: Mapping[str, Any],
        *,
        timestamps: Mapping[str, float] | None = None,
        time: float | None = None,
    ) -> list[Document]:
        """Write the file-backed values of one event and return its documents."""
        if self._stopped:
            raise AnalysisStoreError("the run is already stopped")
        values = {check_data_key(k): normalise_event_value(k, v) for k, v in data.items()}
        docs = list(self._unsent)
        known = self._streams.get(stream)
        if known is None:
            docs += self.declare_stream(
                stream, {k: describe_event_value(k, v) for k, v in values.items()}
            )
            known = self._streams[stream]
        else:
            values = self._check_against_descriptor(stream, known, values)

        now = ttime.time() if time is None else time
        event_data: dict[str, Any] = {}
        filled: dict[str, bool] = {}
        seq_num = self._bundle.compose_stop.event_counters.get(stream, 1)
        written = self._write_files(stream, known, values, docs, seq_num)
        for key, value in values.items():
            if key not in self._writers:
                event_data[key] = value
                continue
            file_key, datum_kwargs = written[key]
            if self._asset_documents == "stream":
                docs.append(
                    (
                        "stream_datum",
                        file_key.compose_datum(
                            indices={"start": file_key.index, "stop": file_key.index + 1},
                            seq_nums={"start": seq_num, "stop": seq_num + 1},
                            descriptor=known.bundle.descriptor_doc,
                            # Made here of ints and uids: checking the first of a file
                            # checks them all (the schema cost as much as the reducer).
                            validate=self._validate and file_key.index == 0,
                        ),
                    )
                )
            else:
                datum = file_key.compose_datum(datum_kwargs=datum_kwargs, validate=self._validate)
                docs.append(("datum", datum))
                event_data[key] = datum["datum_id"]
                filled[key] = False
            file_key.index += 1
        stamps = dict(timestamps) if timestamps else {}
        # Only a caller's ``time`` can break the event schema (``data`` and ``timestamps``
        # may hold anything; the rest is made here, keys are checked above), so the schema
        # (~0.25 ms an event, as long as the RunEngine takes for a scalar event) is checked
        # on the first event of each stream and on events given a ``time``.
        event = known.bundle.compose_event(
            data=event_data,
            timestamps={k: stamps.get(k, now) for k in event_data},
            filled=filled,
            time=now,
            validate=self._validate and (time is not None or seq_num == 1),
        )
        docs.append(("event", event))
        self._unsent = []
        return docs

    def stop(self, exit_status: str = "success", reason: str = "", **extra: Any) -> list[Document]:
        """Close the writers and return the stop document (``extra`` goes into it)."""
        self.close()
        self._stopped = True
        stop = self._bundle.compose_stop(exit_status=exit_status, reason=reason, validate=False)
        stop = {**stop, **extra}
        if self._validate:
            schema_validators[DocumentNames.stop].validate(stop)
        unsent, self._unsent = self._unsent, []
        return [*unsent, ("stop", stop)]

    def close(self) -> None:
        for known in self._streams.values():
            for file_key in known.file_keys.values():
                file_key.writer.close()
            known.file_keys.clear()

    def _write_files(
        self,
        stream: str,
        known: _Stream,
        values: Mapping[str, Any],
        docs: list[Document],
        seq_num: int,
    ) -> dict[str, tuple[_FileKey, dict[str, Any]]]:
        """Write the file-backed values of one event: all of them, or none.

        If one fails, the keys already written are rewound and their ``index`` stays, so
        every key stays in step with ``seq_num``. A key whose writer cannot rewind keeps its
        frame, unreferenced, and its ``index`` moves past it, so that its next datum points
        at the frame its writer writes next: :class:`AnalysisStoreError` says so.
        """
        written: dict[str, tuple[_FileKey, dict[str, Any]]] = {}
        try:
            for key, value in values.items():
                if key in self._writers:
                    file_key = known.file_keys.get(key) or self._open_file_key(
                        stream, known, key, docs
                    )
                    if self._writers[key].spec == TABLE_SPEC:
                        # Its files give each row the event's seq_num: frame n is event n+1.
                        if file_key.index + 1 != seq_num:
                            raise AnalysisStoreError(
                                f"{key!r} of stream {stream!r} is out of step with its "
                                f"events (frame {file_key.index}, seq_num {seq_num})"
                            )
                        written[key] = (file_key, file_key.writer(value))
                        continue
                    written[key] = (file_key, file_key.writer(np.asarray(value)))
        except Exception as error:
            self._unsent = docs  # descriptors and resources only: no datum is made yet
            kept = [key for key, (file_key, _) in written.items() if not _rewound(file_key)]
            if kept:
                for key in kept:
                    written[key][0].index += 1
                raise AnalysisStoreError(
                    f"the event of stream {stream!r} was not saved: writing its data failed "
                    f"({error}), and the frames already written for {kept} cannot be taken "
                    "back by their writers; they stay in their files, unreferenced"
                ) from error
            raise
        return written

    def _writes_by_default(self, key: str, data_key: Mapping[str, Any]) -> bool:
        """Numeric arrays go to ``array_writer`` unless a writer or inline is asked for."""
        return (
            self._array_writer is not None
            and key not in self._writers
            and key not in self._inline_keys
            and not is_table_key(data_key)
            and None not in data_key["shape"]
            and bool(data_key["shape"])
            and np.dtype(data_key.get("dtype_numpy", "O")).kind in "biuf"
        )

    def _check_against_descriptor(
        self, stream: str, known: _Stream, values: dict[str, Any]
    ) -> dict[str, Any]:
        """``values`` in the dtypes of the descriptor, or refused if that changes them."""
        if set(values) != set(known.data_keys):
            raise DataKeyError(
                f"stream {stream!r} was declared with keys {sorted(known.data_keys)}, "
                f"this event has {sorted(values)}"
            )
        for key, value in values.items():
            declared = known.data_keys[key]
            if is_table_key(declared):
                if not hasattr(value, "columns"):
                    raise DataValueError(
                        f"{key!r} in stream {stream!r} was declared a table; this value is "
                        f"a {type(value).__name__}"
                    )
                values[key] = conform_table(key, value, declared)
                continue
            if is_ragged_key(declared):
                values[key] = conform_ragged(key, value, declared)
                continue
            new = describe_event_value(key, value)
            if declared["shape"] == new["shape"] and declared["dtype_numpy"] == new["dtype_numpy"]:
                continue
            merged = merge_data_key(key, declared, new, to_file=key in self._writers)
            if merged["shape"] != declared["shape"] or merged["dtype"] != declared["dtype"]:
                # The descriptor is already out; it cannot be widened after the fact.
                raise DataValueError(
                    f"{key!r} in stream {stream!r} was declared {declared['dtype']} of shape "
                    f"{tuple(declared['shape'])}; this value is {new['dtype']} of shape "
                    f"{tuple(new['shape'])}"
                )
            values[key] = conform_value(key, value, declared)
        return values

    def plan_files(self) -> list[PlannedFile]:
        """Plan and check the files of every file-backed key of the declared streams.

        Each path is resolved (symlinks too) and refused if it leaves its root or holds
        data already (see :meth:`WriterSpec.plan`), and two keys may not share one: all
        before any writer is made, so a refused run writes nothing. Keys of streams
        declared later are planned when their first value is written.
        """
        return [
            self._plan_file(stream, known, key)
            for stream, known in self._streams.items()
            for key in known.data_keys
            if key in self._writers
        ]

    def _plan_file(self, stream: str, known: _Stream, key: str) -> PlannedFile:
        planned = known.planned.get(key)
        if planned is not None:
            return planned
        spec = self._writers[key]
        planned = spec.plan(
            {"start": self.start_doc, "descriptor": known.bundle.descriptor_doc},
            key,
            # The run uid first: no two runs' default paths meet.
            f"{self.uid}/{stream}/{key}",
        )
        real = os.path.realpath(planned.full_path)
        for other_stream, other in self._streams.items():
            for other_key, other_planned in other.planned.items():
                if os.path.realpath(other_planned.full_path) == real:
                    raise AssetExistsError(
                        errno.EEXIST,
                        f"{key!r} of stream {stream!r} would be written to "
                        f"{planned.full_path!r}, where {other_key!r} of stream "
                        f"{other_stream!r} is written",
                        planned.full_path,
                    )
        known.planned[key] = planned
        return planned

    def _open_file_key(
        self, stream: str, known: _Stream, key: str, docs: list[Document]
    ) -> _FileKey:
        spec = self._writers[key]
        planned = self._plan_file(stream, known, key)
        root = ensure_writable_root(planned.root)
        resource_path, resource_kwargs = planned.resource_path, dict(planned.resource_kwargs)
        if spec.file_format is not None:
            resource_kwargs.update(spec.file_format.key_resource_kwargs(key, known.data_keys[key]))
        full_path = planned.full_path
        writer = spec.writer(full_path, **resource_kwargs)
        if self._asset_documents == "stream":
            if spec.file_format is None:
                raise AnalysisStoreError(
                    f"{key!r} uses writer {spec.writer.__qualname__} with spec {spec.spec!r}, "
                    "which no registered format describes to tiled; register a FileFormat "
                    "for it or use asset_documents='resource'"
                )
            frame_shape = tuple(known.data_keys[key]["shape"])
            parameters = spec.file_format.stream_parameters(resource_kwargs, frame_shape)
            bundle = self._bundle.compose_stream_resource(
                mimetype=spec.file_format.mimetype,
                uri=spec.file_format.stream_uri(full_path),
                data_key=key,
                parameters=parameters,
                validate=self._validate,
            )
            docs.append(("stream_resource", bundle.stream_resource_doc))
            file_key = _FileKey(writer, bundle.compose_stream_datum, bundle.stream_resource_doc)
        else:
            bundle = self._bundle.compose_resource(
                spec=spec.spec,
                root=root,
                resource_path=resource_path,
                resource_kwargs=resource_kwargs,
                validate=self._validate,
            )
            docs.append(("resource", bundle.resource_doc))
            file_key = _FileKey(writer, bundle.compose_datum, bundle.resource_doc)
        known.file_keys[key] = file_key
        return file_key


def _rewound(file_key: _FileKey) -> bool:
    """Forget the frame ``file_key`` wrote last, if its writer can; ``True`` if it did."""
    rewind = getattr(file_key.writer, "rewind", None)
    if rewind is None:
        return False
    try:
        rewind(file_key.index)
    except Exception:
        logger.exception("could not rewind %r to frame %d", file_key.writer, file_key.index)
        return False
    return True


def _plan_streams(
    data_dicts: list[Mapping[str, Mapping[str, Any]]], writers: Mapping[str, WriterSpec]
) -> tuple[dict[str, dict[str, dict[str, Any]]], list[dict[str, dict[str, Any]]]]:
    """Check every value and return the data keys of each stream and the events' values in
    those keys' dtypes, before anything is written."""
    streams: dict[str, dict[str, dict[str, Any]]] = {}
    events: list[dict[str, dict[str, Any]]] = []
    for n, by_stream in enumerate(data_dicts):
        if not isinstance(by_stream, Mapping):
            raise AnalysisStoreError(
                f"data_dicts[{n}] must map stream names to data, not {type(by_stream).__name__}"
            )
        event: dict[str, dict[str, Any]] = {}
        for stream, data in by_stream.items():
            check_stream_name(stream)
            if not isinstance(data, Mapping):
                raise AnalysisStoreError(
                    f"data_dicts[{n}][{stream!r}] must map data keys to values"
                )
            keys = streams.get(stream)
            if keys is not None and set(keys) != set(data):
                raise DataKeyError(
                    f"data_dicts[{n}][{stream!r}] has keys {sorted(data)}, earlier events of "
                    f"that stream have {sorted(keys)}"
                )
            if keys is None:
                check_stream_keys(stream, [check_data_key(key) for key in data])
            keys = streams.setdefault(stream, {})
            values = event[stream] = {}
            for key, value in data.items():
                values[key] = normalise_event_value(check_data_key(key), value)
                described = describe_event_value(key, values[key])
                keys[key] = (
                    _merge_planned(key, keys[key], described, writers.get(key))
                    if key in keys
                    else described
                )
        events.append(event)
    for keys in streams.values():
        for key, data_key in keys.items():
            spec = writers.get(key)
            if is_table_key(data_key) or is_ragged_key(data_key):
                continue  # checked value by value; written as Parquet
            check_storable(key, data_key, to_file=spec is not None, spec=spec and spec.spec)
    # Every value in the dtype its key settled on (refused if that would change it).
    for event in events:
        for stream, values in event.items():
            for key, value in values.items():
                declared = streams[stream][key]
                if is_table_key(declared):
                    values[key] = conform_table(key, value, declared)
                elif is_ragged_key(declared):
                    values[key] = conform_ragged(key, value, declared)
                else:
                    values[key] = conform_value(key, value, declared)
    return streams, events


def _merge_planned(
    key: str, known: Mapping[str, Any], new: Mapping[str, Any], spec: WriterSpec | None
) -> dict[str, Any]:
    """Widen ``known`` to admit ``new`` (see :func:`merge_data_key`). A key of 1-D arrays
    whose length changes becomes variable-length (``shape`` ``[None]``), written as
    Parquet, unless a writer of another format was asked for; a table stays a table."""
    if is_table_key(known) or is_table_key(new):
        if not (is_table_key(known) and is_table_key(new)):
            raise DataValueError(f"{key!r} mixes tables and other values within a stream")
        if [c[0] for c in known["dtype_numpy"]] != [c[0] for c in new["dtype_numpy"]]:
            raise DataValueError(
                f"table {key!r} changes its columns within a stream: "
                f"{[c[0] for c in known['dtype_numpy']]} then {[c[0] for c in new['dtype_numpy']]}"
            )
        return widen_table_key(key, known, new)  # every table is then conformed to it
    ragged_allowed = spec is None or spec.spec == TABLE_SPEC
    shapes = (list(known["shape"]), list(new["shape"]))
    if spec is not None and spec.spec == TABLE_SPEC and any(len(s) != 1 for s in shapes):
        raise DataValueError(
            f"{key!r} is written as Parquet, which holds tables and 1-D arrays of any length, "
            f"not values of shape {tuple(new['shape'])}"
        )
    if ragged_allowed and all(len(shape) == 1 for shape in shapes) and shapes[0] != shapes[1]:
        widened = merge_data_key(key, {**known, "shape": [0]}, {**new, "shape": [0]}, to_file=False)
        return describe_ragged(np.empty(0, dtype=np.dtype(widened["dtype_numpy"])))
    return merge_data_key(key, known, new, to_file=spec is not None)


def compose_documents(
    data_dicts: Iterable[Mapping[str, Mapping[str, Any]]],
    md: Mapping[str, Any] | None,
    writers_dict: Mapping[str, Any] | None = None,
    *,
    parents: Any = (),
    files: Any = (),
    code: Any = None,
    root: str | os.PathLike[str] | None = None,
    asset_documents: AssetDocuments = "stream",
    strict: bool = True,
    readable_roots: Iterable[str | os.PathLike[str]] | None = None,
) -> Iterator[Document]:
    """Yield ``(name, doc)`` for one complete run holding ``data_dicts``.

    ``data_dicts[n][stream_name][data_key]`` is one value. ``md`` goes into the start
    document, next to ``parent_uids`` and ``provenance`` (see :func:`make_provenance` for
    ``parents``, ``files``, ``code`` and ``strict``). Keys in ``writers_dict`` are written to
    files under ``root``; the rest go inline. Every input is checked before the first file is
    written, so a refused run leaves nothing behind: so is every file's path, which must stay
    inside its writer root (symlinks resolved) and hold no data yet, and, when
    ``readable_roots`` is given (:meth:`AnalysisStore.save` gives the store's), lie inside
    one of those folders (:class:`AssetLocationError`, :class:`AssetExistsError`).
    """
    data_dicts = list(data_dicts)
    metadata = check_metadata(md)
    writers = resolve_writers(writers_dict, root)
    planned, data_dicts = _plan_streams(data_dicts, writers)
    readable = None if readable_roots is None else [os.fspath(r) for r in readable_roots]
    used_roots = {writers[key].root for keys in planned.values() for key in keys if key in writers}
    for used_root in sorted(used_roots):
        if readable is not None:  # before the root is made: nothing may appear outside
            check_readable(used_root, readable, what="the writer root")
        ensure_writable_root(used_root)
    parent_uids, provenance = make_provenance(parents, files, code, strict=strict)
    composer = RunComposer(
        {**metadata, "parent_uids": parent_uids, "provenance": provenance},
        writers,
        asset_documents=asset_documents,
        table_writer=resolve_writers({"*": "PARQUET"}, root)["*"],
    )
    # Descriptors first (a resource func is given its stream's), then every file planned.
    descriptors = {
        stream: composer.declare_stream(stream, keys) for stream, keys in planned.items()
    }
    for planned_file in composer.plan_files():
        if readable is not None:
            check_readable(planned_file.full_path, readable, what="a planned file")
    return _emit(composer, data_dicts, descriptors)


def _emit(
    composer: RunComposer,
    data_dicts: list[Mapping[str, Mapping[str, Any]]],
    descriptors: dict[str, list[Document]],
) -> Iterator[Document]:
    try:
        yield from composer.start()
        for by_stream in data_dicts:
            for stream, data in by_stream.items():
                yield from descriptors.pop(stream, [])  # just before its stream's first event
                yield from composer.event(stream, data)
        yield from composer.stop("success")
    finally:
        composer.close()
