"""A real ophyd-async simulated detector, two frames an event, reduced live and offline.

``ophyd_async.sim.SimBlobDetector`` writes its frames (and their pixel sums) into HDF5 and
emits ``stream_resource``/``stream_datum`` documents; prepared with
``TriggerInfo(collections_per_event=2)`` each event holds two frames, and staged twice in one
run it writes two files, so the second file's indices start at 0 again. The raw run is saved
into a real embedded store that may read the detector's folder; it is reduced live by
``AnalysisStoreCallback`` and again offline by ``reprocess``, which reads tiled's arrays. The
two children must hold the same data, and that data must be what the files hold.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Mapping
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import bluesky.plan_stubs as bps  # noqa: E402
import bluesky.preprocessors as bpp  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _helpers import assert_same_array  # noqa: E402
from _live import DocumentRecorder  # noqa: E402
from ophyd_async import sim  # noqa: E402
from ophyd_async.core import StaticPathProvider, TriggerInfo, UUIDFilenameProvider  # noqa: E402
from ophyd_async.plan_stubs import ensure_connected  # noqa: E402

from bluesky_analysis_store import AnalysisStore, AnalysisStoreCallback, reprocess  # noqa: E402

FRAMES_PER_EVENT = 2
EVENTS_PER_FILE = 2
FILES = 2
DATASET = "/entry/data/data"


def frame_pair(data: Mapping[str, Any]) -> dict[str, Any]:
    """An event's frames as the reducer got them, their pixel sums, and the detector's own."""
    frames = np.asarray(data["det"])
    return {
        "frames": frames,
        "pixel_sums": frames.sum(axis=(1, 2), dtype=np.int64),
        "detector_sums": np.asarray(data["det-sum"]),
        "brighter_second": bool(frames[1].sum(dtype=np.int64) > frames[0].sum(dtype=np.int64)),
    }


@pytest.fixture(scope="module")
def detector_folder(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("detector")


@pytest.fixture(scope="module")
def raw_store(
    tmp_path_factory: pytest.TempPathFactory, detector_folder: pathlib.Path
) -> AnalysisStore:
    """The module's store: the raw runs and their children; it may read the detector's files."""
    return AnalysisStore.open(tmp_path_factory.mktemp("store") / "raw", readable=[detector_folder])


def blob_detector(folder: pathlib.Path) -> sim.SimBlobDetector:
    """A SimBlobDetector whose every frame differs from the one before: its pattern moves
    on at each frame (the generator's pause between frames, replaced, also skips waiting)."""
    pattern = sim.PatternGenerator()
    frames_taken = 0

    async def move_on(_: float) -> None:
        nonlocal frames_taken
        frames_taken += 1
        pattern.set_x(0.37 * frames_taken)

    pattern.sleep = move_on
    return sim.SimBlobDetector(
        StaticPathProvider(UUIDFilenameProvider(), folder), pattern, name="det"
    )


def two_files_two_frames_an_event(det: sim.SimBlobDetector):
    """One run: twice, stage the detector (a new file), take events of two frames each."""
    yield from ensure_connected(det)

    @bpp.run_decorator(md={"purpose": "ophyd-async filling test"})
    def run():
        for _ in range(FILES):
            yield from bps.stage(det, wait=True)
            info = TriggerInfo(
                number_of_events=1, collections_per_event=FRAMES_PER_EVENT, livetime=1.0
            )
            yield from bps.prepare(det, info, wait=True)
            for _ in range(EVENTS_PER_FILE):
                yield from bps.trigger_and_read([det])
            yield from bps.unstage(det, wait=True)

    return (yield from run())


def frames_in(paths: list[str], dataset: str) -> np.ndarray:
    arrays = []
    for path in paths:
        with h5py.File(path, "r", swmr=True, locking=False) as file:
            arrays.append(np.asarray(file[dataset]))
    return np.concatenate(arrays)


def test_two_frames_an_event_reduced_live_and_offline_give_identical_children(
    RE,  # noqa: N803
    raw_store: AnalysisStore,
    detector_folder: pathlib.Path,
) -> None:
    folder = detector_folder / "two-frames"
    folder.mkdir()
    det = blob_detector(folder)
    recorder = DocumentRecorder()
    RE.subscribe(raw_store)
    RE.subscribe(recorder)
    callback = AnalysisStoreCallback([frame_pair], raw_store, background=False)
    callback.subscribe(RE)
    try:
        (raw_uid,) = RE(two_files_two_frames_an_event(det))
    finally:
        callback.close(timeout=60)

    # What the detector emitted: two files, each described for both data keys.
    names = [name for name, _ in recorder.docs]
    resources = [doc for name, doc in recorder.docs if name == "stream_resource"]
    assert names.count("event") == FILES * EVENTS_PER_FILE
    assert names.count("stream_datum") == 2 * FILES * EVENTS_PER_FILE
    assert len(resources) == 2 * FILES
    files = sorted({doc["uri"].removeprefix("file://localhost") for doc in resources})
    assert len(files) == FILES
    [descriptor] = [doc for name, doc in recorder.docs if name == "descriptor"]
    assert descriptor["data_keys"]["det"]["shape"] == [FRAMES_PER_EVENT, 240, 320]
    # In the order the run wrote them: the first file's frames, then the second's.
    files = [doc["uri"].removeprefix("file://localhost") for doc in resources[::2]]
    events = FILES * EVENTS_PER_FILE
    frames = frames_in(files, DATASET).reshape(events, FRAMES_PER_EVENT, 240, 320)
    sums = frames_in(files, "/entry/sum").reshape(events, FRAMES_PER_EVENT)
    assert frames.dtype == np.uint8
    # Every frame differs from every other: a frame read from the wrong place shows.
    flat = frames.reshape(events * FRAMES_PER_EVENT, -1)
    assert len({row.tobytes() for row in flat}) == events * FRAMES_PER_EVENT

    # The raw run in the store: tiled reads the two files as one array of frame pairs.
    raw = raw_store.read_stream(raw_uid, "primary", ["det", "det-sum"])
    assert_same_array(raw["det"], frames, "raw det")
    assert_same_array(raw["det-sum"], sums, "raw det-sum")

    [live_child] = raw_store.children(raw_uid)
    report = reprocess(raw_store, raw_uid, [frame_pair], raw_store, force=True, progress=False)
    assert report.failed == {}
    offline_uid = report.saved[raw_uid]
    live, offline = raw_store[str(live_child)], raw_store[offline_uid]

    # The live child holds the right numbers ...
    for child in (live, offline):
        assert child.stop["exit_status"] == "success"
        assert child.stop["reduction"]["events_reduced"] == events
        assert child.stop["reduction"]["events_failed"] == 0
        assert child.stop["num_events"] == {"primary": events}
    columns = sorted(k for k in live["primary"] if k != "time" and not k.startswith("ts_"))
    assert {"frames", "pixel_sums", "detector_sums", "parent_seq_num"} <= set(columns)
    primary = raw_store.read_stream(str(live_child), "primary", columns)
    assert_same_array(primary["frames"], frames, "frames")
    assert_same_array(primary["pixel_sums"], frames.sum(axis=(2, 3), dtype=np.int64))
    assert_same_array(primary["detector_sums"], sums, "detector_sums")
    assert_same_array(primary["pixel_sums"], sums, "pixel sums are the detector's")
    assert primary["parent_seq_num"].tolist() == list(range(1, events + 1))

    # ... and the offline child the very same: keys, descriptors, dtypes, shapes, values.
    assert sorted(live) == sorted(offline) == ["primary"]
    live_keys = live["primary"].descriptors[0]["data_keys"]
    offline_keys = offline["primary"].descriptors[0]["data_keys"]
    assert live_keys == offline_keys
    assert columns == sorted(
        k for k in offline["primary"] if k != "time" and not k.startswith("ts_")
    )
    assert {"frames", "pixel_sums", "detector_sums", "brighter_second"} <= set(columns)
    offline_primary = raw_store.read_stream(offline_uid, "primary", columns)
    for key in columns:
        assert_same_array(offline_primary[key], primary[key], f"primary/{key}")
