"""Reproduce against reprocess: the time (and store requests) to check one child run.

A raw run of ``--events`` simulated camera frames (``--shape``) is saved into a fresh
embedded store; ``reprocess`` makes its child with the package's example reducers, then
``reproduce`` checks that child. Both replay the same raw run through the same pipeline;
reproduce reads the child back to compare instead of writing one, so the ratio shows what
the comparison costs. ``python benchmarks/bench_reproduce.py [--events 80] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


class _CountingTransport:
    """Passes requests on, counting them."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.requests = 0

    def handle_request(self, request: Any) -> Any:
        self.requests += 1
        return self.inner.handle_request(request)


def _counted(store: Any, action: Any) -> tuple[float, int, Any]:
    transport = store.client.context.http_client._transport
    counting = _CountingTransport(transport.inner)
    transport.inner = counting
    try:
        began = time.perf_counter()
        result = action()
        return time.perf_counter() - began, counting.requests, result
    finally:
        transport.inner = counting.inner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=80)
    parser.add_argument("--shape", type=int, nargs=2, default=(64, 64))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd.sim import SynAxis

    from bluesky_analysis_store import AnalysisStore, reprocess, reproduce
    from bluesky_analysis_store.example_reducers import normalise_and_sum
    from bluesky_analysis_store.sim import spot_camera

    with tempfile.TemporaryDirectory() as folder:
        raw_folder = Path(folder) / "raw"
        raw_folder.mkdir()
        store = AnalysisStore.open(Path(folder) / "store", readable=[raw_folder])
        motor = SynAxis(name="motor")
        cam = spot_camera(motor, str(raw_folder), shape=tuple(args.shape))
        engine = RunEngine({})
        engine.subscribe(store)
        (raw_uid,) = engine(count([cam], num=args.events))
        reducers = [normalise_and_sum]

        rows = []
        for _ in range(args.repeats):
            made, made_requests, report = _counted(
                store,
                lambda: reprocess(store, raw_uid, reducers, store, force=True, progress=False),
            )
            assert raw_uid in report.saved, str(report)
            child_uid = report.saved[raw_uid]
            checked, checked_requests, result = _counted(
                store, lambda uid=child_uid: reproduce(store, uid, progress=False)
            )
            assert result.identical, str(result)
            rows.append((made, made_requests, checked, checked_requests))

    made = statistics.median(r[0] for r in rows)
    checked = statistics.median(r[2] for r in rows)
    print(f"{args.events} events of {args.shape[0]}x{args.shape[1]} frames, {args.repeats} repeats")
    print(f"{'':12}{'seconds (median)':>18}{'requests':>10}{'per event':>11}")
    print(f"{'reprocess':12}{made:18.2f}{rows[-1][1]:10d}{made / args.events:10.3f}s")
    print(f"{'reproduce':12}{checked:18.2f}{rows[-1][3]:10d}{checked / args.events:10.3f}s")
    print(f"reproduce / reprocess: {checked / made:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
