"""A beamline session in a process of its own, for the tests that kill it or its store:
``python _scan_in_subprocess.py STORE API_KEY POINTS DELAY``.

It prints ``worker PID``, ``raw UID`` at the raw run's start, ``event N`` at each raw
event, and ``closed`` once the callback is closed after the scan.
"""

from __future__ import annotations

import logging
import sys

from _reducers_for_tests import SeqNumFrames
from bluesky import RunEngine
from bluesky.plans import count
from ophyd.sim import det

from bluesky_analysis_store import AnalysisStore, AnalysisStoreCallback


def main() -> None:
    location, api_key, points, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(
        sys.argv[4]
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if location.startswith("http"):
        store = AnalysisStore.from_uri(location, api_key)
    else:
        store = AnalysisStore.open(location)
    callback = AnalysisStoreCallback([SeqNumFrames()], store, stop_timeout=30)
    callback.flush(120)  # the worker has opened the store
    print("worker", callback.worker_pid, flush=True)
    RE = RunEngine({})  # noqa: N806
    RE.subscribe(callback)

    def tell(name: str, doc: dict) -> None:
        if name == "start":
            print("raw", doc["uid"], flush=True)
        elif name == "event":
            print("event", doc["seq_num"], flush=True)

    RE.subscribe(tell)
    RE(count([det], num=points, delay=delay))
    callback.close(timeout=10)
    print("closed", flush=True)


if __name__ == "__main__":
    main()
