"""Replaying a saved run from a tiled catalog as the documents a RunEngine would emit.

Offline reduction must go through the same pipeline as live reduction, which consumes
documents. A catalog's own document export (``run.documents()``) gives external data as
``stream_resource``/``stream_datum`` placed after the events and needs a server-side
exporter, so instead the events are rebuilt from tiled's arrays: tiled reads every file
format it knows, and external values arrive already loaded (``filled`` is True). Streams are
interleaved by event time, as the RunEngine emitted them (a ``dark`` stream before the
frames it corrects), and read in blocks so memory stays bounded.

A run may have no stop document: it is still running, or its process died (a crash, a
SIGKILL) before the stop was saved. Such a run is replayed as far as it goes;
:func:`stand_in_stop` is what tells a reduction that its events are over.
"""

from __future__ import annotations

import heapq
import re
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from ._stream_filling import event_value

__all__ = [
    "STAND_IN_REASON",
    "StreamNode",
    "count_events",
    "failed_stop",
    "replay_run",
    "stand_in_stop",
    "stop_document",
    "stream_lengths",
]

STAND_IN_REASON = "raw run incomplete: it has no stop document"
"""The reason of a stand-in stop (:func:`stand_in_stop`), passed on to a child's stop."""

_BLOCK_ROWS = 16
_TABLE_COLUMNS = frozenset({"seq_num", "time"})


class StreamNode:
    """The keys of one stream of a saved run, each looked up once.

    tiled's composite client lists a stream's node again for every key asked of it (two
    listings and a lookup a key): a 3-event run's replay took ~40 requests. Here the node is
    listed once; arrays are made from their listed items (with their data sources, when the
    listing carried them: a local file is then read with no request), a table's columns
    are looked up once each. A stream of another kind of client is asked key by key.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._clients: dict[str, Any] = {}
        self._tables: dict[str, Any] = {}  # column -> the table client holding it
        from tiled.client.composite import CompositeClient

        if not isinstance(stream, CompositeClient):
            self.keys = frozenset(stream)
            return
        from tiled.client.utils import client_for_item

        for key, item in stream.get_contents(include_metadata=True).items():
            attributes = item["attributes"]
            client = client_for_item(
                stream.context,
                stream.structure_clients,
                item,
                include_data_sources=attributes.get("data_sources") is not None,
            )
            if attributes["structure_family"] == "table" and is_stream_table(key):
                for column in attributes["structure"]["columns"]:
                    self._tables[column] = client
            else:
                self._clients[key] = client
        self.keys = frozenset(self._clients) | frozenset(self._tables)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __getitem__(self, key: str) -> Any:
        client = self._clients.get(key)
        if client is None:
            table = self._tables.get(key)
            if table is None:
                client = self._stream[key]
            else:
                # A table's column is held in the catalog, never in a file: there are no
                # data sources to fetch before reading it.
                client = table[key].new_variation(include_data_sources=True)
            self._clients[key] = client
        return client

    def length(self) -> int:
        """How many events it holds (its saved rows; 0 before the first event)."""
        return len(self["seq_num"]) if "seq_num" in self else 0

    def frames(self, key: str) -> int:
        """How many events' values of file-backed ``key`` it holds (0 if none): an array's
        length, a table's partitions (one file per event)."""
        if key not in self:
            return 0
        client = self[key]
        if client.structure_family == "table":
            return int(client.structure().npartitions)
        return len(client)


def is_stream_table(key: str) -> bool:
    """Whether the table node ``key`` of a stream holds the stream's own rows (TiledWriter
    names them ``internal``, ``internal_0``...), not the tables of a table-valued key."""
    return re.fullmatch(r"internal(_[0-9]+)?", key) is not None


def _stream_events(
    stream_name: str, stream: StreamNode, descriptor: dict[str, Any]
) -> Iterator[tuple[float, int, str, dict[str, Any]]]:
    data_keys = list(descriptor["data_keys"])
    available = stream.keys
    if "seq_num" not in available:  # a descriptor, and no event saved yet
        return
    seq_nums = np.asarray(stream["seq_num"].read())
    missing = [key for key in data_keys if key not in available]
    if missing and len(seq_nums):
        raise KeyError(f"stream {stream_name!r} has no data for {missing}")
    times = np.asarray(stream["time"].read())
    external = {k for k, v in descriptor["data_keys"].items() if v.get("external")}
    # Tables and variable-length keys: every event's rows at once, by seq_num.
    by_seq_num = {
        key: events_of_value_table(stream[key], key, descriptor["data_keys"][key])
        for key in data_keys
        if list(descriptor["data_keys"][key].get("shape") or ()) == [None]
    }
    row_keys = [key for key in data_keys if key not in by_seq_num]
    for block_start in range(0, len(seq_nums), _BLOCK_ROWS):
        block_stop = min(block_start + _BLOCK_ROWS, len(seq_nums))
        columns = {key: _rows(stream[key], block_start, block_stop) for key in row_keys}
        stamps = {
            key: _rows(stream[f"ts_{key}"], block_start, block_stop)
            for key in data_keys
            if f"ts_{key}" in available
        }
        for row in range(block_stop - block_start):
            index = block_start + row
            seq_num = int(seq_nums[index])
            time = float(times[index])
            event = {
                "uid": f"{descriptor['uid']}-{seq_num}",
                "descriptor": descriptor["uid"],
                "seq_num": seq_num,
                "time": time,
                "data": {
                    key: by_seq_num[key](seq_num)
                    if key in by_seq_num
                    else event_value(columns[key][row])
                    for key in data_keys
                },
                "timestamps": {
                    key: float(stamps[key][row]) if key in stamps else time for key in data_keys
                },
                "filled": dict.fromkeys(external, True),
            }
            yield time, seq_num, stream_name, event


def events_of_value_table(table: Any, key: str, data_key: dict[str, Any]) -> Any:
    """A function of ``seq_num`` giving that event's value of a table-valued key (a
    DataFrame) or a variable-length key (an array), read from its table node in one go."""
    from ._stream_reading import read_value_table
    from .formats.parquet import RAGGED_COLUMN, SEQ_NUM_COLUMN

    frame = read_value_table(table.context, table.item, key)
    groups = {int(n): rows for n, rows in frame.groupby(SEQ_NUM_COLUMN, sort=False)}
    empty = frame.iloc[0:0]

    if isinstance(data_key.get("dtype_numpy"), list):

        def table_of(seq_num: int) -> Any:
            rows = groups.get(seq_num, empty).drop(columns=SEQ_NUM_COLUMN)
            return rows.reset_index(drop=True)

        return table_of

    def values_of(seq_num: int) -> np.ndarray:
        return groups.get(seq_num, empty)[RAGGED_COLUMN].to_numpy()

    return values_of


def _rows(array: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a tiled array: all of it in one read when that is all."""
    if start == 0 and stop >= len(array):
        return array.read()
    return array[start:stop]


def start_document(run: Any) -> dict[str, Any]:
    """The run's start document, from its node's metadata: read the same way from a
    ``BlueskyRun`` and from the plain nodes of ``AnalysisStore.catalog``."""
    return dict((getattr(run, "metadata", None) or {}).get("start") or {})


def start_with_access_tags(run: Any) -> dict[str, Any]:
    """``run.start`` with the access tags of its node, which TiledWriter keeps out of the
    saved start (as ``tiled_access_tags``, as the start document was written with them):
    a child made from the replay is tagged as its parent (``_access_tags``)."""
    from ._access_tags import ACCESS_TAGS_KEY, node_access_tags

    start = dict(run.start)
    tags = node_access_tags(run)
    if tags and ACCESS_TAGS_KEY not in start:
        start[ACCESS_TAGS_KEY] = sorted(tags)
    return start


def stop_document(run: Any) -> dict[str, Any] | None:
    """The run's stop document, or None when it has none (``run.stop`` raises then)."""
    stop = (getattr(run, "metadata", None) or {}).get("stop")
    return dict(stop) if stop else None


def stream_lengths(run: Any) -> dict[str, int]:
    """How many events each stream of ``run`` holds, counted in the saved rows (a stream
    whose descriptor was saved but no event yet holds 0)."""
    return {name: StreamNode(run[name]).length() for name in run}


def count_events(run: Any) -> int:
    return sum(stream_lengths(run).values())


def stand_in_stop(run: Any) -> dict[str, Any]:
    """A stop document for a run that has none, ending it where its saved events end.

    Its exit status is ``"fail"`` and its reason :data:`STAND_IN_REASON`, as a
    recovery tool closes an interrupted run: a reduction that consumes it makes a child run
    marked failed, which never counts as a complete reduction of the raw run.
    """
    start = run.start
    times = [start.get("time", 0.0)]
    lengths = {}
    for name in run:
        stream = StreamNode(run[name])
        lengths[name] = stream.length()
        if "time" in stream and lengths[name]:
            times.append(float(np.asarray(stream["time"].read()).max()))
    return failed_stop(start["uid"], STAND_IN_REASON, lengths, time=max(times))


def failed_stop(
    run_start: str, reason: str, num_events: dict[str, int], *, time: float | None = None
) -> dict[str, Any]:
    """A stop document closing the run ``run_start`` as failed, for ``reason``, after
    ``num_events``: what closes a run whose own stop never came (default time: now)."""
    import time as clock

    return {
        "uid": str(uuid.uuid4()),
        "run_start": run_start,
        "time": clock.time() if time is None else time,
        "exit_status": "fail",
        "reason": reason,
        "num_events": num_events,
    }


def replay_run(run: Any, *, stand_in: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(name, doc)``: start, descriptors, events with data loaded, stop.

    A run without a stop document ends after its last saved event, with no stop, unless
    ``stand_in``: then with :func:`stand_in_stop`.
    """
    yield "start", start_with_access_tags(run)
    generators = []
    for stream_name in run:
        stream = run[stream_name]
        descriptors = [dict(d) for d in stream.descriptors]
        for descriptor in descriptors:
            yield "descriptor", descriptor
        # Configuration updates add descriptors; the events refer to the first one.
        generators.append(_stream_events(stream_name, StreamNode(stream), descriptors[0]))
    for _, _, _, event in heapq.merge(*generators, key=lambda item: item[:3]):
        yield "event", event
    stop = stop_document(run)
    if stop is None and stand_in:
        stop = stand_in_stop(run)
    if stop is not None:
        yield "stop", stop
