"""``reprocess --workers N`` and ``--scheduler ADDRESS``: the Dask client the runs go to."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

from ._exits import CommandError

_INSTALL_HINT = "pip install 'bluesky-analysis-store[facility]'"


def _distributed(option: str) -> Any:
    try:
        import distributed
    except ImportError:
        raise CommandError(f"{option} needs Dask distributed ({_INSTALL_HINT})") from None
    return distributed


@contextlib.contextmanager
def reprocess_executor(args: argparse.Namespace) -> Iterator[Any]:
    """None without ``--workers``/``--scheduler``; else a ``distributed.Client``: of a
    ``LocalCluster`` of N single-threaded worker processes that the command starts and
    closes (no dashboard, no profiling), or of the scheduler at ADDRESS."""
    workers = getattr(args, "workers", None)
    scheduler = getattr(args, "scheduler", None)
    if workers is None and scheduler is None:
        yield None
        return
    if scheduler is not None:
        distributed = _distributed("--scheduler")
        try:  # waits distributed.comm.timeouts.connect (30 s unless configured)
            client = distributed.Client(scheduler)
        except (OSError, ValueError, TypeError) as error:
            raise CommandError(
                f"--scheduler: cannot connect to the Dask scheduler at {scheduler!r}: {error}"
            ) from error
        with client:
            yield client
        return
    distributed = _distributed("--workers")
    import dask

    # With no dashboard, nothing shows the profile each worker samples every 10 ms.
    with dask.config.set({"distributed.worker.profile.enabled": False}):
        cluster = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
    with cluster, distributed.Client(cluster) as client:
        yield client
