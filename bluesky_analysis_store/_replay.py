"""Replaying a saved run from a tiled catalog as the documents a RunEngine would emit.

Offline reduction must go through the same pipeline as live reduction, which consumes
documents. A catalog's own document export (``run.documents()``) gives external data as
``stream_resource``/``stream_datum`` placed after the events and needs a server-side
exporter, so instead the events are rebuilt from tiled's arrays: tiled reads every file
format it knows, and external values arrive already loaded (``filled`` is True). Streams are
interleaved by event time, as the RunEngine emitted them (a ``dark`` stream before the
frames it corrects), and read in blocks so memory stays bounded.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["count_events", "replay_run"]

_BLOCK_ROWS = 16
_TABLE_COLUMNS = frozenset({"seq_num", "time"})


def _stream_events(
    stream_name: str, stream: Any, descriptor: dict[str, Any]
) -> Iterator[tuple[float, int, str, dict[str, Any]]]:
    data_keys = list(descriptor["data_keys"])
    available = set(stream)
    seq_nums = np.asarray(stream["seq_num"].read())
    times = np.asarray(stream["time"].read())
    external = {k for k, v in descriptor["data_keys"].items() if v.get("external")}
    for block_start in range(0, len(seq_nums), _BLOCK_ROWS):
        block_stop = min(block_start + _BLOCK_ROWS, len(seq_nums))
        columns = {
            key: stream[key][block_start:block_stop] for key in data_keys if key in available
        }
        missing = [key for key in data_keys if key not in available]
        if missing:
            raise KeyError(f"stream {stream_name!r} has no data for {missing}")
        stamps = {
            key: stream[f"ts_{key}"][block_start:block_stop]
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
                "data": {key: _item(columns[key][row]) for key in data_keys},
                "timestamps": {
                    key: float(stamps[key][row]) if key in stamps else time for key in data_keys
                },
                "filled": dict.fromkeys(external, True),
            }
            yield time, seq_num, stream_name, event


def _item(value: Any) -> Any:
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array


def count_events(run: Any) -> int:
    return sum(len(run[name]["seq_num"]) for name in run)


def replay_run(run: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(name, doc)``: start, descriptors, events with data loaded, stop."""
    yield "start", dict(run.start)
    generators = []
    for stream_name in run:
        stream = run[stream_name]
        descriptors = [dict(d) for d in stream.descriptors]
        for descriptor in descriptors:
            yield "descriptor", descriptor
        # Configuration updates add descriptors; the events refer to the first one.
        generators.append(_stream_events(stream_name, stream, descriptors[0]))
    for _, _, _, event in heapq.merge(*generators, key=lambda item: item[:3]):
        yield "event", event
    stop = run.stop
    if stop is not None:
        yield "stop", dict(stop)
