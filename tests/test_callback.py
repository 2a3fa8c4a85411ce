"""The live callback: real RunEngine, ophyd.sim devices, an embedded store on disk."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any
from urllib.parse import unquote, urlparse

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import bluesky.plan_stubs as bps  # noqa: E402
import bluesky.preprocessors as bpp  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import ophyd.sim  # noqa: E402
import pytest  # noqa: E402
import tifffile  # noqa: E402
from bluesky.plans import count, grid_scan, scan  # noqa: E402
from bluesky.utils import RunEngineInterrupted  # noqa: E402
from event_model import Filler  # noqa: E402

from _live import DocumentRecorder, children_of, slow_scaled  # noqa: E402
from _reducers_for_tests import (  # noqa: E402
    DarkSubtractedSum,
    FrameSequence,
    GarbageOnSeqNum,
    RaiseOnSeqNum,
    frame,
    image_stats,
    lowered_in_place,
    scaled,
)
from bluesky_analysis_store import (  # noqa: E402
    AnalysisStore,
    AnalysisStoreCallback,
    AnalysisStoreError,
    ProvenanceError,
    wait_for_derived,
    wait_for_derived_wrapper,
)

# Each test makes callbacks: the module's store is served, as a user's is (conftest.py).
STORE_SERVED = True

# --- fixtures (the rest are shared: conftest.py) ------------------------------------------


@pytest.fixture
def hw(tmp_path: pathlib.Path):
    raw = tmp_path / "raw"
    raw.mkdir()
    return ophyd.sim.hw(save_path=str(raw))


# --- helpers ------------------------------------------------------------------------------


def only_child(store: AnalysisStore, raw_uid: str) -> Any:
    children = store.children(raw_uid)
    assert len(children) == 1, f"expected one child run of {raw_uid}, found {children}"
    return store[children[0]]


def column(run: Any, stream: str, key: str) -> np.ndarray:
    return np.asarray(run[stream][key].read())


def columns(store: AnalysisStore, run: Any, stream: str, *keys: str) -> dict[str, np.ndarray]:
    """The values of several keys of one stream of ``run``, every event, read together
    (``read_stream``: the stream's table in one request, not three requests a key)."""
    return store.read_stream(run.start["uid"], stream, keys)


def data_keys(run: Any, stream: str) -> dict[str, Any]:
    return dict(run[stream].metadata["data_keys"])


def asset_paths(data_source: Any) -> list[str]:
    return [unquote(urlparse(asset.data_uri).path) for asset in data_source.assets]


def is_inside(path: str, folder: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


def filled_raw_frames(raw: DocumentRecorder, uid: str, key: str = "img") -> list[np.ndarray]:
    """The raw frames read back from the raw files, through event-model's own Filler."""
    filler = Filler({"NPY_SEQ": ophyd.sim.NumpySeqHandler}, inplace=False)
    frames = []
    with filler:
        for name, doc in raw.run(uid):
            _, filled = filler(name, doc)
            if name == "event":
                frames.append(np.asarray(filled["data"][key]))
    return frames


# --- 1. count with a scalar reducer -------------------------------------------------------


def test_count_child_run_has_provenance_values_and_links(RE, hw, store, make_callback):
    hw.det.noise.put("uniform")  # readings differ, so the values must follow the real ones
    reducer = functools.partial(scaled, threshold=3)
    callback = make_callback([reducer])
    raw = DocumentRecorder()
    callback.subscribe(RE)
    RE.subscribe(raw)

    (raw_uid,) = RE(count([hw.det], num=5))

    child = only_child(store, raw_uid)
    start = child.start
    assert start["parent_uids"] == [raw_uid]
    provenance = start["provenance"]
    assert provenance["parents"] == [{"uid": raw_uid, "verified": True, "verified_by": "start document"}]
    assert provenance["strict"] is True
    [code] = provenance["code"]
    assert code["name"] == "_reducers_for_tests:scaled"
    assert code["params"] == {"threshold": 3}
    assert code["importable"] is True

    events = raw.events(raw_uid)
    assert len(events) == 5
    det = np.array([e["data"]["det"] for e in events])
    assert len(set(det.tolist())) == 5, "the noisy detector should give distinct readings"
    expected = [reducer(e["data"]) for e in events]
    primary = columns(store, child, "primary", "total", "shifted", "parent_seq_num")
    np.testing.assert_allclose(primary["total"], [x["total"] for x in expected])
    np.testing.assert_allclose(primary["total"], 10 * det + 3)
    np.testing.assert_allclose(primary["shifted"], det - 3)

    assert primary["parent_seq_num"].tolist() == [e["seq_num"] for e in events]
    assert primary["parent_seq_num"].tolist() == [1, 2, 3, 4, 5]

    stop = child.stop
    assert stop["exit_status"] == "success"
    assert stop["num_events"] == {"primary": 5}
    assert stop["reduction"]["events_reduced"] == 5
    assert stop["reduction"]["events_failed"] == 0
    assert stop["reduction"]["failures"] == []


# --- 2. scan and grid_scan ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_plan", "key", "num"),
    [
        (lambda hw: scan([hw.det], hw.motor, -2, 2, 7), "det", 7),
        (
            lambda hw: grid_scan([hw.det4], hw.motor1, -1, 1, 3, hw.motor2, -1, 1, 4),
            "det4",
            12,
        ),
    ],
    ids=["scan", "grid_scan"],
)
def test_scans_give_one_child_event_per_raw_event(
    RE, hw, store, make_callback, make_plan, key, num
):
    reducer = functools.partial(scaled, key=key, threshold=0.5)
    raw = DocumentRecorder()
    make_callback([reducer]).subscribe(RE)
    RE.subscribe(raw)

    (raw_uid,) = RE(make_plan(hw))

    events = raw.events(raw_uid)
    assert len(events) == num
    readings = np.array([e["data"][key] for e in events])
    assert len(set(readings.round(12).tolist())) > 1, "the scan should move the detector's value"
    child = only_child(store, raw_uid)
    primary = columns(store, child, "primary", "total", "shifted", "parent_seq_num")
    total = primary["total"]
    assert len(total) == len(events)
    np.testing.assert_allclose(total, 10 * readings + 0.5)
    np.testing.assert_allclose(primary["shifted"], readings - 0.5)
    assert primary["parent_seq_num"].tolist() == [e["seq_num"] for e in events]
    assert primary["parent_seq_num"].tolist() == list(range(1, num + 1))
    assert child.stop["num_events"] == {"primary": num}
    assert child.start["parent_uids"] == [raw_uid]
    assert child.start["parent_plan_name"] == raw.run(raw_uid)[0][1]["plan_name"]


# --- 3. external image data in, derived image files out -----------------------------------


def test_img_frames_are_filled_and_derived_images_go_to_files(
    RE, hw, store, module_store_folder, make_callback
):
    num = 4
    hw.img.sim_set_func(FrameSequence())
    raw = DocumentRecorder()
    make_callback([image_stats], writers={"as_u16": "TIFF"}).subscribe(RE)
    RE.subscribe(raw)

    (raw_uid,) = RE(count([hw.img], num=num))

    # The raw events hold datum ids: the frames live in NPY_SEQ files.
    events = raw.events(raw_uid)
    assert all(isinstance(e["data"]["img"], str) for e in events)
    assert [d["spec"] for n, d in raw.run(raw_uid) if n == "resource"] == ["NPY_SEQ"]
    frames = filled_raw_frames(raw, raw_uid)
    assert len(frames) == num
    for n, raw_frame in enumerate(frames):
        np.testing.assert_array_equal(raw_frame, frame(n))

    reopened = AnalysisStore.open(module_store_folder)
    child = only_child(reopened, raw_uid)

    primary = columns(
        reopened, child, "primary",
        "is_ndarray", "rows", "cols", "img_total", "doubled", "as_u16",
    )  # fmt: skip
    # The reducer saw numpy arrays of the frame's shape.
    assert primary["is_ndarray"].tolist() == [True] * num
    assert primary["rows"].tolist() == [10] * num
    assert primary["cols"].tolist() == [10] * num
    np.testing.assert_allclose(primary["img_total"], [f.sum() for f in frames])

    keys = data_keys(child, "primary")
    assert keys["doubled"]["external"] == "STREAM:"
    assert keys["as_u16"]["external"] == "STREAM:"
    assert "external" not in keys["img_total"]

    doubled = primary["doubled"]
    assert doubled.dtype == np.float32
    assert doubled.shape == (num, 10, 10)
    np.testing.assert_array_equal(doubled, np.stack([2 * f for f in frames]).astype(np.float32))
    as_u16 = primary["as_u16"]
    assert as_u16.dtype == np.uint16
    assert as_u16.shape == (num, 10, 10)
    np.testing.assert_array_equal(as_u16, np.stack(frames).astype(np.uint16))

    # One stream_resource per derived key for the run, its files under the asset folder.
    # (TiledWriter folds a second stream_resource of a key into the same data source as
    # one more asset, so one data source holding one HDF5 asset means one stream_resource.)
    [hdf5_source] = child["primary"]["doubled"].data_sources()
    assert hdf5_source.mimetype == "application/x-hdf5"
    [hdf5_path] = asset_paths(hdf5_source)
    assert os.path.isfile(hdf5_path)
    assert is_inside(hdf5_path, reopened.asset_root)
    with h5py.File(hdf5_path, "r") as file:
        on_disk = file[hdf5_source.parameters["dataset"]][()]
    np.testing.assert_array_equal(on_disk, doubled)

    [tiff_source] = child["primary"]["as_u16"].data_sources()
    assert tiff_source.mimetype == "multipart/related;type=image/tiff"
    tiff_paths = asset_paths(tiff_source)
    assert len(tiff_paths) == num
    for n, path in enumerate(sorted(tiff_paths)):
        assert os.path.isfile(path)
        assert is_inside(path, reopened.asset_root)
        np.testing.assert_array_equal(tifffile.imread(path), as_u16[n])


# --- 4. a stateful Reducer with a dark stream ---------------------------------------------


def dark_then_light(img: Any, num: int):
    """One ``dark`` event, then ``num`` primary events, all of ``img``."""

    @bpp.stage_decorator([img])
    @bpp.run_decorator(md={"plan_name": "dark_then_light"})
    def inner():
        yield from bps.trigger_and_read([img], name="dark")
        for _ in range(num):
            yield from bps.trigger_and_read([img])

    return (yield from inner())


def test_stateful_reducer_subtracts_dark_and_sums_without_leaking_between_runs(
    RE, hw, store, make_callback
):
    prototype = DarkSubtractedSum(scale=2.0)
    make_callback([prototype]).subscribe(RE)

    hw.img.sim_set_func(FrameSequence(0))  # dark = frame 0, light = frames 1, 2, 3
    (first_uid,) = RE(dark_then_light(hw.img, 3))
    hw.img.sim_set_func(FrameSequence(10))  # dark = frame 10, light = frames 11, 12
    (second_uid,) = RE(dark_then_light(hw.img, 2))

    pixels = frame(0).size
    step = 2.0 * 10.0  # scale * FRAME_STEP: each later frame is this much brighter per pixel
    for raw_uid, num in ((first_uid, 3), (second_uid, 2)):
        child = only_child(store, raw_uid)
        assert set(child) == {"primary", "summary"}
        np.testing.assert_allclose(
            column(child, "primary", "corrected_total"),
            [step * k * pixels for k in range(1, num + 1)],
        )
        per_pixel = step * sum(range(1, num + 1))
        summary = columns(store, child, "summary", "frames", "sum_total", "sum")
        assert summary["frames"].tolist() == [num]
        np.testing.assert_allclose(summary["sum_total"], [per_pixel * pixels])
        summed = summary["sum"]
        assert summed.shape == (1, 10, 10)
        np.testing.assert_allclose(summed[0], np.full((10, 10), per_pixel))
        [code] = child.start["provenance"]["code"]
        assert code["name"] == "_reducers_for_tests:DarkSubtractedSum"
        assert code["params"] == {"key": "img", "scale": 2.0}
        assert child.stop["num_events"] == {"primary": num, "summary": 1}

    # Each run had its own copy: the instance handed to the callback was never used.
    assert prototype._frames == 0
    assert prototype._dark is None
    assert prototype._sum is None


# --- 5. two runs in a row -----------------------------------------------------------------


def test_two_runs_in_a_row_get_their_own_child(RE, hw, store, shared_callback):
    raw = DocumentRecorder()
    shared_callback([scaled]).subscribe(RE)
    RE.subscribe(raw)

    (first_uid,) = RE(count([hw.det], num=3))
    (second_uid,) = RE(scan([hw.det], hw.motor, 0, 1, 4))

    first, second = only_child(store, first_uid), only_child(store, second_uid)
    assert first.start["uid"] != second.start["uid"]
    for child, raw_uid, num, plan_name in (
        (first, first_uid, 3, "count"),
        (second, second_uid, 4, "scan"),
    ):
        assert child.start["parent_uids"] == [raw_uid]
        assert child.start["parent_plan_name"] == plan_name
        assert child.stop["num_events"] == {"primary": num}
        primary = columns(store, child, "primary", "total", "parent_seq_num")
        np.testing.assert_allclose(
            primary["total"], [10 * e["data"]["det"] for e in raw.events(raw_uid)]
        )
        assert primary["parent_seq_num"].tolist() == list(range(1, num + 1))


# --- 6. a scan that fails or is aborted ---------------------------------------------------


def three_events_then(det: Any, ending: str):
    @bpp.run_decorator()
    def inner():
        for _ in range(3):
            yield from bps.trigger_and_read([det])
        yield from bps.null()
        if ending == "fail":
            raise RuntimeError("the sample holder fell off")
        yield from bps.pause()
        yield from bps.trigger_and_read([det])

    return (yield from inner())


@pytest.mark.parametrize("ending", ["fail", "abort"])
def test_failed_or_aborted_scan_gives_a_child_with_the_same_exit_status(
    RE, hw, store, shared_callback, ending
):
    raw = DocumentRecorder()
    shared_callback([scaled]).subscribe(RE)
    RE.subscribe(raw)

    if ending == "fail":
        with pytest.raises(RuntimeError, match="sample holder"):
            RE(three_events_then(hw.det, ending))
    else:
        with pytest.raises(RunEngineInterrupted):
            RE(three_events_then(hw.det, ending))
        assert RE.state == "paused"
        RE.abort("aborted by the test")

    [raw_start] = [d for n, d in raw.docs if n == "start"]
    raw_uid = raw_start["uid"]
    raw_stop = raw.stop(raw_uid)
    assert raw_stop["exit_status"] == ending
    child = only_child(store, raw_uid)
    stop = child.stop
    assert stop is not None
    assert stop["exit_status"] == ending
    assert stop["reason"] == raw_stop["reason"]
    assert stop["reduction"]["events_reduced"] == 3
    assert stop["reduction"]["events_failed"] == 0
    assert stop["reduction"]["raw_exit_status"] == ending
    assert stop["num_events"] == {"primary": 3}


# --- 7. reducers that fail on one event ---------------------------------------------------


@pytest.mark.parametrize(
    ("reducer", "stage", "error"),
    [
        (RaiseOnSeqNum(seq_num=3), "RaiseOnSeqNum.event", "ValueError"),
        (GarbageOnSeqNum(seq_num=3, garbage="list"), "GarbageOnSeqNum.event", "AnalysisStoreError"),
        (GarbageOnSeqNum(seq_num=3, garbage="object"), "writing derived data", "DataValueError"),
    ],
    ids=["raises", "returns-a-list", "returns-object-array"],
)
def test_a_failing_event_is_recorded_and_the_scan_completes(
    RE, hw, store, make_callback, caplog, reducer, stage, error
):
    raw = DocumentRecorder()
    make_callback([reducer]).subscribe(RE)
    RE.subscribe(raw)

    with caplog.at_level(logging.ERROR, logger="bluesky_analysis_store"):
        result = RE(count([hw.det], num=5))  # no exception reaches the user

    (raw_uid,) = result
    assert raw.stop(raw_uid)["exit_status"] == "success"
    events = raw.events(raw_uid)
    child = only_child(store, raw_uid)
    primary = columns(store, child, "primary", "parent_seq_num", "total")
    assert primary["parent_seq_num"].tolist() == [1, 2, 4, 5]
    np.testing.assert_allclose(
        primary["total"], [e["data"]["det"] for e in events if e["seq_num"] != 3]
    )
    stop = child.stop
    assert stop["exit_status"] == "success"
    assert stop["num_events"] == {"primary": 4}
    reduction = stop["reduction"]
    assert reduction["events_reduced"] == 4
    assert reduction["events_failed"] == 1
    [failure] = reduction["failures"]
    assert failure["stage"] == stage
    assert failure["seq_num"] == 3
    assert failure["stream"] == "primary"
    assert failure["event_uid"] == events[2]["uid"]
    assert failure["error"].startswith(error + ":")
    assert failure["traceback"].startswith("Traceback (most recent call last)")
    assert error in failure["traceback"]
    # Logged in the worker process, with its traceback, and logged again here.
    [logged] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert stage in logged.getMessage()
    assert logged.exc_text is not None and error in logged.exc_text


def test_on_error_raise_in_the_foreground_propagates_to_the_run_engine(
    RE, hw, make_callback
):
    make_callback([RaiseOnSeqNum(seq_num=3)], background=False, on_error="raise").subscribe(RE)

    with pytest.raises(ValueError, match="refuses seq_num 3"):
        RE(count([hw.det], num=5))


def test_on_error_raise_propagates_a_reducers_key_error(RE, hw, make_callback):
    """A KeyError of the reducer's own is a failure, not a document of an unknown run."""
    reducer = functools.partial(scaled, key="not_a_data_key")
    make_callback([reducer], background=False, on_error="raise").subscribe(RE)

    with pytest.raises(KeyError, match="not_a_data_key"):
        RE(count([hw.det], num=2))


def test_on_error_raise_is_refused_in_background_mode(store):
    """In a worker an error cannot reach the RunEngine: refused, not a hang."""
    for background in (True, "process", "thread"):
        with pytest.raises(AnalysisStoreError, match="background=False"):
            AnalysisStoreCallback([scaled], store, background=background, on_error="raise")
    with pytest.raises(AnalysisStoreError, match="background=False"):
        AnalysisStoreCallback([scaled], store, on_error="raise")


def test_an_unknown_background_mode_is_refused(store):
    with pytest.raises(AnalysisStoreError, match="'process' or 'thread'"):
        AnalysisStoreCallback([scaled], store, background="processes")


# --- 8. every mode gives the same child ------------------------------------------------------


def test_process_thread_and_foreground_children_of_one_scan_are_identical(
    RE, hw, store, make_callback
):
    hw.img.sim_set_func(FrameSequence())
    reducers = [functools.partial(scaled, threshold=0.5), image_stats]
    modes = {"process": True, "thread": "thread", "foreground": False}
    for mode, background in modes.items():
        make_callback(
            reducers, background=background, md={"mode": mode}, writers={"as_u16": "TIFF"}
        ).subscribe(RE)

    (raw_uid,) = RE(scan([hw.img, hw.det], hw.motor, -1, 1, 5))

    children = {store[uid].start["mode"]: store[uid] for uid in store.children(raw_uid)}
    assert set(children) == set(modes)
    fore = children["foreground"]
    fore_keys = set(fore["primary"])
    fore_compared = sorted(k for k in fore_keys if k != "time" and not k.startswith("ts_"))
    fore_values = columns(store, fore, "primary", *fore_compared)
    for mode in ("process", "thread"):
        back = children[mode]
        assert set(back) == set(fore) == {"primary"}
        assert data_keys(back, "primary") == data_keys(fore, "primary")
        keys = set(back["primary"])
        assert keys == fore_keys
        compared = {k for k in keys if k != "time" and not k.startswith("ts_")}
        assert {"total", "shifted", "doubled", "as_u16", "img_total", "parent_seq_num"} <= compared
        back_values = columns(store, back, "primary", *sorted(compared))
        for key in sorted(compared):
            b, f = back_values[key], fore_values[key]
            assert b.shape == f.shape, (mode, key)
            assert b.dtype == f.dtype, (mode, key)
            np.testing.assert_array_equal(b, f, err_msg=f"{mode} {key}")
        assert len(back_values["doubled"]) == 5
        assert back.stop["reduction"]["events_reduced"] == 5
        assert back.stop["num_events"] == {"primary": 5}
        assert back.start["provenance"]["code"] == fore.start["provenance"]["code"]
    assert fore.stop["reduction"]["events_reduced"] == 5


# --- 9. a reader in another process sees derived events during the scan --------------------

READER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from bluesky_analysis_store import AnalysisStore

    folder, uid_file, out_file, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    deadline = time.monotonic() + timeout
    while not os.path.exists(uid_file):
        if time.monotonic() > deadline:
            sys.exit("the raw uid never came")
        time.sleep(0.05)
    with open(uid_file) as f:
        raw_uid = f.read().strip()
    store = AnalysisStore.open(folder, served=True)  # as a user's: the folder's server
    result = {"raw_uid": raw_uid, "seen": 0, "child_stopped": None, "errors": []}
    while time.monotonic() < deadline:
        try:
            children = store.children(raw_uid)
            if children:
                run = store[children[0]]
                seen = len(run["primary"]["total"].read())
                if seen:
                    result["seen"] = seen
                    result["child_stopped"] = run.metadata.get("stop") is not None
                    break
        except Exception as error:  # the stream may not exist yet
            result["errors"] = (result["errors"] + [repr(error)])[-5:]
        time.sleep(0.1)
    with open(out_file + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out_file + ".tmp", out_file)
    print(json.dumps(result), flush=True)
    """
)


@pytest.mark.parametrize(
    "background", [True, "thread", False], ids=["process", "thread", "foreground"]
)
def test_another_process_sees_derived_events_before_the_raw_run_ends(
    RE, hw, store, module_store_folder, shared_callback, tmp_path, background
):
    timeout = 60.0
    uid_file, out_file = tmp_path / "raw_uid.txt", tmp_path / "reader.json"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER_SCRIPT, str(module_store_folder), str(uid_file),
         str(out_file), str(timeout)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def publish_uid(name: str, doc: dict[str, Any]) -> None:
        (tmp_path / "uid.tmp").write_text(doc["uid"])
        os.replace(tmp_path / "uid.tmp", uid_file)

    reader_done_before_stop: list[bool] = []

    @bpp.run_decorator()
    def events_then_wait():
        for _ in range(3):
            yield from bps.trigger_and_read([hw.det])
        deadline = time.monotonic() + timeout
        while not out_file.exists() and reader.poll() is None and time.monotonic() < deadline:
            yield from bps.sleep(0.1)
        reader_done_before_stop.append(out_file.exists())

    shared_callback([scaled], background=background).subscribe(RE)
    RE.subscribe(publish_uid, "start")
    try:
        (raw_uid,) = RE(events_then_wait())
        stdout, stderr = reader.communicate(timeout=timeout)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.communicate()

    assert reader.returncode == 0, stderr
    assert reader_done_before_stop == [True], f"the reader had not finished: {stderr[-2000:]}"
    result = json.loads(out_file.read_text())
    assert json.loads(stdout.strip().splitlines()[-1]) == result
    assert result["raw_uid"] == raw_uid
    assert 1 <= result["seen"] <= 3, result
    assert result["child_stopped"] is False, "the child run was already finished when read"
    assert len(column(only_child(store, raw_uid), "primary", "total")) == 3


# --- 10. a run whose start was missed ------------------------------------------------------


@pytest.mark.parametrize(
    ("background", "on_error"),
    [(True, "record"), ("thread", "record"), (False, "record"), (False, "raise")],
    ids=["process", "thread", "foreground", "foreground-raise"],
)
def test_a_run_without_its_start_is_ignored_and_the_next_run_is_reduced(
    RE, hw, store, shared_callback, caplog, background, on_error
):
    raw = DocumentRecorder()
    RE.subscribe(raw)
    (missed_uid,) = RE(count([hw.det, hw.img], num=3))
    callback = shared_callback([scaled], background=background, on_error=on_error)

    with caplog.at_level(logging.WARNING, logger="bluesky_analysis_store"):
        for name, doc in raw.run(missed_uid)[1:]:
            callback(name, doc)
        assert raw.run(missed_uid)[0][0] == "start"
        callback.subscribe(RE)
        (next_uid,) = RE(count([hw.det], num=2))

    assert children_of(store, missed_uid) == []
    child = only_child(store, next_uid)
    assert child.stop["num_events"] == {"primary": 2}
    assert any("start was not seen" in r.getMessage() for r in caplog.records)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], "a run whose start was missed is ignored, not a failure"


# --- 11. flush and close ------------------------------------------------------------------


@pytest.mark.parametrize(
    "background", [True, "thread", False], ids=["process", "thread", "foreground"]
)
def test_flush_saves_what_was_handed_over_and_close_ignores_later_documents(
    RE, hw, store, make_callback, caplog, background
):
    raw = DocumentRecorder()
    RE.subscribe(raw)
    (open_uid,) = RE(count([hw.det], num=4))
    (late_uid,) = RE(count([hw.det], num=2))
    callback = make_callback([functools.partial(scaled, threshold=1)], background=background)

    documents = raw.run(open_uid)
    assert documents[-1][0] == "stop"
    for name, doc in documents[:-1]:
        callback(name, doc)
    assert callback.flush(timeout=60) is True
    # Everything but the stop was handed over: the child and its events are readable now.
    child = only_child(store, open_uid)
    assert len(column(child, "primary", "total")) == 4
    assert child.metadata.get("stop") is None

    callback(*documents[-1])
    assert callback.flush(timeout=60) is True
    assert only_child(store, open_uid).stop["num_events"] == {"primary": 4}

    callback.close(timeout=60)
    with caplog.at_level(logging.WARNING, logger="bluesky_analysis_store"):
        for name, doc in raw.run(late_uid):
            callback(name, doc)  # ignored, without raising
        RE.subscribe(callback)
        (ignored_uid,) = RE(count([hw.det], num=2))
    callback.close(timeout=60)  # closing twice is harmless

    assert children_of(store, late_uid) == []
    assert children_of(store, ignored_uid) == []
    assert any("closed" in r.getMessage() for r in caplog.records)


# --- 12. provenance is checked when the callback is made -----------------------------------


def test_a_lambda_reducer_is_refused_unless_strict_is_off(RE, hw, store, make_callback):
    def local_reducer(data):
        return {"total": float(data["det"])}

    with pytest.raises(ProvenanceError, match="lambda"):
        AnalysisStoreCallback([lambda data: {"total": float(data["det"])}], store)
    with pytest.raises(ProvenanceError, match="local_reducer"):
        AnalysisStoreCallback([local_reducer], store)

    make_callback([lambda data: {"total": 2 * float(data["det"])}], strict=False).subscribe(RE)
    raw = DocumentRecorder()
    RE.subscribe(raw)
    (raw_uid,) = RE(count([hw.det], num=2))

    child = only_child(store, raw_uid)
    provenance = child.start["provenance"]
    assert provenance["strict"] is False
    [code] = provenance["code"]
    assert "<lambda>" in code["name"]
    assert code["importable"] is False
    assert any("<lambda>" in gap for gap in provenance["missing"])
    np.testing.assert_allclose(
        column(child, "primary", "total"), [2 * e["data"]["det"] for e in raw.events(raw_uid)]
    )


def test_the_child_runs_streams_are_closed_after_the_scan_returns(RE, hw, store, make_callback):
    """The scan waits for the child's data and stop, not for the requests that end its
    streams; those follow at once (here, in thread mode, through the module's store)."""
    closed: list[str] = []

    def record(request) -> None:
        if request.method == "DELETE" and "/stream/close/" in request.url.path:
            closed.append(request.url.path.rsplit("/", 1)[1])

    hooks = store.client.context.http_client.event_hooks["request"]
    hooks.append(record)
    try:
        callback = make_callback([scaled], background="thread")
        RE.subscribe(callback)
        (raw_uid,) = RE(count([hw.det], num=2))
        assert callback.flush(timeout=60)
    finally:
        hooks.remove(record)
    (child_uid,) = store.children(raw_uid)
    assert child_uid in closed


@pytest.mark.parametrize(
    "background", [True, "thread", False], ids=["process", "thread", "foreground"]
)
def test_a_reducer_changing_its_input_in_place_changes_no_one_elses_event(
    RE, store, make_callback, background
):
    arr = ophyd.sim.SynSignal(name="arr", func=lambda: np.full(3, 5.0))
    events: list[dict[str, Any]] = []  # the very documents the RunEngine emitted
    make_callback([lowered_in_place], background=background).subscribe(RE)
    RE.subscribe(lambda name, doc: events.append(doc), "event")

    (raw_uid,) = RE(count([arr], num=2))  # returns once the child run is saved

    assert [e["data"]["arr"].tolist() for e in events] == [[5.0] * 3] * 2
    assert column(only_child(store, raw_uid), "primary", "arr_min").tolist() == [4.0, 4.0]


@pytest.mark.parametrize(
    "background", [True, "thread", False], ids=["process", "thread", "foreground"]
)
def test_interleaved_runs_each_get_their_own_child(RE, hw, store, shared_callback, background):
    """Two raw runs open at once (their documents interleaved, as a nested run's would be):
    each event reaches its own run's child."""
    raw = DocumentRecorder()
    RE.subscribe(raw)
    (first,) = RE(count([hw.det], num=3))
    hw.motor.set(1.0)
    (second,) = RE(count([hw.det], num=2))
    callback = shared_callback([scaled], background=background)

    runs = [raw.run(first), raw.run(second)]
    stops = [docs.pop() for docs in runs]
    for position in range(max(len(docs) for docs in runs)):
        for docs in runs:
            if position < len(docs):
                callback(*docs[position])
    for stop in stops:
        callback(*stop)
    assert callback.flush(timeout=60)  # handing a stop over does not wait for its child

    for uid in (first, second):
        events = raw.events(uid)
        child = only_child(store, uid)
        primary = columns(store, child, "primary", "parent_seq_num", "total")
        assert primary["parent_seq_num"].tolist() == [e["seq_num"] for e in events]
        np.testing.assert_allclose(primary["total"], [10.0 * e["data"]["det"] for e in events])


# --- 13. the RunEngine's loop is never blocked; plans wait for derived data -----------------

# A reduction of 30 ms an event: at the stop of a 100-point scan the worker is seconds behind.
SLOW = functools.partial(slow_scaled, seconds=0.03)


class Heartbeat:
    """Ticks every 10 ms on the RunEngine's own event loop; the largest gap between two
    ticks in a time window is how long something blocked that loop."""

    def __init__(self, RE) -> None:  # noqa: N803
        self.ticks: list[float] = []
        self._future = asyncio.run_coroutine_threadsafe(self._beat(), RE.loop)

    async def _beat(self) -> None:
        while True:
            self.ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    def largest_gap(self, since: float, until: float) -> float:
        ticks = [t for t in self.ticks if since <= t <= until]
        assert len(ticks) > 10, "the heartbeat did not run in the window"
        return max(b - a for a, b in zip(ticks, ticks[1:]))

    def stop(self) -> None:
        self._future.cancel()


@pytest.mark.parametrize("background", [True, "thread"], ids=["process", "thread"])
def test_the_loop_keeps_beating_while_a_scan_waits_for_its_slow_child(
    RE, hw, store, make_callback, background
):
    callback = make_callback([SLOW], background=background)
    assert callback.flush(timeout=60)  # the worker is up: its start is not what we measure
    callback.subscribe(RE)
    raw = DocumentRecorder()
    RE.subscribe(raw)
    stopped: list[float] = []
    RE.subscribe(lambda name, doc: stopped.append(time.monotonic()), "stop")
    heartbeat = Heartbeat(RE)
    try:
        (raw_uid,) = RE(scan([hw.det], hw.motor, -1, 1, 100))
        returned = time.monotonic()
    finally:
        heartbeat.stop()

    # The child run is complete when RE(...) returns...
    child = only_child(store, raw_uid)
    assert child.stop["num_events"] == {"primary": 100}
    np.testing.assert_allclose(
        column(child, "primary", "total"), [10 * e["data"]["det"] for e in raw.events(raw_uid)]
    )
    # ...it was far from complete at the raw stop (so the scan did wait)...
    assert child.stop["time"] > raw.stop(raw_uid)["time"] + 0.5
    # ...and nothing blocked the loop during the stop and the wait: a blocked loop would
    # not beat for the whole wait (a bound relative to the wait, not a fixed time, as a
    # loaded machine delays every beat a little).
    waited = returned - stopped[0]
    assert waited > 0.5
    assert heartbeat.largest_gap(stopped[0] - 0.02, returned) < waited / 3


def test_without_the_preprocessor_the_scan_returns_before_its_child_and_a_plan_can_wait(
    RE, hw, store, make_callback
):
    callback = make_callback([SLOW], background="thread")
    RE.subscribe(callback)
    outcomes: list[bool] = []

    def scan_then_wait():
        uid = yield from count([hw.det], num=30)
        outcomes.append((yield from wait_for_derived(callback)))
        return uid

    (early_uid,) = RE(count([hw.det], num=30))
    assert children_of(store, early_uid) == [] or only_child(store, early_uid).metadata.get(
        "stop"
    ) is None, "RE(...) waited for the child although nothing asked it to"
    (waited_uid,) = RE(scan_then_wait())

    assert outcomes == [True]
    assert only_child(store, waited_uid).stop["num_events"] == {"primary": 30}
    assert only_child(store, early_uid).stop["num_events"] == {"primary": 30}  # waited too


def test_the_wrapper_waits_after_each_run_the_plan_closes(RE, hw, store, make_callback):
    callback = make_callback([SLOW], background="thread")
    RE.subscribe(callback)
    seen_at_second_start: list[Any] = []

    def two_runs():
        first = yield from count([hw.det], num=20)
        # Not on the loop's thread for this look: the wait has already ended.
        seen_at_second_start.append(only_child(store, first).stop["num_events"])
        yield from count([hw.det], num=5)

    first_uid, second_uid = RE(wait_for_derived_wrapper(two_runs(), callback))

    assert seen_at_second_start == [{"primary": 20}]
    assert only_child(store, second_uid).stop["num_events"] == {"primary": 5}
    assert store.children(first_uid)


def test_stop_timeout_ends_the_wait_with_one_warning_and_the_child_is_still_saved(
    RE, hw, store, make_callback, caplog
):
    callback = make_callback([SLOW], background="thread", stop_timeout=0.2)
    callback.subscribe(RE)

    with caplog.at_level(logging.WARNING, logger="bluesky_analysis_store"):
        (raw_uid,) = RE(count([hw.det], num=60))  # 1.8 s of reduction, 0.2 s of waiting

    warnings = [r.getMessage() for r in caplog.records if "stop_timeout" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert raw_uid in warnings[0] and "in the background" in warnings[0]
    assert callback.flush(timeout=60)
    assert only_child(store, raw_uid).stop["num_events"] == {"primary": 60}


def pause_once_the_wait_began(RE, started: threading.Event) -> threading.Thread:  # noqa: N803
    """Ask ``RE`` to pause (as Ctrl-C does) once a raw run has stopped."""

    def pause() -> None:
        started.wait(60)
        time.sleep(0.2)  # past the close_run and the checkpoint: into the wait
        RE.request_pause()

    thread = threading.Thread(target=pause, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("then", ["resume", "abort"])
def test_a_pause_during_the_wait_pauses_and_resume_waits_again_or_abort_stops_waiting(
    RE, hw, store, make_callback, then
):
    callback = make_callback([SLOW], background="thread")
    callback.subscribe(RE)
    raw = DocumentRecorder()
    RE.subscribe(raw)
    stopped = threading.Event()
    RE.subscribe(lambda name, doc: stopped.set(), "stop")
    pauser = pause_once_the_wait_began(RE, stopped)

    with pytest.raises(RunEngineInterrupted):
        RE(count([hw.det], num=80))  # 2.4 s of reduction after a fast count
    pauser.join(60)
    assert RE.state == "paused"
    [raw_uid] = [d["uid"] for n, d in raw.docs if n == "start"]
    assert raw.stop(raw_uid)["exit_status"] == "success"

    if then == "resume":
        RE.resume()  # waits for the child again, then returns
    else:
        RE.abort("no need to wait")  # returns without waiting
        assert RE.state == "idle"
        assert callback.flush(timeout=60)  # the derived data was saved in the background
    assert only_child(store, raw_uid).stop["num_events"] == {"primary": 80}
    assert RE.state == "idle"
    assert [n for n, _ in raw.docs].count("stop") == 1, "the run was not replayed"
