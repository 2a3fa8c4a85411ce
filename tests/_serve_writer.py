"""Several writer processes for tests/test_serve.py: each saves runs whose every value names
its writer, through a ``serve`` server, all starting at once.

``python _serve_writer.py URI API_KEY ASSETS WRITERS RUNS PARENT_UID`` imports what saving
needs once, then forks WRITERS processes (no thread runs yet, so forking is safe), which
connect, wait for each other and save RUNS child runs of PARENT_UID each. It prints
``{"writer": {"pid": ..., "uids": [...]}, ...}`` as JSON, or exits 1 with the tracebacks.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import traceback
from typing import Any

import numpy as np

# Everything a save imports, imported before the fork: each writer starts at once.
import bluesky_analysis_store._delivery  # noqa: F401
import bluesky_analysis_store._tiled_writing  # noqa: F401
import bluesky_analysis_store.formats.hdf5  # noqa: F401
from bluesky_analysis_store import AnalysisStore

EVENTS = 3
FRAME_SHAPE = (4, 3)
DEADLINE = 120.0  # seconds to wait for the other writers, not a measured time


def values(writer: int, run: int, event: int) -> dict[str, Any]:
    """What event ``event`` of run ``run`` of writer ``writer`` holds."""
    tag = writer * 1000 + run * 10 + event
    return {
        "frame": np.full(FRAME_SHAPE, tag, dtype="int64"),
        "inline": np.full((2,), tag, dtype="float64"),
        "tag": tag,
    }


def write_runs(
    uri: str, api_key: str, assets: str, writer: int, runs: int, parent_uid: str,
    barrier: Any, results: Any,
) -> None:  # fmt: skip
    try:
        store = AnalysisStore.from_uri(
            uri, api_key, asset_root=assets, readable_roots=[assets], flush_interval=0.05
        )
        len(store)  # connected: the key works
        barrier.wait(DEADLINE)
        uids = [
            store.save(
                [{"primary": values(writer, run, event)} for event in range(EVENTS)],
                {"writer": writer, "run": run},
                {"frame": "HDF5"},
                parents=[{"uid": parent_uid, "time": 0.0}],
                code=np.mean,
            )
            for run in range(runs)
        ]
        results.put((writer, {"pid": os.getpid(), "uids": uids}))
    except BaseException:
        results.put((writer, {"error": traceback.format_exc()}))
        raise


def main(argv: list[str]) -> int:
    uri, api_key, assets, writers, runs, parent_uid = argv
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(int(writers))
    results = context.Queue()
    processes = [
        context.Process(
            target=write_runs,
            args=(uri, api_key, assets, writer, int(runs), parent_uid, barrier, results),
        )
        for writer in range(int(writers))
    ]
    for process in processes:
        process.start()
    outcome = dict(results.get(timeout=DEADLINE * 2) for _ in processes)
    for process in processes:
        process.join(DEADLINE)
    errors = [result["error"] for result in outcome.values() if "error" in result]
    if errors:
        sys.stderr.write("\n".join(errors))
        return 1
    print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
