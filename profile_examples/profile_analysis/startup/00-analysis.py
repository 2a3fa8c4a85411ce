# An IPython profile that reduces every scan live into the analysis store.
#
#   ipython --profile-dir=profile_examples/profile_analysis
#
# then, at the prompt:   RE(scan([cam], motor, -3, 3, 21))
#
# A plot of the derived roi_total against the scan's motor grows while the scan runs, and
# after the scan one line says where its derived run is, e.g.
#   derived run 1a2b3c4d of scan 1 (raw 9f8e7d6c): 21 events reduced, 0 failed; saved in ...
#
# The store folder comes from $BLUESKY_ANALYSIS_STORE (default ./analysis-store). At a
# facility, raw runs go to the raw databroker instead of the analysis store, and the store
# may be a shared tiled server: AnalysisStore.from_uri("https://...", api_key=...).
import os

import matplotlib.pyplot as plt
import numpy as np
from bluesky import RunEngine
from bluesky.callbacks import LivePlot
from bluesky.plans import count, grid_scan, scan  # noqa: F401  (for the user)
from ophyd.sim import SynAxis

from bluesky_analysis_store import AnalysisStore, AnalysisStoreCallback
from bluesky_analysis_store.sim import spot_camera

STORE = os.path.abspath(os.environ.get("BLUESKY_ANALYSIS_STORE", "analysis-store"))
RAW_DATA = os.path.join(STORE, "raw-sim")
os.makedirs(RAW_DATA, exist_ok=True)


def roi_sum(data, roi=(slice(24, 40), slice(0, 64)), key="cam"):
    """Counts in a band of rows through the spot, and the band itself as a 1-D profile.

    Defined here, in the profile: its provenance records this file's git commit (or its
    sha256 when the profile is not in a git checkout) as the code version.
    """
    band = np.asarray(data[key], dtype=np.float32)[roi]
    return {"roi_total": float(band.sum()), "roi_profile": band.sum(axis=0)}


motor = SynAxis(name="motor")
cam = spot_camera(motor, RAW_DATA)

RE = RunEngine({})
store = AnalysisStore.open(STORE, readable=[RAW_DATA])
RE.subscribe(store)  # raw runs (here the same catalog; at a facility, the raw databroker)
# The reduction runs in a worker process started here (roi_sum is sent to it), so the scan
# does not wait for it; its log records, reducer tracebacks among them, show up here.
analysis = AnalysisStoreCallback([roi_sum], store, md={"beamline": "sim"})
# RE.subscribe(analysis), and each plan waits after its runs for their derived data (on the
# RunEngine's loop, without blocking it: Ctrl-C still pauses): RE(...) returns once the
# child run is saved. A plain RE.subscribe(analysis) returns sooner, with the derived data
# still being saved; analysis.flush() waits for it then.
analysis.subscribe(RE)
# The child runs' documents come back to this session as they are made, each event with the
# raw event's motor position and readings: bluesky's own LivePlot, LiveTable or
# BestEffortCallback show derived data live. (Subscribed to the callback, not to RE.)
plt.ion()
roi_plot = LivePlot("roi_total", "motor")
analysis.subscribe(roi_plot)

print(f"analysis store: {STORE}; try RE(scan([cam], motor, -3, 3, 21))")
