"""The file formats under faults: readers in other processes while frames are written, the
writing process killed mid-stream, a full disk, writers refusing existing data, rewinding
frames, and the composer taking back the other keys of an event whose writing failed.

Everything is real: files on disk, subprocesses, SIGKILL, a small tmpfs filled up. A child
process writes frame ``i`` as ``frame(i)`` (see ``FRAME`` below, shared with the children),
so any frame read back can be checked value by value.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import event_model
import numpy as np
import pytest
from _helpers import assert_same_array, docs_named, validate

from bluesky_analysis_store import (
    AnalysisStore,
    AnalysisStoreError,
    AssetExistsError,
    AssetLocationError,
    FrameWriteError,
    RunComposer,
)
from bluesky_analysis_store._writer_specs import resolve_writers
from bluesky_analysis_store.formats import (
    HDF5_FORMAT,
    NPY_FORMAT,
    PARQUET_FORMAT,
    TIFF_FORMAT,
    NPYSeriesWriter,
    RewindableWriter,
    Writer,
    formats,
)

FORMATS = (HDF5_FORMAT, TIFF_FORMAT, NPY_FORMAT)
FORMAT_IDS = [fmt.name for fmt in FORMATS]
# The formats the killed-writer and full-disk cases run with: Parquet too, writing frames as
# variable-length values (1-D, one file per event).
FAULT_FORMATS = (*FORMATS, PARQUET_FORMAT)
FAULT_FORMAT_IDS = [fmt.name for fmt in FAULT_FORMATS]

# Frame ``i`` of the children: every value differs, so a partial or misplaced frame shows.
FRAME = textwrap.dedent(
    """
    import numpy as np

    def frame(i, shape):
        size = int(np.prod(shape))
        return (np.arange(size, dtype="float64") + i * size).reshape(shape)

    def value_of(fmt, i, shape):
        # Frame i as fmt takes it: flat for Parquet (a variable-length value).
        return frame(i, shape).ravel() if fmt.name == "PARQUET" else frame(i, shape)

    def kwargs_of(fmt):
        # The resource kwargs of key "img" of float64 frames in fmt.
        described = {"dtype_numpy": "<f8", "shape": [None]}
        return {**fmt.default_resource_kwargs, **fmt.key_resource_kwargs("img", described)}
    """
)
namespace: dict = {}
exec(FRAME, namespace)  # the very definition the child processes run
frame = namespace["frame"]
value_of = namespace["value_of"]
kwargs_of = namespace["kwargs_of"]

CHILD_TIMEOUT = 120  # a hung child fails the test instead of hanging the suite


def full_path(fmt, folder: Path, stem: str = "run/primary/img") -> str:
    return os.path.join(folder, fmt.resource_path(stem))


def frame_files(fmt, path: str) -> list[str]:
    """The names of ``path``'s frame files (TIFF/NPY/Parquet), temporary files left out."""
    folder = path if fmt.suffix.endswith("/") else os.path.dirname(path)
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=CHILD_TIMEOUT
    )


# --- refusing existing data ------------------------------------------------------------------


def test_hdf5_writer_refuses_an_existing_file_and_leaves_it_alone(tmp_path: Path) -> None:
    path = full_path(HDF5_FORMAT, tmp_path)
    first = HDF5_FORMAT.writer(path, dataset="data")
    first(frame(0, (3, 4)))
    first.close()
    with pytest.raises(AssetExistsError, match="refusing to write into the existing file") as info:
        HDF5_FORMAT.writer(path, dataset="data")
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, AnalysisStoreError)
    # Another dataset name does not make an existing file fair game either.
    with pytest.raises(AssetExistsError):
        HDF5_FORMAT.writer(path, dataset="other")
    assert_same_array(HDF5_FORMAT.handler(path, dataset="data")(index=0), frame(0, (3, 4)))


def test_hdf5_writer_refuses_a_file_that_appeared_after_it_was_made(tmp_path: Path) -> None:
    path = full_path(HDF5_FORMAT, tmp_path)
    late = HDF5_FORMAT.writer(path)
    early = HDF5_FORMAT.writer(path)
    early(frame(0, (2,)))
    with pytest.raises(AssetExistsError):
        late(frame(7, (2,)))
    early(frame(1, (2,)))
    early.close()
    late.close()
    handler = HDF5_FORMAT.handler(path, dataset="data")
    assert_same_array(handler(index=0), frame(0, (2,)))
    assert_same_array(handler(index=1), frame(1, (2,)))
    assert os.listdir(os.path.dirname(path)) == ["img.h5"]  # no temporary file left


def file_hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) and the sha256 of its bytes."""
    import hashlib

    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("fmt", [TIFF_FORMAT, NPY_FORMAT], ids=["TIFF", "NPY"])
def test_series_writers_refuse_a_series_that_has_frames(fmt, tmp_path: Path) -> None:
    path = full_path(fmt, tmp_path)
    first = fmt.writer(path, **fmt.default_resource_kwargs)
    first(frame(0, (3, 3)))
    before = file_hashes(tmp_path)
    with pytest.raises(AssetExistsError, match="exists already") as info:
        fmt.writer(path, **fmt.default_resource_kwargs)
    assert isinstance(info.value, FileExistsError)
    with pytest.raises(AssetExistsError):  # the format's check before a writer is made
        fmt.check_target(path, fmt.default_resource_kwargs)
    assert file_hashes(tmp_path) == before
    assert_same_array(fmt.handler(path, **fmt.default_resource_kwargs)(index=0), frame(0, (3, 3)))


@pytest.mark.parametrize("fmt", [TIFF_FORMAT, NPY_FORMAT], ids=["TIFF", "NPY"])
def test_series_writers_never_replace_a_frame_file(fmt, tmp_path: Path) -> None:
    path = full_path(fmt, tmp_path)
    late = fmt.writer(path, **fmt.default_resource_kwargs)  # made while the place was empty
    first = fmt.writer(path, **fmt.default_resource_kwargs)
    first(frame(0, (3, 3)))
    before = file_hashes(tmp_path)
    with pytest.raises(AssetExistsError, match="refusing to replace the existing frame file"):
        late(frame(9, (3, 3)))
    assert file_hashes(tmp_path) == before
    assert_same_array(fmt.handler(path, **fmt.default_resource_kwargs)(index=0), frame(0, (3, 3)))


def test_hdf5_check_target_refuses_an_existing_file(tmp_path: Path) -> None:
    path = full_path(HDF5_FORMAT, tmp_path)
    writer = HDF5_FORMAT.writer(path)
    writer(frame(0, (2,)))
    writer.close()
    before = file_hashes(tmp_path)
    with pytest.raises(AssetExistsError):
        HDF5_FORMAT.check_target(path, HDF5_FORMAT.default_resource_kwargs)
    assert file_hashes(tmp_path) == before


@pytest.mark.parametrize(
    "template", ["../{:06d}.tif", "sub/{:06d}.tif", "/tmp/{:06d}.tif", "{}/x", "fixed.tif", 3]
)
def test_tiff_writer_refuses_a_template_naming_other_places(template, tmp_path: Path) -> None:
    folder = tmp_path / "run" / "primary" / "img"
    with pytest.raises((AssetLocationError, AssetExistsError)):
        TIFF_FORMAT.writer(str(folder), template=template)
    assert not (tmp_path / "run").exists()  # refused before its folder was made


# The frames and files the tests below use: the handler's paths, built as the Filler builds
# them, ``os.path.join(root, resource_path)``.


@pytest.fixture
def written_series(tmp_path: Path) -> dict[str, tuple[Path, str, str]]:
    """A root ``data`` with one series of each format, and a folder ``outside`` beside it
    holding a file of each format that must never be read through a handler."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    written = {}
    for fmt in FORMATS:
        stem = f"run/{fmt.name.lower()}/img"
        for folder in (root, outside):
            writer = fmt.writer(full_path(fmt, folder, stem), **fmt.default_resource_kwargs)
            writer(frame(0 if folder == root else 666, (2, 2)))
            writer.close()
        written[fmt.name] = (root, fmt.resource_path(stem), fmt.spec)
    return written


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_handlers_refuse_a_resource_path_climbing_out_of_its_root(
    fmt, written_series, tmp_path: Path
) -> None:
    root, resource_path, _ = written_series[fmt.name]
    climbing = os.path.join(root, "..", "outside", resource_path)
    assert os.path.isdir(os.path.dirname(climbing.rstrip("/")))  # it would find the file outside
    with pytest.raises(AssetLocationError, match=r"'\.\.'"):
        fmt.handler(climbing, **fmt.default_resource_kwargs)
    with pytest.raises(AssetLocationError):
        fmt.handler(os.path.join(root, "../../.."), **fmt.default_resource_kwargs)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_confined_handlers_refuse_absolute_paths_and_symlinks_out(
    fmt, written_series, tmp_path: Path
) -> None:
    root, resource_path, spec = written_series[fmt.name]
    registry = formats.handler_registry(roots=[root])
    handler = registry[spec]
    assert_same_array(
        handler(os.path.join(root, resource_path), **fmt.default_resource_kwargs)(index=0),
        frame(0, (2, 2)),
    )
    # An absolute resource_path replaces the root in the Filler's join.
    absolute = os.path.join(tmp_path / "outside", resource_path)
    assert os.path.join(str(root), absolute) == absolute
    with pytest.raises(AssetLocationError, match="outside the folders it may read"):
        handler(absolute, **fmt.default_resource_kwargs)
    # A symlink inside the root that leads outside.
    (root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(AssetLocationError, match="symlinks resolved"):
        handler(os.path.join(root, "link", resource_path), **fmt.default_resource_kwargs)


@pytest.mark.parametrize("fmt", [TIFF_FORMAT, NPY_FORMAT], ids=["TIFF", "NPY"])
def test_confined_handlers_refuse_a_frame_file_linked_outside(
    fmt, written_series, tmp_path: Path
) -> None:
    root, resource_path, spec = written_series[fmt.name]
    path = os.path.join(root, resource_path)
    folder = path if fmt is TIFF_FORMAT else os.path.dirname(path)
    frame_zero = frame_files(fmt, path)[0]
    outside_frame = tmp_path / "outside" / os.path.relpath(os.path.join(folder, frame_zero), root)
    assert outside_frame.is_file()
    os.remove(os.path.join(folder, frame_zero))
    os.symlink(outside_frame, os.path.join(folder, frame_zero))
    handler = formats.handler_registry(roots=[root])[spec](path, **fmt.default_resource_kwargs)
    with pytest.raises(AssetLocationError):
        handler(index=0)


@pytest.mark.parametrize("fmt", [TIFF_FORMAT, NPY_FORMAT], ids=["TIFF", "NPY"])
def test_series_handlers_take_only_integer_frame_indices(fmt, written_series) -> None:
    root, resource_path, _ = written_series[fmt.name]
    handler = fmt.handler(os.path.join(root, resource_path), **fmt.default_resource_kwargs)
    with pytest.raises(AssetLocationError, match="non-negative integer"):
        handler(index="../../outside/run/primary/img_0")
    with pytest.raises(AssetLocationError):
        handler(index=-1)
    assert_same_array(handler(index=np.int64(0)), frame(0, (2, 2)))


def test_tiff_handler_refuses_a_template_climbing_out(written_series) -> None:
    root, resource_path, _ = written_series["TIFF"]
    with pytest.raises(AssetLocationError):
        TIFF_FORMAT.handler(os.path.join(root, resource_path), template="../../x/{:06d}.tif")


def test_hdf5_handler_reads_only_data_stored_in_the_file(written_series, tmp_path: Path) -> None:
    import h5py

    root, resource_path, _ = written_series["HDF5"]
    path = os.path.join(root, resource_path)
    outside = os.path.join(tmp_path / "outside", resource_path)
    crafted = os.path.join(root, "crafted.h5")
    with h5py.File(crafted, "w") as file:
        file["external"] = h5py.ExternalLink(outside, "/data")
        file["soft"] = h5py.SoftLink("/external")
        layout = h5py.VirtualLayout(shape=(1, 2, 2), dtype="float64")
        layout[0] = h5py.VirtualSource(outside, "data", shape=(1, 2, 2))[0]
        file.create_virtual_dataset("virtual", layout)
    for dataset in ("external", "soft", "virtual"):
        with pytest.raises(AssetLocationError):
            HDF5_FORMAT.handler(crafted, dataset=dataset)(index=0)
    assert_same_array(HDF5_FORMAT.handler(path, dataset="data")(index=0), frame(0, (2, 2)))


def test_a_generic_handler_is_confined_too(tmp_path: Path) -> None:
    from bluesky_analysis_store.formats import confine_handler

    opened = []

    def factory(path, **kwargs):  # a handler given as a plain function
        opened.append(path)
        return lambda **datum: path

    confined = confine_handler(factory, [tmp_path / "data"])
    assert confined(str(tmp_path / "data" / "x"))() == str(tmp_path / "data" / "x")
    with pytest.raises(AssetLocationError):
        confined("/etc/passwd")
    assert opened == [str(tmp_path / "data" / "x")]


# --- rewinding --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_rewind_forgets_frames_and_the_next_call_writes_them_again(fmt, tmp_path: Path) -> None:
    path = full_path(fmt, tmp_path)
    writer = fmt.writer(path, **fmt.default_resource_kwargs)
    assert isinstance(writer, RewindableWriter) and isinstance(writer, Writer)
    assert [writer(frame(i, (4, 2)))["index"] for i in range(5)] == [0, 1, 2, 3, 4]
    writer.rewind(2)
    assert [writer(frame(10 + i, (4, 2)))["index"] for i in range(2)] == [2, 3]
    writer.rewind(4)  # nothing to forget
    with pytest.raises(ValueError, match="cannot rewind to frame 5: 4 frames written"):
        writer.rewind(5)
    writer.close()

    handler = fmt.handler(path, **fmt.default_resource_kwargs)
    expected = [frame(0, (4, 2)), frame(1, (4, 2)), frame(10, (4, 2)), frame(11, (4, 2))]
    for index, value in enumerate(expected):
        assert_same_array(handler(index=index), value)
    if fmt is HDF5_FORMAT:
        import h5py

        with h5py.File(path, "r") as file:
            assert file["data"].shape == (4, 4, 2)
    else:
        assert len(frame_files(fmt, path)) == 4
    with pytest.raises((IndexError, OSError, ValueError)):
        handler(index=4)


def test_a_frame_that_fails_leaves_the_hdf5_dataset_as_it_was(tmp_path: Path) -> None:
    import h5py

    path = full_path(HDF5_FORMAT, tmp_path)
    writer = HDF5_FORMAT.writer(path)
    writer(frame(0, (3,)))
    with pytest.raises((TypeError, ValueError)):
        writer(frame(1, (4,)))  # cannot go into rows of 3
    assert writer(frame(1, (3,))) == {"index": 1}
    with h5py.File(path, "r", swmr=True, locking=False) as file:
        assert file["data"].shape == (2, 3)
    writer.close()


# --- the composer takes back an event that was written half-way -------------------------------


def block(folder: str) -> None:
    """Put a plain file where the TIFF writer's folder is: its next frame fails for real."""
    if os.path.isdir(folder):
        os.rename(folder, folder + ".aside")
    Path(folder).write_text("in the way")


def unblock(folder: str) -> None:
    os.remove(folder)
    if os.path.isdir(folder + ".aside"):
        os.rename(folder + ".aside", folder)
    else:
        os.makedirs(folder)


def test_an_event_whose_writing_fails_half_way_is_taken_back(shared_store: AnalysisStore) -> None:
    # Keys are written in this order: a (HDF5) and b (NPY) are written, then c (TIFF) fails.
    writers = resolve_writers({"a": "HDF5", "b": "NPY", "c": "TIFF"}, shared_store.asset_root)
    composer = RunComposer({"purpose": "test"}, writers)
    shape = (3, 2)
    documents = composer.start()
    values = {"a": frame(0, shape), "b": frame(0, shape), "c": frame(0, shape)}
    documents += composer.event("primary", values)
    tiff_folder = os.path.join(shared_store.asset_root, composer.uid, "primary", "c")
    h5_path = os.path.join(shared_store.asset_root, composer.uid, "primary", "a.h5")

    block(tiff_folder)
    with pytest.raises(FrameWriteError):
        composer.event("primary", {key: frame(1, shape) for key in values})
    # a and b were rewound: no row, no file for the event that was not saved.
    import h5py

    with h5py.File(h5_path, "r", swmr=True, locking=False) as file:
        assert file["data"].shape == (1, *shape)
    npy_folder = os.path.dirname(h5_path)
    assert sorted(n for n in os.listdir(npy_folder) if n.startswith("b_")) == ["b_0.npy"]

    unblock(tiff_folder)
    for i in (2, 3):
        documents += composer.event("primary", {key: frame(i, shape) for key in values})
    documents = validate(documents)
    # Every key's datums are contiguous and in step with seq_num.
    for resource in docs_named(documents, "stream_resource"):
        datums = [d for d in docs_named(documents, "stream_datum")
                  if d["stream_resource"] == resource["uid"]]
        assert [d["indices"]["start"] for d in datums] == [0, 1, 2]
        assert [d["seq_nums"]["start"] for d in datums] == [1, 2, 3]

    # Read back through tiled while the HDF5 writer still holds its file open (SWMR).
    for name, doc in documents:
        shared_store(name, doc)
    shared_store.flush()
    expected = np.stack([frame(i, shape) for i in (0, 2, 3)])
    for key in values:
        assert_same_array(shared_store[composer.uid]["primary"][key].read(), expected)
    for name, doc in validate(composer.stop()):
        shared_store(name, doc)
    run = shared_store[composer.uid]
    assert run.stop["num_events"] == {"primary": 3}
    for key in values:
        assert_same_array(run["primary"][key].read(), expected)


def test_a_first_event_that_fails_still_gets_its_descriptor_sent_later(tmp_path: Path) -> None:
    writers = resolve_writers({"a": "HDF5", "c": "TIFF"}, tmp_path)
    composer = RunComposer({"purpose": "test"}, writers)
    tiff_folder = os.path.join(tmp_path, composer.uid, "primary", "c")
    Path(tiff_folder).parent.mkdir(parents=True)
    Path(tiff_folder).write_text("in the way")
    documents = composer.start()
    with pytest.raises(OSError):
        composer.event("primary", {"a": frame(0, (2,)), "c": frame(0, (2,))})
    unblock(tiff_folder)
    documents += composer.event("primary", {"a": frame(1, (2,)), "c": frame(1, (2,))})
    documents += composer.stop()
    documents = validate(documents)
    names = [name for name, _ in documents]
    assert names == [
        "start", "descriptor", "stream_resource", "stream_resource",
        "stream_datum", "stream_datum", "event", "stop",
    ]  # fmt: skip
    for datum in docs_named(documents, "stream_datum"):
        assert datum["indices"] == {"start": 0, "stop": 1}
        assert datum["seq_nums"] == {"start": 1, "stop": 2}
    h5_path = os.path.join(os.path.dirname(tiff_folder), "a.h5")
    assert_same_array(HDF5_FORMAT.handler(h5_path)(index=0), frame(1, (2,)))


class FailsOnSecondFrame(NPYSeriesWriter):
    """An NPY writer that fails on purpose on its second frame (and not after)."""

    def __call__(self, value):
        self._calls = getattr(self, "_calls", 0) + 1
        if self._calls == 2:
            raise OSError("failing on purpose")
        return super().__call__(value)


class CannotRewind:
    """A writer without ``rewind``: a frame it wrote stays written."""

    def __init__(self, path: str) -> None:
        self._inner = NPYSeriesWriter(path)

    def __call__(self, value):
        return self._inner(value)

    def close(self) -> None:
        self._inner.close()


def test_a_writer_that_cannot_rewind_keeps_its_datums_pointing_at_its_frames(
    tmp_path: Path,
) -> None:
    writers = resolve_writers(
        {
            "kept": {"writer": CannotRewind, "spec": NPY_FORMAT.spec},
            "rewound": "HDF5",
            "failing": {"writer": FailsOnSecondFrame, "spec": NPY_FORMAT.spec},
        },
        tmp_path,
    )
    composer = RunComposer({"purpose": "test"}, writers, asset_documents="resource")
    documents = composer.start()
    keys = ("kept", "rewound", "failing")
    documents += composer.event("primary", {key: frame(0, (2,)) for key in keys})
    with pytest.raises(AnalysisStoreError, match=r"was not saved.*\['kept'\] cannot be taken back"):
        composer.event("primary", {key: frame(1, (2,)) for key in keys})
    documents += composer.event("primary", {key: frame(2, (2,)) for key in keys})
    documents += composer.stop()
    documents = validate(documents)

    filler = event_model.Filler(formats.handler_registry(), inplace=False)
    events = [filler(name, doc)[1] for name, doc in documents]
    events = [doc for doc, (name, _) in zip(events, documents, strict=True) if name == "event"]
    filler.close()
    assert [event["seq_num"] for event in events] == [1, 2]
    for event, i in zip(events, (0, 2), strict=True):
        for key in keys:
            assert_same_array(event["data"][key], frame(i, (2,)))
    key_of = {r["uid"]: r["resource_path"].rsplit("/", 1)[-1].split(".")[0]
              for r in docs_named(documents, "resource")}
    indices = {key: [] for key in keys}
    for datum in docs_named(documents, "datum"):
        indices[key_of[datum["resource"]]].append(datum["datum_kwargs"]["index"])
    # kept's frame 1 stays in its file, unreferenced; the others were taken back.
    assert indices == {"kept": [0, 2], "rewound": [0, 1], "failing": [0, 1]}
    assert os.path.exists(os.path.join(tmp_path, composer.uid, "primary", "kept_1.npy"))


# --- slow: other processes, SIGKILL, full disks ---------------------------------------------

READER = FRAME + textwrap.dedent(
    """
    import os, sys
    import h5py
    from bluesky_analysis_store.formats import HDF5DatasetHandler

    path, stop_flag, shape = sys.argv[1], sys.argv[2], (16, 16)
    handler = HDF5DatasetHandler(path)
    reads = failed = 0
    seen = 0
    print("ready", flush=True)
    while not os.path.exists(stop_flag):
        if not os.path.exists(path):
            continue
        try:
            with h5py.File(path, "r", swmr=True, locking=False) as file:
                rows = file["data"].shape[0]
                if rows:
                    assert np.array_equal(file["data"][rows - 1], frame(rows - 1, shape))
            if rows:
                assert np.array_equal(handler(index=rows - 1), frame(rows - 1, shape))
            reads += 1
        except Exception as error:
            failed += 1
            print("failed", repr(error), file=sys.stderr, flush=True)
            continue
        if rows > seen:
            seen = rows
            print("saw", rows, flush=True)
    print("reads", reads, "failed", failed, flush=True)
    """
)


@pytest.mark.slow
def test_a_reader_in_another_process_never_fails_while_hdf5_frames_are_written(
    tmp_path: Path,
) -> None:
    path = full_path(HDF5_FORMAT, tmp_path)
    stop_flag = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, path, str(stop_flag)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "ready"
        writer = HDF5_FORMAT.writer(path, **HDF5_FORMAT.default_resource_kwargs)
        frames, checkpoint = 300, 25
        for i in range(frames):
            writer(frame(i, (16, 16)))
            if (i + 1) % checkpoint == 0:
                # Wait until the reader has read this far, so reads and writes interleave.
                while True:
                    line = reader.stdout.readline()
                    assert line, f"the reader ended early: {reader.stderr.read()}"
                    if line.startswith("saw") and int(line.split()[1]) >= i + 1:
                        break
        writer.close()
        stop_flag.touch()
        out, err = reader.communicate(timeout=CHILD_TIMEOUT)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, err
    last = out.strip().splitlines()[-1].split()
    reads, failed = int(last[1]), int(last[3])
    assert failed == 0, err
    assert reads >= frames // checkpoint  # it really read, at every checkpoint at least


WRITER = FRAME + textwrap.dedent(
    """
    import sys
    from bluesky_analysis_store.formats import formats

    name, path, shape = sys.argv[1], sys.argv[2], (128, 128)
    fmt = formats[name]
    writer = fmt.writer(path, **kwargs_of(fmt))
    for i in range(2000):
        writer(value_of(fmt, i, shape))
        print(i, flush=True)
    """
)

CHECK_AFTER_KILL = FRAME + textwrap.dedent(
    """
    import sys
    from bluesky_analysis_store.formats import formats

    name, path, last, shape = sys.argv[1], sys.argv[2], int(sys.argv[3]), (128, 128)
    fmt = formats[name]
    handler = fmt.handler(path, **kwargs_of(fmt))
    for i in range(last + 1):
        assert np.array_equal(handler(index=i), value_of(fmt, i, shape)), i
    if name == "HDF5":
        import h5py
        from tiled.adapters.hdf5 import HDF5ArrayAdapter
        params = fmt.stream_parameters(fmt.default_resource_kwargs, shape)
        with h5py.File(path, "r", swmr=True, locking=False) as file:
            rows = file["data"].shape[0]
            assert np.array_equal(file["data"][last], frame(last, shape))
        adapter = HDF5ArrayAdapter.from_uris(
            fmt.stream_uri(path), dataset=params["dataset"], swmr=params["swmr"],
            locking=params["locking"],
        )
        array = adapter.read()
        assert array.shape[0] == rows >= last + 1, (array.shape, rows, last)
        assert np.array_equal(array[last], frame(last, shape))
        print("rows", rows)
    print("ok")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FAULT_FORMATS, ids=FAULT_FORMAT_IDS)
def test_frames_survive_sigkill_of_the_writing_process(fmt, tmp_path: Path) -> None:
    path = full_path(fmt, tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, fmt.name, path], stdout=subprocess.PIPE, text=True
    )
    returned = -1
    try:
        for line in child.stdout:
            returned = int(line)
            if returned == 30:
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=CHILD_TIMEOUT)
    # Lines the child printed before it died: those writes returned too.
    returned = max([returned, *(int(line) for line in child.stdout.read().split())])
    assert child.returncode == -signal.SIGKILL
    assert returned >= 30

    checked = run_python(CHECK_AFTER_KILL, fmt.name, path, str(returned))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip().endswith("ok")
    if fmt is not HDF5_FORMAT:
        # Under final names: exactly frames 0..n, each whole (read back above or here).
        names = frame_files(fmt, path)
        handler = fmt.handler(path, **kwargs_of(fmt))
        assert len(names) >= returned + 1
        assert names == sorted(
            os.path.basename(_frame_name(fmt, path, i)) for i in range(len(names))
        )
        for i in range(len(names)):
            assert_same_array(handler(index=i), value_of(fmt, i, (128, 128)))


def _frame_name(fmt, path: str, index: int) -> str:
    if fmt is TIFF_FORMAT:
        return os.path.join(path, fmt.default_resource_kwargs["template"].format(index))
    if fmt is PARQUET_FORMAT:
        return os.path.join(path, f"{index:06d}.parquet")
    return f"{path}_{index}.npy"


# --- slow: a full disk ------------------------------------------------------------------------

TMPFS_SIZE = 4 << 20
FILLER_BYTES = 1 << 20


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 4 MiB tmpfs, mounted for the module and unmounted afterwards, also on failure."""
    if os.geteuid() != 0:
        pytest.fail("the full-disk tests mount a tmpfs and must run as root (id -u is not 0)")
    folder = tmp_path_factory.mktemp("small-disk")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs on {folder} for the full-disk tests: {mounted.stderr}")
    try:
        yield folder
    finally:
        unmounted = subprocess.run(["umount", str(folder)], capture_output=True, text=True)
        if unmounted.returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def full_disk(small_disk: Path) -> Iterator[Path]:
    """The tmpfs, empty at the start of each test and emptied afterwards."""
    yield small_disk
    for entry in small_disk.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


FILL_UP = FRAME + textwrap.dedent(
    """
    import os, sys
    from bluesky_analysis_store import AnalysisStoreError
    from bluesky_analysis_store import DiskFullError
    from bluesky_analysis_store.formats import _safe_writing, formats, hdf5

    name, path, filler, check = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    if check == "unchecked":
        # Without the free-space check the write itself meets ENOSPC, inside the library.
        _safe_writing.ensure_free_space = hdf5.ensure_free_space = lambda path, nbytes: None
    shape = (128, 128)  # 128 KiB a frame
    fmt = formats[name]
    writer = fmt.writer(path, **kwargs_of(fmt))
    written = 0
    try:
        while written < 1000:
            writer(value_of(fmt, written, shape))
            written += 1
    except DiskFullError as error:
        assert isinstance(error, OSError) and isinstance(error, AnalysisStoreError)
        assert error.errno == 28 and error.filename
        print("full", written, "inside-write", error.__cause__ is not None, flush=True)
        print("message", str(error).replace(chr(10), " "), flush=True)
    if name == "HDF5":
        import h5py
        with h5py.File(path, "r", swmr=True, locking=False) as file:
            assert file["data"].shape[0] == written, file["data"].shape
    os.remove(filler)
    for _ in range(3):
        writer(value_of(fmt, written, shape))
        written += 1
    writer.close()
    print("done", written, flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("check", ["checked", "unchecked"])
@pytest.mark.parametrize("fmt", FAULT_FORMATS, ids=FAULT_FORMAT_IDS)
def test_a_full_disk_raises_a_clean_error_and_writing_continues_once_space_is_freed(
    fmt, check: str, full_disk: Path
) -> None:
    """``checked``: the free-space check refuses the frame before anything is written;
    ``unchecked`` (the check switched off in the child, as when another process fills the
    disk between the check and the write): the library's own ENOSPC is turned into the same
    clean error. Either way the process goes on (a segfault would show as a negative return
    code), the frames before are intact and writing resumes once space is freed."""
    path = full_path(fmt, full_disk)
    filler = full_disk / "filler"
    filler.write_bytes(b"\0" * FILLER_BYTES)

    child = run_python(FILL_UP, fmt.name, path, str(filler), check)

    assert child.returncode == 0, f"the writer ended with {child.returncode}: {child.stderr}"
    lines = dict(line.split(" ", 1) for line in child.stdout.strip().splitlines())
    full_at, _, inside_write = lines["full"].split()
    full_at = int(full_at)
    assert full_at > 0
    assert inside_write == str(check == "unchecked")
    assert path in lines["message"] and "bytes needed" in lines["message"]
    done = int(lines["done"])
    assert done == full_at + 3
    handler = fmt.handler(path, **kwargs_of(fmt))
    for i in range(done):
        assert_same_array(handler(index=i), value_of(fmt, i, (128, 128)))
    if fmt is not HDF5_FORMAT:
        assert len(frame_files(fmt, path)) == done
        leftovers = [n for n in os.listdir(os.path.dirname(_frame_name(fmt, path, 0)))
                     if n.startswith(".")]
        assert leftovers == []
