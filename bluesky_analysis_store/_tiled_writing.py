"""bluesky-tiled-plugins' TiledWriter chain, plus a flush that writes buffered rows now.

TiledWriter batches by count only: event rows and stream datums reach the catalog when a
stream has gathered ``batch_size`` of them, or at ``stop``. Writing every event alone costs
tens of milliseconds a call, so derived data would be either slow to write or invisible
until the run ends. This module builds the same per-run chain TiledWriter builds
(``RunRouter`` -> ``RunNormalizer`` -> run writer) but keeps the run writers, so that
:meth:`FlushingTiledWriter.flush` can write what they hold, whenever the caller decides
(the store flushes at most every ``flush_interval`` seconds). The flush repeats what the run
writer's own ``stop`` does with its caches; no public API of the plugin offers it.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any

from bluesky_tiled_plugins.writing.tiled_writer import RunNormalizer, _RunWriter
from event_model import DocumentNames, RunRouter, schema_validators

from ._filling import EventShortcut, RouterFiller
from ._table_consolidator import register as _register_table_consolidator

__all__ = ["FlushingTiledWriter", "normalized_stream_resource"]

logger = logging.getLogger(__name__)

# event-model's RunRouter warns about factories of its 1.13 API whenever a run's first
# callback raises at the start; here that is a store that failed, which the delivery
# records and retries (the warning's advice does not apply).
warnings.filterwarnings(
    "ignore", message=r".*when RunRouter passed it a 'start' document", category=UserWarning
)

_register_table_consolidator()

# Large enough that the plugin never writes on its own between flushes.
_BATCH_SIZE = 100_000


class FlushingTiledWriter:
    """A document callback that writes runs into a tiled catalog, buffering between flushes."""

    def __init__(
        self, client: Any, *, flush_interval: float | None = 0.5, seal: bool = False
    ) -> None:
        """``flush_interval=None``: rows are written only by :meth:`flush` and at a run's
        stop (the caller decides when). ``seal=True``: each run node gets this package's
        seal (``_trust.py``); only the package's own write path, delivery, asks for it."""
        self._client = client.include_data_sources()
        self._flush_interval = flush_interval
        self._seal = seal
        self._run_writers: dict[str, _RunWriter] = {}
        self._last_flush = time.monotonic()
        self._lock = threading.RLock()
        self._router = RunRouter([self._factory], filler_class=RouterFiller)
        # Runs stopped with close_streams=False whose streams are still to be closed.
        self._defer_closing = False
        self._streams_to_close: list[_RunWriter] = []
        self._normalizers: dict[str, _NpySeqIndexNormalizer] = {}
        self._shortcut = EventShortcut(self._normalizers)

    def _factory(self, name: str, start: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        # max_array_size=0: every inline array becomes an array node of its own; the
        # catalog's SQL tables have no column type for lists.
        run_writer = _LateClosingRunWriter(
            self, self._client, batch_size=_BATCH_SIZE, max_array_size=0
        )
        normalizer = _NpySeqIndexNormalizer()
        normalizer.subscribe(run_writer)
        self._run_writers[start["uid"]] = run_writer
        self._normalizers[start["uid"]] = normalizer
        return [normalizer], []

    def __call__(self, name: str, doc: dict[str, Any], *, close_streams: bool = True) -> None:
        """Write one document. ``close_streams=False`` leaves closing the streams of a run
        it stops to :meth:`close_streams` (or the next flush): the run's data and its stop
        document are saved already, and closing costs a request per node (about 15 ms
        each in-process) that a scan waiting for its child run need not wait for."""
        with self._lock:
            self._defer_closing = not close_streams
            try:
                if name == "stop" and (run_writer := self._run_writers.get(doc["run_start"])):
                    # The plugin's stop combines the array patches of the stream datums it
                    # holds, which fails for a table (it has none): they are written first.
                    _flush_run_writer(run_writer)
                if not self._shortcut.route(name, doc):
                    self._router(name, doc)
                    self._shortcut.learn(name, doc)
            finally:
                self._defer_closing = False
                # Even when writing the run failed at its stop: a run writer kept here would
                # be flushed again, and fail again, on every later document of other runs.
                if name == "stop":
                    self._forget(doc["run_start"])
            if (
                name != "stop"
                and self._flush_interval is not None
                and time.monotonic() - self._last_flush >= self._flush_interval
            ):
                self.flush()

    def _forget(self, run_uid: str) -> None:
        self._run_writers.pop(run_uid, None)
        self._shortcut.forget(self._normalizers.pop(run_uid, None))

    def flush(self) -> None:
        """Write every buffered event row and stream datum of the open runs now, and close
        the streams of stopped runs."""
        with self._lock:
            for run_writer in self._run_writers.values():
                _flush_run_writer(run_writer)
            self._last_flush = time.monotonic()
            self.close_streams()

    def close_streams(self) -> None:
        """Close the streams of the runs stopped with ``close_streams=False``."""
        with self._lock:
            pending, self._streams_to_close = self._streams_to_close, []
            for run_writer in pending:
                try:
                    _RunWriter._close_stream_tree(run_writer)
                except Exception:  # logged by the plugin, node by node; the data is saved
                    pass


class _LateClosingRunWriter(_RunWriter):
    """The plugin's run writer, leaving the closing of its streams to its owner when the
    owner says so (see ``FlushingTiledWriter.__call__``), and sealing the run node when
    the owner seals."""

    def __init__(self, owner: FlushingTiledWriter, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner
        self._keys_by_stream: dict[str, dict[str, Any]] = {}

    def start(self, doc: Any) -> None:
        super().start(doc)
        if self._owner._seal:  # one request more per run, beside the start it seals
            from ._access_tags import ACCESS_TAGS_KEY
            from ._trust import SEAL_KEY, seal_for

            # The plugin keeps the access tags out of the saved start: so does the seal.
            saved = {k: v for k, v in doc.items() if k != ACCESS_TAGS_KEY}
            self.root_node.update_metadata({SEAL_KEY: seal_for(saved)}, drop_revision=True)

    def descriptor(self, doc: Any) -> None:
        super().descriptor(doc)
        self._keys_by_stream[doc["name"]] = dict(doc.get("data_keys", {}))

    def _write_internal_data(self, data_cache: Any, desc_node: Any) -> None:
        # The plugin keeps one ``data_keys`` per run, so a key named alike in two streams
        # takes the dtype of the last descriptor (a bool column read back as int8). Each
        # stream's rows are written with its own descriptor's keys.
        run_keys = self.data_keys
        self.data_keys = {**run_keys, **self._keys_by_stream.get(desc_node.item["id"], {})}
        try:
            super()._write_internal_data(data_cache, desc_node)
        finally:
            self.data_keys = run_keys

    def _close_stream_tree(self) -> None:
        if self._owner._defer_closing:
            self._owner._streams_to_close.append(self)
        else:
            super()._close_stream_tree()


class _EventLayoutNormalizer(RunNormalizer):
    """The plugin's normalizer, checking the schema of an event or a stream datum once per
    layout, not for every one.

    ``RunNormalizer.emit`` checks every document against its jsonschema: about 0.25 ms an
    event, as long as the RunEngine takes for a whole scalar event, and as much for the
    stream datum of every frame written to a file. Their validity depends only on their keys
    and on the types of their values (an event's ``data`` and ``timestamps`` may hold
    anything), so a document whose layout already passed is valid too. Other documents are
    checked every time, as the plugin does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._valid_layouts: set[tuple[Any, ...]] = set()

    def event(self, doc: dict[str, Any]) -> Any:
        # The plugin deep-copies each event before renaming and popping keys of ``data``,
        # ``timestamps`` and ``filled`` (a third of the work of saving a scalar event).
        # When every value is a number or a string, copying those dicts is the same copy.
        if all(_holds_only_scalars(doc.get(part)) for part in ("data", "timestamps", "filled")):
            doc = _CopiedByStructure(doc)
        return super().event(doc)

    def emit(self, name: Any, doc: dict[str, Any]) -> None:
        kind = DocumentNames(name)
        layout_of = _LAYOUTS.get(kind)
        if layout_of is None:
            super().emit(name, doc)
            return
        layout = layout_of(doc)
        if layout is None or layout not in self._valid_layouts:
            schema_validators[kind].validate(doc)
            if layout is not None:
                self._valid_layouts.add(layout)
        self.dispatcher.process(name, doc)


_SCALARS = (str, int, float, bool, type(None))


def _holds_only_scalars(values: Any) -> bool:
    return values is None or (
        type(values) is dict and all(isinstance(v, _SCALARS) for v in values.values())
    )


class _CopiedByStructure(dict):
    """An event whose deep copy is a copy of its dicts: all their values are immutable."""

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        copied = dict(self)
        for part in ("data", "timestamps", "filled"):
            if part in copied:
                copied[part] = dict(copied[part])
        return copied


def _event_layout(doc: dict[str, Any]) -> tuple[Any, ...] | None:
    """What the event schema looks at; None when a value itself matters (a float seq_num)."""
    if type(doc.get("seq_num")) is not int:
        return None
    filled = doc.get("filled")
    filled_types = frozenset(type(v) for v in filled.values()) if isinstance(filled, dict) else None
    return ("event", _key_types(doc), filled_types)


def _stream_datum_layout(doc: dict[str, Any]) -> tuple[Any, ...] | None:
    """What the stream datum schema looks at; None unless both ranges are of ints (for a
    float, whether it is integral matters)."""
    ranges = []
    for name in ("indices", "seq_nums"):
        value = doc.get(name)
        if not isinstance(value, dict) or any(type(v) is not int for v in value.values()):
            return None
        ranges.append(tuple(value))
    return ("stream_datum", _key_types(doc), *ranges)


def _key_types(doc: dict[str, Any]) -> tuple[tuple[str, type], ...]:
    return tuple((key, type(value)) for key, value in doc.items())


_LAYOUTS = {
    DocumentNames.event: _event_layout,
    DocumentNames.stream_datum: _stream_datum_layout,
}


class _NpySeqIndexNormalizer(_EventLayoutNormalizer):
    """The plugin's normalizer, but an ``NPY_SEQ`` datum's frame is its ``index``.

    For a legacy datum without ``indices``/``point_number``/``frame`` the plugin takes the frame
    from the event's ``seq_num``. ophyd.sim numbers ``NPY_SEQ`` frames per resource, across
    streams, so in a run whose streams read one detector (a ``dark`` stream before
    ``primary``) tiled would serve other events' frames.
    """

    def _convert_datum_to_stream_datum(
        self, datum_doc: Any, data_key: str, desc_uid: str, seq_num: int
    ) -> Any:
        kwargs = datum_doc.get("datum_kwargs", {})
        if kwargs.get("_resource_spec") != "NPY_SEQ" or not isinstance(kwargs.get("index"), int):
            return super()._convert_datum_to_stream_datum(datum_doc, data_key, desc_uid, seq_num)
        frame = {"start": kwargs["index"], "stop": kwargs["index"] + 1}
        datum_doc = {**datum_doc, "datum_kwargs": {**kwargs, "indices": frame}}
        sres_doc, sdat_doc = super()._convert_datum_to_stream_datum(
            datum_doc, data_key, desc_uid, seq_num
        )
        sdat_doc["seq_nums"] = {"start": seq_num, "stop": seq_num + 1}
        return sres_doc, sdat_doc


def _flush_run_writer(run_writer: _RunWriter) -> None:
    for stream_name, rows in run_writer._internal_data_cache.items():
        if rows:
            run_writer._write_internal_data(rows, desc_node=run_writer._desc_nodes[stream_name])
            rows.clear()
    cache = run_writer._external_data_cache
    for stream_resource_uid in list(cache):
        run_writer._write_external_data(cache.pop(stream_resource_uid))


@functools.cache
def _normalizer() -> RunNormalizer:
    return RunNormalizer()


def normalized_stream_resource(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The ``stream_resource`` as TiledWriter gives it to a consolidator (a new dict: the
    conversion and some consolidators change the document they are given), so that the live
    filler reads what tiled reads."""
    return _normalizer()._convert_resource_to_stream_resource(copy.deepcopy(dict(doc)))


IMPORTED = True  # the last statement: see _pending_writes.writer_importable_now
