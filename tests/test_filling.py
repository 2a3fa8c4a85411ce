"""EventFiller: raw data stored outside the events, loaded before reducers see it."""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
import shutil
import sys
import uuid
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import event_model  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import ophyd.sim  # noqa: E402
import pytest  # noqa: E402
from _live import DocumentRecorder  # noqa: E402
from _reducers_for_tests import FrameSequence, frame, image_stats  # noqa: E402
from bluesky.plans import count  # noqa: E402

from bluesky_analysis_store import (  # noqa: E402
    AnalysisStoreError,
    AssetLocationError,
    compose_documents,
)
from bluesky_analysis_store._filling import EventFiller, handler_registry  # noqa: E402


def unchanged(event: dict[str, Any], before: dict[str, Any]) -> bool:
    """Whether ``event`` still equals its copy ``before`` (its data may hold arrays)."""
    if {k: v for k, v in event.items() if k != "data"} != {
        k: v for k, v in before.items() if k != "data"
    }:
        return False
    data, old = event["data"], before["data"]
    return data.keys() == old.keys() and all(
        type(data[k]) is type(old[k]) and np.array_equal(data[k], old[k]) for k in data
    )


def fill_run(
    documents: list[tuple[str, dict[str, Any]]], filler: EventFiller
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Feed every document to ``filler``; return (event, filled data) for each event."""
    filled = []
    for name, doc in documents:
        if name == "event":
            before = copy.deepcopy(doc)
            data = filler.fill(doc)
            assert unchanged(doc, before), "fill must not change the event it is given"
            filled.append((doc, data))
        filler(name, doc)
    filler.close()
    return filled


# --- legacy resource/datum: ophyd.sim's NPY_SEQ --------------------------------------------


def img_run(RE, save_path: pathlib.Path, num: int) -> list[tuple[str, dict[str, Any]]]:  # noqa: N803
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


_FILL_WITHOUT_PLUGINS = """
import sys
import numpy as np
from bluesky_analysis_store import compose_documents
from bluesky_analysis_store._filling import EventFiller

documents = list(compose_documents(
    [{"primary": {"img": np.full((2, 2), n)}} for n in range(2)], {}, {"img": "NPY"},
    root=sys.argv[1], asset_documents="resource", code=np.mean, strict=False,
))
filler = EventFiller()
values = []
for name, doc in documents:
    if name == "event":
        values.append(float(filler.fill(doc)["img"].sum()))
    filler(name, doc)
print(values, sorted({"ophyd", "area_detector_handlers"} & set(sys.modules)))
"""


def test_a_run_of_the_package_formats_loads_no_handler_plugin(tmp_path):
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", _FILL_WITHOUT_PLUGINS, str(tmp_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    # Filled by the package's own handler; the plugins of other specs stay unimported.
    assert (result.returncode, result.stdout) == (0, "[0.0, 4.0] []\n"), result.stderr


def test_legacy_npy_seq_frames_of_an_ophyd_sim_run_are_filled(RE, tmp_path):  # noqa: N803
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


def test_legacy_data_moved_elsewhere_is_found_through_root_map(RE, tmp_path):  # noqa: N803
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
    for first, last in ((0, 2), (2, 6)):
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


# --- stream resources read as tiled reads them: hand-made layouts --------------------------
#
# Each layout is a run of hand-made documents over real files. It is filled live, and also
# saved into a real embedded store and replayed from tiled's arrays, as ``reprocess`` reads
# it: both must hand reducers the same values (dtype, shape, numbers).

FRAME = (4, 3)


def distinct_frames(count: int) -> np.ndarray:
    """``count`` uint16 frames, no two alike, with values above 255."""
    return (np.arange(count * 12, dtype=np.uint16).reshape(count, *FRAME) * 300 + 7).astype(
        np.uint16
    )


def stream_run(
    resources: list[tuple[str, str, dict[str, Any], list[tuple[int, int]]]],
    shape: list[int],
    dtype: str = "<u2",
) -> list[tuple[str, dict[str, Any]]]:
    """Documents of a run whose ``det`` is in ``resources``: (mimetype, uri, parameters,
    index ranges of its stream_datums); each index is one event, events numbered on."""
    run = event_model.compose_run()
    descriptor = run.compose_descriptor(
        name="primary",
        data_keys={
            "det": {
                "source": "sim://det",
                "dtype": "array",
                "shape": shape,
                "dtype_numpy": dtype,
                "external": "STREAM:",
            },
            "n": {"source": "sim://n", "dtype": "integer", "shape": []},
        },
    )
    documents = [("start", run.start_doc), ("descriptor", descriptor.descriptor_doc)]
    seq_num = 1
    for mimetype, uri, parameters, ranges in resources:
        bundle = run.compose_stream_resource(
            mimetype=mimetype, uri=uri, data_key="det", parameters=parameters
        )
        documents.append(("stream_resource", bundle.stream_resource_doc))
        for first, last in ranges:
            count = last - first
            documents.append(
                (
                    "stream_datum",
                    bundle.compose_stream_datum(
                        indices={"start": first, "stop": last},
                        seq_nums={"start": seq_num, "stop": seq_num + count},
                        descriptor=descriptor.descriptor_doc,
                    ),
                )
            )
            for _ in range(count):
                event = descriptor.compose_event(
                    data={"n": seq_num}, timestamps={"n": 0.0}, seq_num=seq_num
                )
                documents.append(("event", event))
                seq_num += 1
    documents.append(("stop", run.compose_stop()))
    return documents


def uri(path: pathlib.Path, tail: str = "") -> str:
    return f"file://localhost{path}{tail}"


def write_hdf5(path: pathlib.Path, frames: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        file.create_dataset("/entry/data/data", data=frames, chunks=(1, *frames.shape[1:]))


def hdf5_two_files_two_frames_per_event(folder: pathlib.Path):
    """Two frames per event; events 1-2 in one file, 3-4 in another (indices from 0 again)."""
    frames = distinct_frames(8)
    write_hdf5(folder / "a.h5", frames[:4])
    write_hdf5(folder / "b.h5", frames[4:])
    params = {"dataset": "/entry/data/data", "chunk_shape": [1, *FRAME]}
    documents = stream_run(
        [
            ("application/x-hdf5", uri(folder / "a.h5"), params, [(0, 1), (1, 2)]),
            ("application/x-hdf5", uri(folder / "b.h5"), params, [(0, 2)]),
        ],
        shape=[2, *FRAME],
    )
    return documents, frames.reshape(4, 2, *FRAME)


def tiff_template_one_file_per_frame(folder: pathlib.Path):
    """Two frames per event, one TIFF per frame named by a template. A second resource names
    its files by another template, numbered from 0 again while the datum indices go on (the
    consolidator's file-index offset)."""
    import tifffile

    frames = distinct_frames(8)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(8):
        name = f"first_{n:03d}.tif" if n < 4 else f"second_{n - 4:03d}.tif"
        tifffile.imwrite(folder / name, frames[n])
    mimetype = "multipart/related;type=image/tiff"
    documents = stream_run(
        [
            (
                mimetype,
                uri(folder, "/"),
                {"template": "first_{:03d}.tif", "chunk_shape": [1, *FRAME]},
                [(0, 2)],
            ),
            (
                mimetype,
                uri(folder, "/"),
                {"template": "second_{:03d}.tif", "chunk_shape": [1, *FRAME]},
                [(2, 3), (3, 4)],
            ),
        ],
        shape=[2, *FRAME],
    )
    return documents, frames.reshape(4, 2, *FRAME)


def tiff_chunk_shape_two_pages_per_file(folder: pathlib.Path):
    """chunk_shape (2, 4, 3): one two-page TIFF holds an event's two frames."""
    import tifffile

    frames = distinct_frames(6)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(3):
        tifffile.imwrite(folder / f"pair_{n}.tif", frames[2 * n : 2 * n + 2])
    params = {"template": "pair_{:d}.tif", "chunk_shape": [2, *FRAME]}
    documents = stream_run(
        [("multipart/related;type=image/tiff", uri(folder, "/"), params, [(0, 3)])],
        shape=[2, *FRAME],
    )
    return documents, frames.reshape(3, 2, *FRAME)


def npy_series_from_a_filename_prefix(folder: pathlib.Path):
    """One frame per event in ``<prefix>_<n>.npy`` (the naming tiled's NPY consolidator
    fixes), one stream_datum spanning three events."""
    frames = distinct_frames(3)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(3):
        np.save(folder / f"scan_{n}.npy", frames[n])
    documents = stream_run(
        [("multipart/related;type=application/x-npy", uri(folder / "scan"), {}, [(0, 3)])],
        shape=list(FRAME),
    )
    return documents, frames


LAYOUTS = [
    hdf5_two_files_two_frames_per_event,
    tiff_template_one_file_per_frame,
    tiff_chunk_shape_two_pages_per_file,
    npy_series_from_a_filename_prefix,
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__)
def test_stream_resources_are_filled_live_as_tiled_reads_them_offline(layout, shared_store):
    from bluesky_analysis_store._replay import replay_run

    folder = pathlib.Path(shared_store.asset_root) / f"handmade-{uuid.uuid4()}"
    documents, expected = layout(folder)

    live = fill_run(documents, EventFiller())

    assert len(live) == len(expected)
    for k, (event, data) in enumerate(live):
        assert "det" not in event["data"]
        assert data["n"] == k + 1
        assert data["det"].dtype == np.uint16
        assert data["det"].shape == expected[k].shape
        np.testing.assert_array_equal(data["det"], expected[k])

    for name, doc in documents:
        shared_store(name, doc)
    run = shared_store[documents[0][1]["uid"]]
    offline = fill_run(list(replay_run(run)), EventFiller())
    assert len(offline) == len(live)
    for (_, live_data), (_, offline_data) in zip(live, offline, strict=True):
        assert offline_data["det"].dtype == live_data["det"].dtype
        assert offline_data["det"].shape == live_data["det"].shape
        np.testing.assert_array_equal(offline_data["det"], live_data["det"])
        assert offline_data["n"] == live_data["n"]


def test_a_stream_datum_of_an_unknown_resource_fails_its_events_only(tmp_path):
    frames = distinct_frames(2)
    write_hdf5(tmp_path / "a.h5", frames)
    documents = stream_run(
        [("application/x-hdf5", uri(tmp_path / "a.h5"), {"dataset": "/entry/data/data"}, [(0, 2)])],
        shape=list(FRAME),
    )
    documents = [(n, d) for n, d in documents if n != "stream_resource"]
    filler = EventFiller()
    events = []
    for name, doc in documents:
        filler(name, doc)  # documents never raise: the events that need them do
        if name == "event":
            events.append(doc)
    with pytest.raises(AnalysisStoreError, match="stream_resource"):
        filler.fill(events[0])


# --- root_map and refused paths -----------------------------------------------------------


def test_stream_resources_moved_elsewhere_are_found_through_root_map(tmp_path):
    original = tmp_path / "beamline" / "det"
    documents, expected = hdf5_two_files_two_frames_per_event(original)
    moved = tmp_path / "archive" / "det"
    moved.parent.mkdir()
    shutil.move(str(original), str(moved))

    with pytest.raises(Exception, match=r"a\.h5|No such file|unable to open"):
        fill_run(documents, EventFiller())  # without the map the files are not found

    # The longest matching prefix wins; a prefix must match whole path components.
    root_map = {
        str(tmp_path / "beamline"): str(tmp_path / "nowhere"),
        str(original): str(moved),
        str(tmp_path / "beam"): str(tmp_path / "nowhere"),
    }
    filled = fill_run(documents, EventFiller(root_map=root_map))

    for k, (_, data) in enumerate(filled):
        np.testing.assert_array_equal(data["det"], expected[k])


def test_template_files_are_mapped_with_their_resource(tmp_path):
    original = tmp_path / "old"
    documents, expected = tiff_template_one_file_per_frame(original)
    moved = tmp_path / "new"
    shutil.move(str(original), str(moved))

    filled = fill_run(documents, EventFiller(root_map={str(original): str(moved)}))

    for k, (_, data) in enumerate(filled):
        np.testing.assert_array_equal(data["det"], expected[k])


def outside_file(tmp_path: pathlib.Path) -> pathlib.Path:
    """A valid HDF5 file outside the detector folder: reading it would 'work'."""
    path = tmp_path / "outside" / "secret.h5"
    write_hdf5(path, distinct_frames(2))
    return path


def escaping_stream_runs(tmp_path: pathlib.Path):
    """(name, documents, root_map) of stream resources whose files leave their root."""
    secret = outside_file(tmp_path)
    det = tmp_path / "det"
    det.mkdir()
    (det / "link.h5").symlink_to(secret)
    (det / "linked-dir").symlink_to(secret.parent, target_is_directory=True)
    hdf5 = {"dataset": "/entry/data/data"}
    tiff = "multipart/related;type=image/tiff"
    cases = {
        "dot-dot": (uri(det, "/../outside/secret.h5"), "application/x-hdf5", hdf5, {}),
        "symlinked file": (uri(det / "link.h5"), "application/x-hdf5", hdf5, {}),
        "dot-dot after root_map": (
            "file://localhost/old/det/../../outside/secret.h5",
            "application/x-hdf5",
            hdf5,
            {"/old/det": str(det)},
        ),
        "symlink after root_map": (
            "file://localhost/old/det/link.h5",
            "application/x-hdf5",
            hdf5,
            {"/old/det": str(det)},
        ),
        "symlinked folder after root_map": (
            "file://localhost/old/det/linked-dir/secret.h5",
            "application/x-hdf5",
            hdf5,
            {"/old/det": str(det)},
        ),
        "template climbing out": (
            uri(det, "/"),
            tiff,
            {"template": "../outside/img_{:d}.tif", "chunk_shape": [1, *FRAME]},
            {},
        ),
        "not a local file": ("http://example.com/x.h5", "application/x-hdf5", hdf5, {}),
    }
    for name, (resource_uri, mimetype, params, root_map) in cases.items():
        documents = stream_run([(mimetype, resource_uri, params, [(0, 2)])], shape=list(FRAME))
        yield name, documents, root_map


def test_stream_resources_whose_files_leave_their_root_are_refused(tmp_path):
    for name, documents, root_map in escaping_stream_runs(tmp_path):
        filler = EventFiller(root_map=root_map)
        events = []
        for doc_name, doc in documents:
            filler(doc_name, doc)  # documents never raise: the events that need them do
            if doc_name == "event":
                events.append(doc)
        for event in events:
            with pytest.raises(AssetLocationError):
                filler.fill(event)
            # The event's rows are gone with the failure: nothing is left pending.
        assert filler.fill(events[0]) == {"n": 1}, name


class RecordingHandler:
    """A handler that records every path it is built on (and reads nothing)."""

    paths: list[str] = []

    def __init__(self, path: str, **kwargs: Any) -> None:
        RecordingHandler.paths.append(path)

    def __call__(self, **kwargs: Any) -> np.ndarray:
        return np.zeros(FRAME)


def legacy_run(root: str, resource_path: str, **resource_kwargs: Any):
    run = event_model.compose_run()
    descriptor = run.compose_descriptor(
        name="primary",
        data_keys={
            "img": {"source": "sim", "dtype": "array", "shape": list(FRAME), "external": "X:"}
        },
    )
    resource = run.compose_resource(
        spec="RECORDING",
        root=root,
        resource_path=resource_path,
        resource_kwargs=resource_kwargs,
    )
    datum = resource.compose_datum(datum_kwargs={"index": 0})
    event = descriptor.compose_event(
        data={"img": datum["datum_id"]}, timestamps={"img": 0.0}, filled={"img": False}
    )
    return [
        ("start", run.start_doc),
        ("descriptor", descriptor.descriptor_doc),
        ("resource", resource.resource_doc),
        ("datum", datum),
        ("event", event),
        ("stop", run.compose_stop()),
    ]


def test_legacy_resources_whose_files_leave_their_root_are_refused_before_a_handler(tmp_path):
    secret = tmp_path / "outside" / "secret"
    secret.parent.mkdir()
    secret.write_text("not for reducers")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(secret)
    cases = {
        "dot-dot": (str(root), "../outside/secret", {}, {}),
        "absolute resource_path": (str(root), str(secret), {}, {}),
        "symlink": (str(root), "link", {}, {}),
        "dot-dot without a root": ("", f"{root}/../outside/secret", {}, {}),
        "template climbing out": (str(root), "frames", {"template": "../../%s_%d"}, {}),
        "dot-dot after root_map": ("/old", "../outside/secret", {}, {"/old": str(root)}),
        "symlink after root_map": ("/old", "link", {}, {"/old": str(root)}),
    }
    for name, (resource_root, resource_path, kwargs, root_map) in cases.items():
        RecordingHandler.paths.clear()
        filler = EventFiller({"RECORDING": RecordingHandler}, root_map=root_map)
        documents = legacy_run(resource_root, resource_path, **kwargs)
        event = next(doc for doc_name, doc in documents if doc_name == "event")
        for doc_name, doc in documents:
            if doc_name == "event":
                with pytest.raises(AssetLocationError):
                    filler.fill(doc)
            filler(doc_name, doc)
        assert RecordingHandler.paths == [], name
        assert event["data"]["img"]  # the event itself is left as it was

    # The same handler inside its root is built, on the mapped path.
    filler = EventFiller({"RECORDING": RecordingHandler}, root_map={"/old": str(root)})
    data = fill_run(legacy_run("/old", "frames/f", template="%s_%d"), filler)
    assert RecordingHandler.paths == [os.path.join(str(root), "frames/f")]
    assert data[0][1]["img"].shape == FRAME


def test_the_upstream_members_the_stream_filler_relies_on():
    """bluesky-tiled-plugins (pinned <2.1) members the stream filler uses (the private one
    through ``_tiled_writing``): if this fails, an upgrade changed them; adapt the filler,
    ``_tiled_writing`` and the version bound together."""
    from bluesky_tiled_plugins.writing import consolidators
    from bluesky_tiled_plugins.writing.tiled_writer import RunNormalizer

    from bluesky_analysis_store._tiled_writing import normalized_stream_resource

    assert callable(RunNormalizer._convert_resource_to_stream_resource)
    old_style = {
        "uid": "sr-1",
        "run_start": "start-1",
        "data_key": "det",
        "mimetype": "application/x-hdf5",
        "uri": "file://localhost/data/a.h5",
        "parameters": {"path": "/entry/data", "frame_per_point": 2},
    }
    before = copy.deepcopy(old_style)
    normalized = normalized_stream_resource(old_style)
    assert old_style == before  # the caller's document is not changed
    assert normalized["parameters"] == {"dataset": "/entry/data", "multiplier": 2}
    assert set(normalized) == {"uid", "data_key", "mimetype", "uri", "parameters"}
    # Public members used: the factory, the base class, consume/update/init_adapter, assets,
    # data_key, join_method, and the Patch the consumer returns.
    assert callable(consolidators.consolidator_factory)
    for member in (
        "consume_stream_datum",
        "update_from_stream_resource",
        "init_adapter",
        "get_data_source",
    ):
        assert callable(getattr(consolidators.ConsolidatorBase, member)), member
    assert {"offset", "shape"} <= {f.name for f in dataclasses.fields(consolidators.Patch)}


def det_total(data: Any) -> dict:
    """A reducer of ``det`` (top level: the provenance check imports it again)."""
    return {"total": int(np.asarray(data["det"]).sum())}


def test_a_refused_resource_fails_its_events_and_the_reduction_goes_on(tmp_path, shared_store):
    from bluesky_analysis_store import AnalysisStoreCallback

    secret = outside_file(tmp_path)
    det = tmp_path / "det"
    det.mkdir()
    (det / "scan.h5").symlink_to(secret)
    documents = stream_run(
        [("application/x-hdf5", uri(det / "scan.h5"), {"dataset": "/entry/data/data"}, [(0, 2)])],
        shape=list(FRAME),
    )
    callback = AnalysisStoreCallback(det_total, shared_store, background=False)
    try:
        for name, doc in documents:
            callback(name, doc)
    finally:
        callback.close(timeout=60)

    [child_uid] = shared_store.children(documents[0][1]["uid"])
    reduction = shared_store[str(child_uid)].stop["reduction"]
    assert reduction["events_reduced"] == 0
    assert reduction["events_failed"] == 2
    assert {f["stage"] for f in reduction["failures"]} == {"loading external data"}
    assert all(f["error"].startswith("AssetLocationError") for f in reduction["failures"])
