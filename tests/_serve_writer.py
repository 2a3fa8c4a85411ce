"""One of several writer processes of tests/test_serve.py: saves runs whose every value
names this writer, through a ``serve`` server, and prints their uids as JSON.

``python _serve_writer.py URI API_KEY ASSETS WRITER RUNS BARRIER PARENT_UID``: connects,
prints ``ready``, waits for the file BARRIER (so that every writer starts at once), saves.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from bluesky_analysis_store import AnalysisStore

EVENTS = 3
FRAME_SHAPE = (4, 3)


def values(writer: int, run: int, event: int) -> dict[str, object]:
    """What event ``event`` of run ``run`` of writer ``writer`` holds."""
    tag = writer * 1000 + run * 10 + event
    return {
        "frame": np.full(FRAME_SHAPE, tag, dtype="int64"),
        "inline": np.full((2,), tag, dtype="float64"),
        "tag": tag,
    }


def main(argv: list[str]) -> int:
    uri, api_key, assets, writer, runs, barrier, parent_uid = argv
    store = AnalysisStore.from_uri(
        uri, api_key, asset_root=assets, readable_roots=[assets], flush_interval=0.05
    )
    len(store)  # connected: the key works
    print("ready", flush=True)
    while not Path(barrier).exists():
        time.sleep(0.01)
    uids = []
    for run in range(int(runs)):
        uid = store.save(
            [{"primary": values(int(writer), run, event)} for event in range(EVENTS)],
            {"writer": int(writer), "run": run},
            {"frame": "HDF5"},
            parents=[{"uid": parent_uid, "time": 0.0}],
            code=np.mean,
        )
        uids.append(uid)
    print(json.dumps(uids), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
