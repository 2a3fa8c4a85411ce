"""The demo: a simulated scan reduced live into the embedded store, then read back."""

from __future__ import annotations

import os
from typing import Any, TextIO

__all__ = ["run_demo"]


def run_demo(
    store_path: str | os.PathLike[str] | None = None,
    *,
    plot_path: str | os.PathLike[str] = "demo-centroid.png",
    points: int = 21,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Scan a simulated camera across a moving spot, reduce each frame live, show the result.

    The raw run and its derived child run both go into the embedded store at ``store_path``
    (default: ``$BLUESKY_ANALYSIS_STORE`` or ``./analysis-store``); raw frames are written
    under ``<store>/raw-sim``. Returns the uids, the provenance and the plot's path.
    """
    import sys

    from bluesky import RunEngine
    from bluesky.plans import scan
    from ophyd.sim import SynAxis

    from ._callback import AnalysisStoreCallback
    from ._plotting import plot_key
    from ._store import AnalysisStore, default_store_location
    from .example_reducers import spot_statistics
    from .sim import spot_camera

    out = out or sys.stdout
    location = os.path.abspath(os.fspath(store_path or default_store_location()))
    raw_folder = os.path.join(location, "raw-sim")
    os.makedirs(raw_folder, exist_ok=True)
    print(f"opening the analysis store in {location}", file=out)
    store = AnalysisStore.open(location, readable=[raw_folder])

    motor = SynAxis(name="motor")
    camera = spot_camera(motor, raw_folder)
    RE = RunEngine({})  # noqa: N806 - the name every bluesky user knows
    RE.subscribe(store)  # the raw run goes into the same catalog, beside its child
    # summary=False: the demo prints its own account of the reduction, on ``out``.
    analysis = AnalysisStoreCallback(
        [spot_statistics], store, md={"purpose": "demo"}, summary=False
    )
    RE.subscribe(analysis)

    print(f"scanning the motor over {points} points, reducing each frame live...", file=out)
    (raw_uid,) = RE(scan([camera], motor, -3, 3, points))
    analysis.close()
    (child_uid,) = store.children(raw_uid)
    child = store[child_uid]
    provenance = child.start["provenance"]

    print(f"raw run:   {raw_uid}", file=out)
    print(f"child run: {child_uid} (parent_uids={child.start['parent_uids']})", file=out)
    for code in provenance["code"]:
        print(f"code:      {code['name']} version {code.get('version')}", file=out)
    print(f"inputs:    parents {[p['uid'] for p in provenance['parents']]}", file=out)
    packages = provenance["environment"]["packages"]
    print(
        "environment: python "
        + provenance["environment"]["python"]
        + ", "
        + ", ".join(f"{k} {v}" for k, v in sorted(packages.items())),
        file=out,
    )
    stream = child["primary"]
    print("derived data (stream 'primary'):", file=out)
    for key in sorted(stream):
        if key in {"seq_num", "time"} or key.startswith("ts_"):
            continue
        print(f"  {key:<16} shape {tuple(stream[key].shape)} dtype {stream[key].dtype}", file=out)
    reduction = child.stop["reduction"]
    print(
        f"{reduction['events_reduced']} events reduced, {reduction['events_failed']} failed",
        file=out,
    )
    plot = plot_key(child, "centroid_x", plot_path)
    print(f"plot of the spot centroid: {os.path.abspath(plot)}", file=out)
    return {
        "raw_uid": raw_uid,
        "child_uid": child_uid,
        "provenance": provenance,
        "plot": os.path.abspath(plot),
    }
