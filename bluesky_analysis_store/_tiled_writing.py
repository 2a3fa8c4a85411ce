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

import logging
import threading
import time
from typing import Any

from bluesky_tiled_plugins.writing.tiled_writer import RunNormalizer, _RunWriter
from event_model import RunRouter

__all__ = ["FlushingTiledWriter"]

logger = logging.getLogger(__name__)

# Large enough that the plugin never writes on its own between flushes.
_BATCH_SIZE = 100_000


class FlushingTiledWriter:
    """A document callback that writes runs into a tiled catalog, buffering between flushes."""

    def __init__(self, client: Any, *, flush_interval: float = 0.5) -> None:
        self._client = client.include_data_sources()
        self._flush_interval = flush_interval
        self._run_writers: dict[str, _RunWriter] = {}
        self._last_flush = time.monotonic()
        self._lock = threading.RLock()
        self._router = RunRouter([self._factory])

    def _factory(self, name: str, start: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        run_writer = _RunWriter(self._client, batch_size=_BATCH_SIZE)
        normalizer = RunNormalizer()
        normalizer.subscribe(run_writer)
        self._run_writers[start["uid"]] = run_writer
        return [normalizer], []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        with self._lock:
            self._router(name, doc)
            if name == "stop":
                self._run_writers.pop(doc["run_start"], None)
            elif time.monotonic() - self._last_flush >= self._flush_interval:
                self.flush()

    def flush(self) -> None:
        """Write every buffered event row and stream datum of the open runs now."""
        with self._lock:
            for run_writer in self._run_writers.values():
                _flush_run_writer(run_writer)
            self._last_flush = time.monotonic()

    @property
    def pending(self) -> bool:
        """Whether any open run holds rows or datums not yet written."""
        return any(
            any(rows for rows in writer._internal_data_cache.values())
            or writer._external_data_cache
            for writer in self._run_writers.values()
        )


def _flush_run_writer(run_writer: _RunWriter) -> None:
    for stream_name, rows in run_writer._internal_data_cache.items():
        if rows:
            run_writer._write_internal_data(rows, desc_node=run_writer._desc_nodes[stream_name])
            rows.clear()
    cache = run_writer._external_data_cache
    for stream_resource_uid in list(cache):
        run_writer._write_external_data(cache.pop(stream_resource_uid))
