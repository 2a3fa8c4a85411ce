"""Events per second saved through ``bluesky-analysis-store serve`` on PostgreSQL, by 1, 2 and
4 concurrent writer processes, against the same documents written by bluesky-tiled-plugins'
``TiledWriter`` directly into the same server (the ceiling the project adds to).

    .venv/bin/python benchmarks/bench_server_writers.py            # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_server_writers.py --quick    # a smoke test

A throwaway PostgreSQL 15 cluster (tests/_postgres.py) and one ``serve --database`` process
(tests/_serve_process.py) are started for the run and stopped at its end. Each writer
process saves ``--runs`` child runs of ``--events`` events (a float and a 16x16 float32
frame written to HDF5 under the store's assets):

project  ``store.save(data, md, {"frame": "HDF5"}, parents=..., code=...)`` through
         ``AnalysisStore.from_uri``: composing the documents and writing the frames,
         journaling, saving, and reading the run back to check it, all on the clock.
peer     The same kind of run composed beforehand, off the clock (the same composer, so the
         same documents and files), then given to ``TiledWriter(client)`` document by
         document: only the writing is on the clock.

Writers are forked from one process that has imported everything, wait for each other,
and start together; a rate is all their events over the time from the first start to the
last end. Both methods run side by side for each writer count, alternately, on one server.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
from _postgres import PostgresCluster  # noqa: E402
from _serve_process import API_KEY, ServeProcess  # noqa: E402

# Everything a save imports, before the fork.
import bluesky_analysis_store._delivery  # noqa: E402, F401
import bluesky_analysis_store._tiled_writing  # noqa: E402, F401
from bluesky_analysis_store import AnalysisStore  # noqa: E402
from bluesky_analysis_store._composer import compose_documents  # noqa: E402

FRAME_SHAPE = (16, 16)
DEADLINE = 600.0  # seconds to wait for a writer, not a measured time


def _data(writer: int, run: int, events: int) -> list[dict[str, Any]]:
    return [
        {
            "primary": {
                "x": float(writer * 1000 + run * 10 + event),
                "frame": np.full(FRAME_SHAPE, event, dtype="float32"),
            }
        }
        for event in range(events)
    ]


def _writer(
    method: str, uri: str, assets: str, writer: int, runs: int, events: int,
    barrier: Any, results: Any,
) -> None:  # fmt: skip
    import httpx

    requests = 0
    send = httpx.Client.send

    def counting_send(self: Any, request: Any, **kwargs: Any) -> Any:
        nonlocal requests
        requests += 1
        return send(self, request, **kwargs)

    httpx.Client.send = counting_send  # type: ignore[method-assign]  # this process only
    try:
        parents = [{"uid": str(uuid.uuid4()), "time": 0.0}]
        if method == "project":
            store = AnalysisStore.from_uri(uri, API_KEY, asset_root=assets, readable_roots=[assets])
            len(store)  # connected
            barrier.wait(DEADLINE)
            start, requests = time.perf_counter(), 0
            for run in range(runs):
                store.save(
                    _data(writer, run, events), {"writer": writer}, {"frame": "HDF5"},
                    parents=parents, code=np.mean,
                )  # fmt: skip
        else:
            from bluesky_tiled_plugins import TiledWriter
            from tiled.client import from_uri

            client = from_uri(uri, api_key=API_KEY)
            composed = [
                list(
                    compose_documents(
                        _data(writer, run, events),
                        {"writer": writer},
                        {"frame": "HDF5"},
                        root=assets,
                        parents=parents,
                        code=np.mean,
                    )  # fmt: skip
                )
                for run in range(runs)
            ]
            barrier.wait(DEADLINE)
            start, requests = time.perf_counter(), 0
            for documents in composed:
                tiled_writer = TiledWriter(client)
                for name, doc in documents:
                    tiled_writer(name, doc)
        results.put((writer, start, time.perf_counter(), requests / runs, None))
    except BaseException as error:  # reported by the parent
        results.put((writer, 0.0, 0.0, 0.0, repr(error)))


def measure(
    method: str, server: ServeProcess, writers: int, runs: int, events: int
) -> tuple[float, float]:
    """Events per second of ``writers`` processes saving ``runs`` runs each at once, and
    the HTTP requests a run took."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(writers)
    results = context.Queue()
    processes = [
        context.Process(
            target=_writer,
            args=(method, server.uri, str(server.assets), n, runs, events, barrier, results),
        )
        for n in range(writers)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=DEADLINE) for _ in processes]
    for process in processes:
        process.join(DEADLINE)
    errors = [error for *_, error in outcomes if error]
    if errors:
        raise RuntimeError(f"{method} with {writers} writers failed: {errors}")
    first = min(start for _, start, _, _, _ in outcomes)
    last = max(end for _, _, end, _, _ in outcomes)
    per_run = sum(requests for *_, requests, _ in outcomes) / writers
    return writers * runs * events / (last - first), per_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=4, help="runs per writer (default 4)")
    parser.add_argument("--events", type=int, default=50, help="events per run (default 50)")
    parser.add_argument("--quick", action="store_true", help="1 run of 5 events per writer")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.events = 1, 5
    rates: dict[int, dict[str, float]] = {}
    requests: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-server-") as work:
        with PostgresCluster() as cluster:
            folder = Path(work) / "store"
            with ServeProcess(folder, "--database", cluster.uri()) as server:
                for method in ("project", "peer"):  # off the clock: first requests, tables
                    measure(method, server, 1, 1, 2)
                for writers in args.writers:
                    rates[writers] = {}
                    for method in ("project", "peer"):
                        rate, per_run = measure(method, server, writers, args.runs, args.events)
                        rates[writers][method] = rate
                        requests[method] = per_run
    print(
        f"\n{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{args.runs} runs x {args.events} events per writer (a float and a "
        f"{FRAME_SHAPE[0]}x{FRAME_SHAPE[1]} float32 frame in HDF5)"
    )
    print(f"{'writers':>7}  {'project ev/s':>12}  {'TiledWriter ev/s':>16}  {'ratio':>6}")
    for writers, rate in rates.items():
        ratio = rate["project"] / rate["peer"]
        print(f"{writers:>7}  {rate['project']:>12.1f}  {rate['peer']:>16.1f}  {ratio:>6.2f}")
    print(
        f"HTTP requests per run: project {requests['project']:.0f}, "
        f"TiledWriter {requests['peer']:.0f}"
    )
    if args.json:
        figures = {"events_per_second": rates, "requests_per_run": requests}
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
