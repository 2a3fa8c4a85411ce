"""Reprocessing one batch serially and on a Dask LocalCluster of 1 and 2 workers: runs/min,
against TiledWriter writing the same child documents alone.

``--runs`` raw runs of ``--events`` simulated camera frames (``--shape``) are saved in an
embedded source store; the same batch is reprocessed with the package's example reducer
(``normalise_and_sum``: a frame to an HDF5 file and a scalar per event) three times, each
into a fresh embedded store served by its local server: in this process, then with 1 and
2 worker processes (``reprocess(..., executor=client)``, a LocalCluster of single-threaded
workers, as ``reprocess --workers N`` makes it). The cluster's start is timed apart from
the batch. The ceiling is the batch's child documents, made beforehand, written by
bluesky-tiled-plugins' ``TiledWriter`` alone into a fresh served store.
``python benchmarks/bench_reprocess_cluster.py [--runs 40] [--events 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


def _batch(label: str, action: Any, runs: int) -> dict[str, Any]:
    began = time.perf_counter()
    report = action()
    seconds = time.perf_counter() - began
    if report.failed or len(report.saved) != runs:
        raise SystemExit(f"{label}: not every run was saved:\n{report}")
    return {"label": label, "seconds": seconds, "per_minute": runs * 60.0 / seconds}


def _ceiling(source: Any, raw_uids: list[str], reducers: list[Any], store: Any) -> dict:
    """The ceiling the package adds to: the same batch's child documents, made first (not
    timed: the replay, the reduction and the files), then written by bluesky-tiled-plugins'
    ``TiledWriter`` alone into a fresh store served by its local server."""
    from bluesky_tiled_plugins import TiledWriter

    from bluesky_analysis_store._reduction import ReductionPlan, RunReduction
    from bluesky_analysis_store._replay import replay_run

    plan = ReductionPlan.for_store(reducers, store, streams=("primary",))
    batches = []
    for raw_uid in raw_uids:
        documents: list[tuple[str, dict[str, Any]]] = []
        reduction = RunReduction(plan, lambda name, doc, d=documents: d.append((name, doc)))
        for name, doc in replay_run(source.client[raw_uid], stand_in=True):
            reduction(name, doc)
        batches.append(documents)
    writer = TiledWriter(store.catalog)
    began = time.perf_counter()
    for documents in batches:
        for name, doc in documents:
            writer(name, doc)
    seconds = time.perf_counter() - began
    saved = sum(1 for uid in store.catalog if uid not in raw_uids)
    if saved != len(raw_uids):
        raise SystemExit(f"ceiling: {saved} of {len(raw_uids)} child runs written")
    return {
        "label": "TiledWriter alone (ceiling)",
        "seconds": seconds,
        "per_minute": len(raw_uids) * 60.0 / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--events", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=2, default=(64, 64))
    args = parser.parse_args(argv)

    from bluesky import RunEngine
    from bluesky.plans import count
    from distributed import Client, LocalCluster
    from ophyd.sim import SynAxis

    from bluesky_analysis_store import AnalysisStore, reprocess
    from bluesky_analysis_store._local_server import stop_server
    from bluesky_analysis_store.example_reducers import normalise_and_sum
    from bluesky_analysis_store.sim import spot_camera

    with tempfile.TemporaryDirectory() as folder:
        frames = Path(folder) / "frames"
        frames.mkdir()
        folders = [Path(folder) / name for name in ("raw", "serial", "dask-1", "dask-2", "ceiling")]
        try:
            source = AnalysisStore.open(folders[0], readable=[frames], served=True)
            loop = asyncio.new_event_loop()
            engine = RunEngine({}, loop=loop)
            engine.subscribe(source)
            motor = SynAxis(name="motor")
            cam = spot_camera(motor, str(frames), shape=tuple(args.shape))
            began = time.perf_counter()
            raw_uids = []
            for n in range(args.runs):
                motor.set(-4.0 + 8.0 * n / max(1, args.runs - 1))
                raw_uids += engine(count([cam], num=args.events))
            saving = time.perf_counter() - began
            loop.call_soon_threadsafe(loop.stop)
            engine._th.join()
            loop.close()
            reducers = [normalise_and_sum]
            results = []
            serial_store = AnalysisStore.open(folders[1], served=True)
            results.append(
                _batch(
                    "serial, in this process",
                    lambda: reprocess(source, raw_uids, reducers, serial_store, progress=False),
                    args.runs,
                )
            )
            results.append(
                _ceiling(source, raw_uids, reducers, AnalysisStore.open(folders[4], served=True))
            )
            starts = {}
            for workers, target_folder in ((1, folders[2]), (2, folders[3])):
                target = AnalysisStore.open(target_folder, served=True)
                began = time.perf_counter()
                with (
                    LocalCluster(
                        n_workers=workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=None,
                    ) as cluster,
                    Client(cluster) as client,
                ):
                    starts[workers] = time.perf_counter() - began
                    results.append(
                        _batch(
                            f"Dask, {workers} worker{'s' if workers > 1 else ''}",
                            lambda c=client, t=target: reprocess(
                                source, raw_uids, reducers, t, executor=c, progress=False
                            ),
                            args.runs,
                        )
                    )
        finally:
            for store_folder in folders:
                if (store_folder / "server.json").exists():
                    stop_server(store_folder)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {platform.platform()}"
    )
    print(
        f"batch: {args.runs} runs x {args.events} events of {args.shape[0]}x{args.shape[1]} "
        f"uint16 frames (saved in {saving:.1f} s); reducer normalise_and_sum"
    )
    print(
        "cluster start (not in the batch times): "
        + ", ".join(f"{n} worker(s) {s:.1f} s" for n, s in starts.items())
    )
    serial = results[0]["seconds"]
    print(f"{'':26} {'seconds':>8} {'runs/min':>9} {'vs serial':>10}")
    for result in results:
        print(
            f"{result['label']:26} {result['seconds']:8.1f} {result['per_minute']:9.1f} "
            f"{serial / result['seconds']:9.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
