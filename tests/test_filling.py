"""EventFiller: raw data stored outside the events, loaded before reducers see it."""

from __future__ import annotations

import copy
import pathlib
import shutil
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import event_model  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import ophyd.sim  # noqa: E402
import pytest  # noqa: E402
from bluesky.plans import count  # noqa: E402

from _live import DocumentRecorder  # noqa: E402
from _reducers_for_tests import FrameSequence, frame, image_stats  # noqa: E402
from bluesky_analysis_store import compose_documents  # noqa: E402
from bluesky_analysis_store._filling import EventFiller, handler_registry  # noqa: E402


def fill_run(
    documents: list[tuple[str, dict[str, Any]]], filler: EventFiller
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Feed every document to ``filler``; return (event, filled data) for each event."""
    filled = []
    for name, doc in documents:
        if name == "event":
            before = copy.deepcopy(doc)
            data = filler.fill(doc)
            assert doc == before, "fill must not change the event it is given"
            filled.append((doc, data))
        filler(name, doc)
    filler.close()
    return filled


# --- legacy resource/datum: ophyd.sim's NPY_SEQ --------------------------------------------


def img_run(RE, save_path: pathlib.Path, num: int) -> list[tuple[str, dict[str, Any]]]:
    hw = ophyd.sim.hw(save_path=str(save_path))
    hw.img.sim_set_func(FrameSequence())
    recorder = DocumentRecorder()
    RE.subscribe(recorder)
    RE(count([hw.img, hw.det], num=num))
    return recorder.docs


def test_the_entry_points_give_ophyd_sims_npy_seq_handler_and_the_package_formats():
    registry = handler_registry()
    assert registry["NPY_SEQ"] is ophyd.sim.NumpySeqHandler
    assert {"BAS_TIFF_SERIES", "BAS_HDF5", "BAS_NPY_SERIES"} <= set(registry)

    class Mine:
        pass

    assert handler_registry({"NPY_SEQ": Mine})["NPY_SEQ"] is Mine


def test_legacy_npy_seq_frames_of_an_ophyd_sim_run_are_filled(RE, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    documents = img_run(RE, raw, num=3)
    assert [d["spec"] for n, d in documents if n == "resource"] == ["NPY_SEQ"]
    assert [n for n, _ in documents].count("datum") == 3

    filled = fill_run(documents, EventFiller())

    assert len(filled) == 3
    for n, (event, data) in enumerate(filled):
        assert isinstance(event["data"]["img"], str)  # a datum id in the raw event
        assert isinstance(data["img"], np.ndarray)
        np.testing.assert_array_equal(data["img"], frame(n))
        assert data["img"].dtype == np.float64
        assert data["det"] == event["data"]["det"]  # inline values pass through


def test_legacy_data_moved_elsewhere_is_found_through_root_map(RE, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    documents = img_run(RE, raw, num=2)
    moved = tmp_path / "moved"
    shutil.move(str(raw), str(moved))

    filled = fill_run(documents, EventFiller(root_map={str(raw): str(moved)}))

    for n, (_, data) in enumerate(filled):
        np.testing.assert_array_equal(data["img"], frame(n))

    with pytest.raises(event_model.DataNotAccessible):
        fill_run(documents, EventFiller())  # without the map the files are not found


# --- stream_resource / stream_datum, as ophyd-async emits them ----------------------------


def test_hdf5_stream_datums_of_an_ophyd_async_style_run_are_filled(tmp_path):
    """A real HDF5 file, one stream_resource, stream_datums spanning several events."""
    frames = (np.arange(6 * 4 * 3, dtype=np.uint16).reshape(6, 4, 3) * 1000) + 7
    path = tmp_path / "detector" / "scan_000.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as file:
        file.create_dataset("/entry/data/data", data=frames, chunks=(1, 4, 3))

    run = event_model.compose_run()
    descriptor = run.compose_descriptor(
        name="primary",
        data_keys={
            "det": {
                "source": "sim://det",
                "dtype": "array",
                "shape": [4, 3],
                "dtype_numpy": "<u2",
                "external": "STREAM:",
            },
            "det_sum": {"source": "sim://det/sum", "dtype": "number", "shape": []},
        },
    )
    resource = run.compose_stream_resource(
        mimetype="application/x-hdf5",
        uri=f"file://localhost{path}",
        data_key="det",
        parameters={"dataset": "/entry/data/data", "chunk_shape": [1, 4, 3], "swmr": False},
    )
    documents = [
        ("start", run.start_doc),
        ("descriptor", descriptor.descriptor_doc),
        ("stream_resource", resource.stream_resource_doc),
    ]
    # Frames 0-1 for events 1-2 in one datum, frames 2-5 for events 3-6 in another.
    for (first, last) in ((0, 2), (2, 6)):
        documents.append(
            (
                "stream_datum",
                resource.compose_stream_datum(
                    indices={"start": first, "stop": last},
                    seq_nums={"start": first + 1, "stop": last + 1},
                    descriptor=descriptor.descriptor_doc,
                ),
            )
        )
        for index in range(first, last):
            total = float(frames[index].sum())
            documents.append(
                (
                    "event",
                    descriptor.compose_event(
                        data={"det_sum": total}, timestamps={"det_sum": 0.0}, seq_num=index + 1
                    ),
                )
            )
    documents.append(("stop", run.compose_stop()))

    filled = fill_run(documents, EventFiller())

    assert len(filled) == 6
    for index, (event, data) in enumerate(filled):
        assert "det" not in event["data"]
        assert event["seq_num"] == index + 1
        assert data["det"].dtype == np.uint16
        assert data["det"].shape == (4, 3)
        np.testing.assert_array_equal(data["det"], frames[index])
        assert data["det_sum"] == float(data["det"].sum())


# --- this package's formats, as compose_documents writes them -----------------------------


@pytest.mark.parametrize("asset_documents", ["stream", "resource"])
@pytest.mark.parametrize(
    ("format_name", "dtype"),
    [("TIFF", np.uint16), ("NPY", np.int64), ("HDF5", np.float32)],
)
def test_the_package_formats_are_filled_back_to_the_values_written(
    tmp_path, format_name, dtype, asset_documents
):
    frames = [(np.arange(12).reshape(3, 4) * 300 + 1000 * k).astype(dtype) for k in range(4)]
    data_dicts = [{"primary": {"frame": f, "k": k}} for k, f in enumerate(frames)]
    documents = list(
        compose_documents(
            data_dicts,
            {"purpose": "filling test"},
            {"frame": format_name},
            parents=["00000000-0000-4000-8000-00000000feed"],
            code=image_stats,
            root=tmp_path / "derived",
            asset_documents=asset_documents,
        )
    )
    names = [n for n, _ in documents]
    if asset_documents == "stream":
        assert names.count("stream_resource") == 1
        assert names.count("stream_datum") == 4
    else:
        assert names.count("resource") == 1
        assert names.count("datum") == 4

    filled = fill_run(documents, EventFiller())

    assert len(filled) == 4
    for k, (event, data) in enumerate(filled):
        if asset_documents == "stream":
            assert "frame" not in event["data"]
        else:
            assert isinstance(event["data"]["frame"], str)
        assert data["k"] == k
        assert data["frame"].dtype == np.dtype(dtype)
        assert data["frame"].shape == (3, 4)
        np.testing.assert_array_equal(data["frame"], frames[k])


def test_event_shortcut_sends_events_of_known_streams_to_their_run():
    from bluesky_analysis_store._filling import EventShortcut

    received: list[tuple[str, str]] = []
    runs = {"run-1": lambda name, doc: received.append((name, doc["uid"]))}
    shortcut = EventShortcut(runs)
    event = {"uid": "e1", "descriptor": "d1"}

    assert shortcut.route("event", event) is False  # its stream is not known yet
    shortcut.learn("descriptor", {"uid": "d1", "run_start": "run-1"})
    shortcut.learn("descriptor", {"uid": "d2", "run_start": "another run"})
    assert shortcut.route("event", event) is True
    assert shortcut.route("event", {"uid": "e2", "descriptor": "d2"}) is False
    assert shortcut.route("event_page", {"uid": ["e3"], "descriptor": "d1"}) is False
    assert received == [("event", "e1")]

    shortcut.forget(runs["run-1"])
    assert shortcut.route("event", event) is False
