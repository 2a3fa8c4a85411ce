"""One writer at a time on an embedded catalog, across processes: a lock file beside it.

Every process that opens an embedded store serves the same SQLite files itself: the session
saving raw runs, the live callback's worker process writing child runs, a notebook or the
CLI reading. tiled reaches ``tables.db`` (the event rows) through ADBC, whose SQLite
connections have no busy timeout, so a request meeting another process's transaction on it
fails at once with "database is locked": a write meeting a write, and a read meeting a
commit. (``catalog.db`` is reached through Python's sqlite3, which waits up to 5 s.)

So each request of an embedded store's client holds ``<folder>/write.lock``: exclusively for
a request that changes the catalog (any method but GET and HEAD), shared for one that reads.
Rows buffered by the store between flushes take no lock; only the requests that reach
SQLite do. The lock is ``flock(2)``: the kernel releases it when its holder dies, so a
process killed while writing never blocks the next one. A store on a tiled server takes no
lock: the server serialises its own database. See docs/decisions/0005.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

try:
    import fcntl
except ImportError:  # not POSIX: one process per store (the callback reduces in a thread)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_FILE",
    "READING_METHODS",
    "CatalogLock",
    "LockingTransport",
    "lock_client",
    "wrap_transport",
]

logger = logging.getLogger(__name__)

LOCK_FILE = "write.lock"
_SHARED, _EXCLUSIVE = (fcntl.LOCK_SH, fcntl.LOCK_EX) if fcntl is not None else (1, 2)

# Requests that only read: they may run together, never during a write.
READING_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class CatalogLock:
    """A shared/exclusive lock on one folder's catalog, held by one process at a time
    for writing (``flock`` on ``<folder>/write.lock``).

    Within a process the threads take turns (a thread lock before the file lock): ``flock``
    counts one holder per open file, so two threads of one process would otherwise share
    it. Re-entrant on one thread; a nested exclusive hold inside a shared one upgrades it.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder) / LOCK_FILE
        if fcntl is None:
            logger.warning(
                "no flock on this system: writes to %s are serialised within this process "
                "only; let one process at a time write to it",
                folder,
            )
        self._open()

    def _open(self) -> None:
        self._pid = os.getpid()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._mode = 0  # _SHARED or _EXCLUSIVE while held, 0 when free

    def _after_fork(self) -> None:
        # A forked child shares the parent's open file, and so its flock: it needs its own.
        # The parent's thread lock may have been held by a thread the child does not have.
        if self._pid != os.getpid():
            self._open()

    def acquire(self, *, exclusive: bool = True, blocking: bool = True) -> bool:
        """Take the lock (waiting for it unless ``blocking=False``); whether it was taken."""
        self._after_fork()
        if not self._thread_lock.acquire(blocking=blocking):
            return False
        mode = _EXCLUSIVE if exclusive else _SHARED
        try:
            if self._mode != _EXCLUSIVE and self._mode != mode:
                if fcntl is not None:
                    fcntl.flock(self._fd, mode | (0 if blocking else fcntl.LOCK_NB))
                self._mode = mode
        except BlockingIOError:
            self._thread_lock.release()
            return False
        except BaseException:
            self._thread_lock.release()
            raise
        self._depth += 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._mode = 0
        self._thread_lock.release()

    @contextlib.contextmanager
    def held(self, *, exclusive: bool = True) -> Iterator[None]:
        self.acquire(exclusive=exclusive)
        try:
            yield
        finally:
            self.release()

    def close(self) -> None:
        os.close(self._fd)

    def __repr__(self) -> str:
        return f"<CatalogLock {self.path}>"


class LockingTransport(httpx.BaseTransport):
    """An httpx transport that holds a :class:`CatalogLock` for each request it passes on:
    exclusively for one that writes, shared for one that reads."""

    def __init__(self, inner: httpx.BaseTransport, lock: CatalogLock) -> None:
        self.inner = inner
        self.lock = lock

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self.lock.held(exclusive=request.method not in READING_METHODS):
            response = self.inner.handle_request(request)
            # The body too, inside the lock: a streamed response still reads SQLite.
            response.read()
        return response

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> LockingTransport:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.inner.__exit__(*exc_info)


def lock_client(client: Any, lock: CatalogLock) -> None:
    """Make every request of a tiled client (an in-process app's) hold ``lock``."""
    wrap_transport(client.context.http_client, lambda inner: LockingTransport(inner, lock))


def wrap_transport(
    http_client: httpx.Client, wrapper: Callable[[httpx.BaseTransport], httpx.BaseTransport]
) -> None:
    """Put ``wrapper(transport)`` in place of an httpx client's transport.

    httpx has no public way to do it once a client is made, which tiled's Context does
    inside; tiled sets its own caching transport the same way (tiled.client.context)."""
    http_client._transport = wrapper(http_client._transport)
