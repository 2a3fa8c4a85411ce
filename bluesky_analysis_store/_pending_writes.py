"""Documents a store is handed while its run writer's imports are still loading.

The run writer (``_tiled_writing``, on bluesky-tiled-plugins) imports tiled's array and
dataframe clients: dask, pandas, pyarrow, xarray, numba; about a second of CPU. A session
that saves its raw runs (``RE.subscribe(store)``) would make its first scan's start document
wait that second on the RunEngine's thread, although the scan does not need the write to go
on. So a store whose writer is not importable yet keeps what it is handed, in order, and a
thread writes it as soon as the writer is ready; the store writes directly again once that
thread has caught up. The run writer buffers event rows between flushes all the same
(``flush_interval``): only the start and descriptors of a session's first run are later than
they were.

Nothing is lost or reordered: the documents are written in the order given, once each, in
this process; reads through the store wait until they are written; interpreter exit waits
for them (among threading's exit hooks, before an in-process server closes). A document the
catalog refuses is logged when it happens and raised by the store's next call, as a
synchronous write would have raised at it.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = [
    "PendingWrites",
    "import_writer",
    "import_writer_in_background",
    "make_imports_exit_safe",
    "writer_importable_now",
]

logger = logging.getLogger(__name__)

WRITER_MODULE = "bluesky_analysis_store._tiled_writing"

Write = Callable[..., None]  # FlushingTiledWriter.__call__(name, doc, *, close_streams)


def writer_importable_now() -> bool:
    """True once the run writer's module is imported completely, by any thread (its last
    statement sets ``IMPORTED``): importing it then costs nothing."""
    return getattr(sys.modules.get(WRITER_MODULE), "IMPORTED", False)


def import_writer() -> None:
    """Import the run writer's module (in a background thread, ahead of need)."""
    importlib.import_module(WRITER_MODULE)


def import_writer_in_background() -> None:
    """Start :func:`import_writer` in a daemon thread."""
    make_imports_exit_safe()
    threading.Thread(target=import_writer, name="analysis-store-imports", daemon=True).start()


def make_imports_exit_safe() -> None:
    """Let a writer import in another thread finish while the interpreter ends.

    ``concurrent.futures``' executors register threading exit hooks when imported (dask
    imports them), which raises once the interpreter is ending: a writer import still
    running then would fail, and so would every write waiting for it. They are imported
    here, on the caller's thread, before the end can come (tens of milliseconds).
    """
    import concurrent.futures.process
    import concurrent.futures.thread  # noqa: F401


class PendingWrites:
    """Documents kept in order until ``make_writer()`` (which imports the run writer) has
    returned, then written from a thread of their own; see the module docstring."""

    def __init__(self, make_writer: Callable[[], Write]) -> None:
        self._make_writer = make_writer
        self._documents: deque[tuple[str, dict[str, Any], bool]] = deque()
        self._lock = threading.Lock()
        self._caught_up = threading.Event()
        self._error: BaseException | None = None
        make_imports_exit_safe()  # make_writer imports the writer: exit may wait for it
        self._thread = threading.Thread(
            target=self._write_all, name="analysis-store-pending-writes", daemon=True
        )
        self._thread.start()
        # Imported here, not with the store: every command line start would pay for it.
        from ._handover import at_threading_exit

        at_threading_exit(self.wait)

    def add(self, name: str, doc: dict[str, Any], close_streams: bool) -> bool:
        """Keep one document to write; False once the thread has caught up, when the caller
        writes it itself. Raises what the catalog refused of an earlier document (once)."""
        with self._lock:
            caught_up = self._caught_up.is_set()
            if not caught_up:
                self._documents.append((name, doc, close_streams))
        if caught_up:
            return False
        self.raise_refused()
        return True

    def wait(self) -> None:
        """Return once every document kept has been written (or refused)."""
        self._caught_up.wait()

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    def raise_refused(self) -> None:
        """Raise, once, the error of a document the catalog refused while kept here."""
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _write_all(self) -> None:
        try:
            write = self._make_writer()
        except BaseException as error:
            with self._lock:
                lost = len(self._documents)
                self._documents.clear()
                self._error = error
                self._caught_up.set()
            logger.error(
                "the store's run writer could not start; %d document(s) not saved: %s",
                lost,
                error,
                exc_info=error,
            )
            return
        while True:
            with self._lock:
                if not self._documents:
                    self._caught_up.set()
                    return
                name, doc, close_streams = self._documents.popleft()
            try:
                write(name, doc, close_streams=close_streams)
            except Exception as error:
                # Later documents are written all the same, as the RunEngine hands a
                # synchronous store its later documents after one raised.
                logger.error(
                    "the store refused the %s document of run %s: %s",
                    name,
                    doc.get("run_start") or doc.get("uid"),
                    error,
                )
                with self._lock:
                    self._error = self._error or error
