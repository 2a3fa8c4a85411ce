"""ingest: real files in a temporary folder become a run in a real embedded analysis store."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from _helpers import assert_same_array

from bluesky_analysis_store import STORE_ENV, AnalysisStore, DataKeyError, DataValueError
from bluesky_analysis_store._errors import AnalysisStoreError, IngestError
from bluesky_analysis_store._ingest import ingest

INGEST_CODE_NAME = "bluesky_analysis_store._ingest:ingest"


# ``store``, the store ingest writes into, is the module's own: see conftest.py.


@pytest.fixture(scope="module")
def reopened(store: AnalysisStore, module_store_folder: Path) -> AnalysisStore:
    """A second, separate store on the same folder: reads what reached the disk, not a cache."""
    return AnalysisStore.open(module_store_folder)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_input_files(run, files: list[Path]) -> None:
    recorded = run.start["provenance"]["files"]
    assert [record["path"] for record in recorded] == [str(f.absolute()) for f in files]
    assert all(os.path.isabs(record["path"]) for record in recorded)
    assert [record["sha256"] for record in recorded] == [sha256(f) for f in files]


SOURCE_KEYS = ["source_file", "source_index"]


def assert_sources(columns: dict[str, np.ndarray], files: list[Path], indices: list[int]) -> None:
    """``columns``: a stream's values as ``read_stream`` gives them, its source keys among them."""
    assert_same_array(columns["source_file"], np.array([str(f.absolute()) for f in files]))
    assert_same_array(columns["source_index"], np.array(indices, dtype=np.int64))


def data_keys(run, stream: str) -> set[str]:
    """The data keys the run's descriptor declares for ``stream``."""
    return set(run[stream].metadata["data_keys"])


def run_uids(store: AnalysisStore) -> set[str]:
    """The uids of the runs in ``store``, asked now (``len(store)`` may answer from a cache
    that tiled's client keeps for a second)."""
    return set(store.client)


def asset_files(store_dir: Path) -> set[Path]:
    return {p for p in (store_dir / "assets").rglob("*") if p.is_file()}


# --- one test per file type ---------------------------------------------------------------


def test_single_page_tiff(
    store: AnalysisStore, reopened: AnalysisStore, module_store_folder: Path, tmp_path: Path
) -> None:
    image = np.arange(30, dtype=np.uint16).reshape(5, 6) * 1000
    path = tmp_path / "sample.tif"
    tifffile.imwrite(path, image)

    uid = ingest(path, {"sample": "Si"}, store)

    run = reopened[uid]
    assert run.start["sample"] == "Si"
    assert list(run) == ["primary"]
    columns = reopened.read_stream(uid, "primary", ["image", *SOURCE_KEYS])
    assert_same_array(columns["image"], image[np.newaxis])
    assert_sources(columns, [path], [0])
    assert_input_files(run, [path])
    code = run.start["provenance"]["code"]
    assert [record["name"] for record in code] == [INGEST_CODE_NAME]
    assert code[0]["importable"] is True
    assert run.start["parent_uids"] == []
    # Written through the default format, HDF5, under the store's asset folder.
    assert list((module_store_folder / "assets" / uid / "primary").iterdir()) == [
        module_store_folder / "assets" / uid / "primary" / "image.h5"
    ]


def test_multi_page_tiffs_give_one_event_per_page(
    store: AnalysisStore, reopened: AnalysisStore, module_store_folder: Path, tmp_path: Path
) -> None:
    first = np.random.default_rng(1).random((3, 4, 5), dtype=np.float32)
    second = np.random.default_rng(2).random((2, 4, 5), dtype=np.float32)
    path_a, path_b = tmp_path / "a.tiff", tmp_path / "b.TIF"
    tifffile.imwrite(path_a, first, photometric="minisblack")
    tifffile.imwrite(path_b, second, photometric="minisblack")
    with tifffile.TiffFile(path_a) as tif:
        assert len(tif.pages) == 3  # the input really is a multi-page TIFF

    uid = ingest([path_b, path_a], store=store, stream="frames", writer="TIFF")

    run = reopened[uid]
    assert list(run) == ["frames"]
    # Files in the order given, pages in file order.
    columns = reopened.read_stream(uid, "frames", ["image", *SOURCE_KEYS])
    assert_same_array(columns["image"], np.concatenate([second, first]))
    assert_sources(columns, [path_b] * 2 + [path_a] * 3, [0, 1, 0, 1, 2])
    assert_input_files(run, [path_b, path_a])
    image_folder = module_store_folder / "assets" / uid / "frames" / "image"
    written = sorted(p.name for p in image_folder.iterdir())
    assert written == [f"{i:06d}.tif" for i in range(5)]


def test_npy_series_written_as_npy(
    store: AnalysisStore, reopened: AnalysisStore, module_store_folder: Path, tmp_path: Path
) -> None:
    frames = [np.full((4, 3), i, dtype=np.int32) - 7 * i for i in range(3)]
    paths = [tmp_path / f"frame_{i}.npy" for i in range(3)]
    for path, frame in zip(paths, frames):
        np.save(path, frame)

    uid = ingest(
        [str(p) for p in paths],
        store=store,
        writer="NPY",
        code={"name": "lab.scripts:convert", "version": "1.2"},
    )

    run = reopened[uid]
    columns = reopened.read_stream(uid, "primary", ["image", *SOURCE_KEYS])
    assert_same_array(columns["image"], np.stack(frames))
    assert_sources(columns, paths, [0, 0, 0])
    assert_input_files(run, paths)
    assert [r["name"] for r in run.start["provenance"]["code"]] == [
        INGEST_CODE_NAME,
        "lab.scripts:convert",
    ]
    written = sorted(p.name for p in (module_store_folder / "assets" / uid / "primary").iterdir())
    assert written == ["image_0.npy", "image_1.npy", "image_2.npy"]


@pytest.fixture
def hdf5_file(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    frames = np.arange(4 * 3 * 2, dtype=np.uint8).reshape(4, 3, 2)
    exposure = np.array([0.1, 0.2, 0.4, 0.8])
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as file:
        file["/entry/instrument/detector/frames"] = frames
        file["/entry/instrument/detector/exposure"] = exposure
        file["/entry/title"] = "a string, skipped"
        file["/entry/other/offsets"] = np.array([1, 2], dtype=np.int16)
    return path, frames, exposure


def test_hdf5_file_with_two_datasets(
    store: AnalysisStore, reopened: AnalysisStore, tmp_path: Path
) -> None:
    frames = np.arange(5 * 2 * 3, dtype=np.int64).reshape(5, 2, 3)
    exposure = np.linspace(0.5, 2.5, 5)
    path = tmp_path / "scan.hdf5"
    with h5py.File(path, "w") as file:
        file["/entry/data/frames"] = frames
        file["/entry/data/exposure.time"] = exposure  # a '.' is not allowed in a data key
        file["/entry/title"] = "a string: not numeric, skipped"

    uid = ingest(path, store=store)

    run = reopened[uid]
    assert data_keys(run, "primary") == {"frames", "exposure_time", "source_file", "source_index"}
    columns = reopened.read_stream(uid, "primary", ["frames", "exposure_time", *SOURCE_KEYS])
    assert_same_array(columns["frames"], frames)  # frames along axis 0
    assert_same_array(columns["exposure_time"], exposure)  # one scalar per event, inline
    assert_sources(columns, [path] * 5, [0, 1, 2, 3, 4])
    assert_input_files(run, [path])


def test_hdf5_datasets_chosen_with_double_colon(
    store: AnalysisStore, reopened: AnalysisStore, hdf5_file: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    path, frames, exposure = hdf5_file  # /entry/other/offsets has another length: not taken

    uid = ingest(
        [
            f"{path}::/entry/instrument/detector/frames",
            f"{path}::entry/instrument/detector/exposure",
        ],
        store=store,
    )

    run = reopened[uid]
    assert data_keys(run, "primary") == {"frames", "exposure", "source_file", "source_index"}
    columns = reopened.read_stream(uid, "primary", ["frames", "exposure", *SOURCE_KEYS])
    assert_same_array(columns["frames"], frames)
    assert_same_array(columns["exposure"], exposure)
    assert_sources(columns, [path] * 4, [0, 1, 2, 3])
    assert_input_files(run, [path])  # one file, recorded once


def test_csv_table(store: AnalysisStore, reopened: AnalysisStore, tmp_path: Path) -> None:
    path = tmp_path / "peak fits.v2.csv"
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["sample", "counts", "intensity (a.u.)", "time", "2theta", "scan"])
        writer.writerow(["Si", "12", "1.5", "0.25", "28.4", "2023_01"])
        writer.writerow(["LaB6 std", "-3", "", "0.5", "30", "2023_02"])
        writer.writerow(["", "7", "2e3", "1", "31.25", "17"])

    uid = ingest(path, {"operator": "ada"}, store, parents=[{"uid": "raw-run-uid", "time": 0.0}])

    run = reopened[uid]
    assert run.start["operator"] == "ada"
    assert run.start["parent_uids"] == ["raw-run-uid"]
    assert list(run) == ["peak_fits_v2"]  # the file's stem, made a valid name
    table = reopened.read_stream(
        uid,
        "peak_fits_v2",
        ["sample", "counts", "intensity_a_u", "time_", "column_2theta", "scan", *SOURCE_KEYS],
    )
    assert_same_array(table["sample"], np.array(["Si", "LaB6 std", ""]))
    assert_same_array(table["counts"], np.array([12, -3, 7], dtype=np.int64))
    assert_same_array(table["intensity_a_u"], np.array([1.5, np.nan, 2000.0]))
    assert_same_array(table["time_"], np.array([0.25, 0.5, 1.0]))  # 'time' is reserved
    assert_same_array(table["column_2theta"], np.array([28.4, 30.0, 31.25]))
    # Identifiers that Python's int() would take ("2023_01" is 202301 to it) stay strings.
    assert_same_array(table["scan"], np.array(["2023_01", "2023_02", "17"]))
    assert_sources(table, [path] * 3, [0, 1, 2])
    assert_input_files(run, [path])


def test_folder_of_tiffs_and_a_table(
    store: AnalysisStore,
    reopened: AnalysisStore,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = tmp_path / "beamtime"
    folder.mkdir()
    images = {name: np.full((2, 2), n, dtype=np.uint8) for n, name in enumerate("cab")}
    for name, image in images.items():  # written out of order: c, a, b
        tifffile.imwrite(folder / f"{name}.tif", image)
    (folder / "notes.txt").write_text("not data")
    (folder / "nested").mkdir()
    tifffile.imwrite(folder / "nested" / "d.tif", np.zeros((2, 2), dtype=np.uint8))
    (folder / "log.csv").write_text("step,temperature\n1,300.5\n2,301.0\n")

    with caplog.at_level(logging.INFO, logger="bluesky_analysis_store._ingest"):
        uid = ingest(folder, store=store)

    run = reopened[uid]
    in_order = [folder / name for name in ("a.tif", "b.tif", "c.tif", "log.csv")]
    assert_input_files(run, in_order)  # sorted by name; .txt and the subfolder left out
    assert sorted(run) == ["log", "primary"]
    primary = reopened.read_stream(uid, "primary", ["image", *SOURCE_KEYS])
    assert_same_array(primary["image"], np.stack([images["a"], images["b"], images["c"]]))
    assert_sources(primary, in_order[:3], [0, 0, 0])
    log = reopened.read_stream(uid, "log", ["step", "temperature", *SOURCE_KEYS])
    assert_same_array(log["step"], np.array([1, 2], dtype=np.int64))
    assert_same_array(log["temperature"], np.array([300.5, 301.0]))
    assert_sources(log, [in_order[3]] * 2, [0, 1])
    # One INFO line per file read.
    read_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("read ")]
    assert [line.split(":")[0] for line in read_lines] == [f"read {p}" for p in in_order]


def test_default_store_comes_from_the_environment(isolated_env: Path) -> None:
    default = Path(os.environ[STORE_ENV])
    path = isolated_env / "dark.npy"
    np.save(path, np.eye(3))

    uid = ingest(path, {"kind": "dark"})

    run = AnalysisStore.open(default)[uid]
    assert run.start["kind"] == "dark"
    assert_same_array(run["primary"]["image"].read(), np.eye(3)[np.newaxis])
    assert_input_files(run, [path])


# --- refused inputs: nothing is saved -----------------------------------------------------


def _text_file(folder: Path) -> list[str]:
    (folder / "notes.txt").write_text("not data")
    return [str(folder / "notes.txt")]


def _ragged_csv(folder: Path) -> list[str]:
    path = folder / "ragged.csv"
    path.write_text("a,b\n1,2\n3\n")
    return [str(path)]


def _missing_dataset(folder: Path) -> list[str]:
    path = folder / "scan.h5"
    with h5py.File(path, "w") as file:
        file["/entry/data/frames"] = np.zeros((2, 2, 2))
    return [f"{path}::/entry/data/nope"]


def _group_as_dataset(folder: Path) -> list[str]:
    path = folder / "scan.nxs"
    with h5py.File(path, "w") as file:
        file["/entry/data/frames"] = np.zeros((2, 2, 2))
    return [f"{path}::/entry/data"]


def _shape_change(folder: Path) -> list[str]:
    np.save(folder / "a.npy", np.zeros((4, 4)))
    np.save(folder / "b.npy", np.zeros((4, 5)))
    return [str(folder / "a.npy"), str(folder / "b.npy")]


def _dtype_change(folder: Path) -> list[str]:
    tifffile.imwrite(folder / "a.tif", np.zeros((4, 4), dtype=np.uint8))
    tifffile.imwrite(folder / "b.tif", np.zeros((4, 4), dtype=np.uint16))
    return [str(folder / "a.tif"), str(folder / "b.tif")]


def _tiff_pages_differ(folder: Path) -> list[str]:
    with tifffile.TiffWriter(folder / "stack.tif") as tif:
        tif.write(np.zeros((4, 4), dtype=np.uint8))
        tif.write(np.zeros((4, 5), dtype=np.uint8))
    return [str(folder / "stack.tif")]


def _csv_columns_clash(folder: Path) -> list[str]:
    (folder / "table.csv").write_text("energy,Energy\n1,2\n")
    return [str(folder / "table.csv")]


def _hdf5_names_clash(folder: Path) -> list[str]:
    with h5py.File(folder / "scan.h5", "w") as file:
        file["/entry/a/data"] = np.zeros((2, 2))
        file["/entry/b/data"] = np.ones((2, 2))
    return [str(folder / "scan.h5")]


def _different_keys(folder: Path) -> list[str]:
    tifffile.imwrite(folder / "a.tif", np.zeros((2, 2), dtype=np.uint8))
    with h5py.File(folder / "b.h5", "w") as file:
        file["frames"] = np.zeros((1, 2, 2), dtype=np.uint8)
    return [str(folder / "a.tif"), str(folder / "b.h5")]


def _hdf5_lengths_differ(folder: Path) -> list[str]:
    with h5py.File(folder / "scan.h5", "w") as file:
        file["frames"] = np.zeros((3, 2, 2))
        file["exposure"] = np.zeros(2)
    return [str(folder / "scan.h5")]


def _empty_folder(folder: Path) -> list[str]:
    (folder / "empty").mkdir()
    (folder / "empty" / "readme.txt").write_text("no data here")
    return [str(folder / "empty")]


def _stream_taken(folder: Path) -> list[str]:
    tifffile.imwrite(folder / "a.tif", np.zeros((2, 2), dtype=np.uint8))
    (folder / "primary.csv").write_text("x\n1\n")
    return [str(folder / "a.tif"), str(folder / "primary.csv")]


def _same_file_twice(folder: Path) -> list[str]:
    np.save(folder / "a.npy", np.zeros(3))
    return [str(folder / "a.npy"), str(folder)]


def _object_npy(folder: Path) -> list[str]:
    np.save(folder / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return [str(folder / "objects.npy")]


@pytest.mark.parametrize(
    ("make_paths", "error", "message"),
    [
        (lambda d: [str(d / "missing.tif")], IngestError, "no such file or folder"),
        (lambda d: [str(d / "nope" / "x.npy")], IngestError, "no such file or folder"),
        (_text_file, IngestError, "unsupported file type '.txt'"),
        (_empty_folder, IngestError, "holds no file ingest can read"),
        (_ragged_csv, DataValueError, "ragged.csv', line 3: 1 values, but the header has 2"),
        (_missing_dataset, IngestError, "/entry/data/nope: no such dataset"),
        (_group_as_dataset, IngestError, "it is a group, not a dataset"),
        (_shape_change, DataValueError, "b.npy'"),
        (_dtype_change, DataValueError, "b.tif'"),
        (_tiff_pages_differ, DataValueError, "stack.tif': page 1 is (4, 5) uint8"),
        (_csv_columns_clash, DataKeyError, "clashes with column 'energy'"),
        (_hdf5_names_clash, DataKeyError, "clashes with dataset '/entry/a/data'"),
        (_different_keys, DataKeyError, "b.h5' gives data keys ['frames']"),
        (_hdf5_lengths_differ, DataValueError, "different lengths along axis 0"),
        (_stream_taken, IngestError, "already taken by the frames"),
        (_same_file_twice, IngestError, "is given more than once"),
        (_object_npy, DataValueError, "cannot read"),
    ],  # fmt: skip
    ids=[
        "missing-file", "missing-folder", "unsupported-suffix", "empty-folder", "ragged-csv",
        "missing-hdf5-dataset", "hdf5-group", "shape-change", "dtype-change", "tiff-pages-differ",
        "csv-columns-clash", "hdf5-names-clash", "different-keys",
        "hdf5-lengths", "stream-taken", "same-file-twice", "pickled-npy",
    ],  # fmt: skip
)
def test_refused_inputs_save_nothing(
    make_paths, error, message, store: AnalysisStore, module_store_folder: Path, tmp_path: Path
) -> None:
    paths = make_paths(tmp_path)
    runs_before, assets_before = run_uids(store), asset_files(module_store_folder)

    with pytest.raises(error) as caught:
        ingest(paths, {"sample": "x"}, store)

    assert message in str(caught.value)
    assert isinstance(caught.value, AnalysisStoreError)
    assert run_uids(store) == runs_before
    assert asset_files(module_store_folder) == assets_before


def test_refused_input_does_not_even_open_the_default_store(isolated_env: Path) -> None:
    with pytest.raises(IngestError):
        ingest(isolated_env / "missing.npy")

    assert not Path(os.environ[STORE_ENV]).exists()


# --- paths as a shell user types them -------------------------------------------------------


def test_home_and_environment_variables_in_paths_are_expanded(
    store: AnalysisStore, reopened: AnalysisStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / "beamtime").mkdir(parents=True)
    path = home / "beamtime" / "frame.npy"
    np.save(path, np.arange(6, dtype=np.uint16).reshape(2, 3))
    with h5py.File(home / "beamtime" / "scan.h5", "w") as file:
        file["entry/data"] = np.zeros((2, 2, 2), dtype=np.float32)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("BEAMTIME", str(home / "beamtime"))

    from_home = ingest("~/beamtime/frame.npy", {"sample": "home"}, store)
    from_braces = ingest(["${BEAMTIME}/frame.npy"], None, store)
    from_variable = ingest("$BEAMTIME/scan.h5::/entry/data", None, store)

    assert_input_files(reopened[from_home], [path])
    assert_input_files(reopened[from_braces], [path])
    assert_input_files(reopened[from_variable], [home / "beamtime" / "scan.h5"])
    assert reopened[from_variable]["primary"]["data"].shape == (2, 2, 2)


def test_a_file_named_with_a_dollar_is_taken_as_named(
    store: AnalysisStore, reopened: AnalysisStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRICE", "elsewhere")
    path = tmp_path / "$PRICE.npy"
    np.save(path, np.ones((2, 2)))
    uid = ingest(str(path), None, store)
    assert_input_files(reopened[uid], [path])


def test_an_unset_variable_is_reported_as_typed(store: AnalysisStore, tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"NO_SUCH_VARIABLE_HERE/frame\.npy.*no such file"):
        ingest("$NO_SUCH_VARIABLE_HERE/frame.npy", None, store)
