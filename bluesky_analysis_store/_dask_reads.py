"""tiled's array reads kept on dask's local threads while a ``distributed.Client`` exists.

tiled's client reads an array by computing a dask graph of its blocks with dask's default
scheduler. Where a ``distributed.Client`` is that default (a Dask worker, a notebook with a
cluster) the graph would be shipped to the cluster, and fails to serialize ("Could not
serialize object of type _HLGExprSequence"). Reads made inside :func:`local_dask_reads`
stay in their own process. dask's config is global: concurrent readers (threads) share one
setting, restored when the last ends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["local_dask_reads"]

_lock = threading.Lock()
_users = 0
_config: contextlib.ExitStack | None = None


@contextlib.contextmanager
def local_dask_reads() -> Iterator[None]:
    """Within it, dask computes on its local threads (see the module's doc)."""
    global _users, _config
    try:
        import dask
    except ImportError:  # tiled's array client needs it; without it nothing computes
        yield
        return
    with _lock:
        if _users == 0:
            _config = contextlib.ExitStack()
            _config.enter_context(dask.config.set(scheduler="threads"))
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _config is not None:
                _config.close()
                _config = None
