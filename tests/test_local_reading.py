"""store.read and the store client's arrays: an array read from its local files equals the
catalog's read of it."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from bluesky_analysis_store import AnalysisStore, AssetLocationError, RunNotFoundError


def _frames(count: int = 3) -> list[dict]:
    rng = np.random.default_rng(7)
    return [
        {
            "primary": {
                "image": rng.random((6, 5)),
                "counts": rng.integers(0, 1000, size=(4, 4)).astype(np.uint16),
                "profile": rng.random(8).astype(np.float32),
                "total": float(i),
            }
        }
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def saved(store: AnalysisStore) -> tuple[str, list[dict]]:
    frames = _frames()
    uid = store.save(
        frames,
        {"purpose": "local reading"},
        {"image": "HDF5", "counts": "TIFF", "profile": "NPY"},
        strict=False,
    )
    return uid, frames


@pytest.mark.parametrize("key", ["image", "counts", "profile", "total"])
def test_read_equals_the_catalogs_read_for_every_format(store, saved, key):
    uid, frames = saved
    expected = np.stack([frame["primary"][key] for frame in frames])
    through_catalog = AnalysisStore(store.client.context)[uid]["primary"][key].read()
    by_path = store.read(f"{uid}/primary/{key}")
    by_node = store.read(store[uid]["primary"][key])
    by_client = store[uid]["primary"][key].read()
    for values in (through_catalog, by_path, by_node, by_client):
        np.testing.assert_array_equal(values, expected)
        assert values.dtype == expected.dtype
    np.testing.assert_array_equal(store.read(f"{uid}/primary/{key}", slice(1, 3)), expected[1:3])


def test_the_hdf5_file_is_read_directly(store, saved):
    uid, frames = saved
    (source,) = store.catalog[f"{uid}/primary/image"].include_data_sources().data_sources()
    path = source.assets[0].data_uri.removeprefix("file://localhost")
    with h5py.File(path, "r", swmr=True, locking=False) as file:
        on_disk = file[source.parameters["dataset"]][()]
    np.testing.assert_array_equal(store.read(f"{uid}/primary/image"), on_disk)
    np.testing.assert_array_equal(
        store.read(f"{uid}/primary/image", (2, slice(0, 3))), on_disk[2, :3]
    )


def test_a_file_outside_the_readers_folders_is_refused(store, saved):
    uid, _ = saved
    narrow = AnalysisStore(store.client, readable_roots=[store.asset_root + "-elsewhere"])
    with pytest.raises(AssetLocationError, match="outside the folders this store may read"):
        narrow.read(f"{uid}/primary/image")


def test_an_unknown_path_is_not_found(store, saved):
    uid, _ = saved
    with pytest.raises(RunNotFoundError):
        store.read(f"{uid}/primary/nothing")


@pytest.mark.parametrize("key", ["image", "counts", "profile"])
def test_the_store_clients_arrays_read_their_local_files(store, saved, key):
    uid, frames = saved
    expected = np.stack([frame["primary"][key] for frame in frames])
    array = store[uid]["primary"][key]
    np.testing.assert_array_equal(array[1:3], expected[1:3])
    np.testing.assert_array_equal(np.asarray(array), expected)
    assert array.read().dtype == expected.dtype
    # Read here, not by the server: files outside a store's folders are refused here.
    narrow = AnalysisStore(store.client.context, readable_roots=[store.asset_root + "-x"])
    with pytest.raises(AssetLocationError, match="outside the folders this store may read"):
        narrow[uid]["primary"][key].read()


def test_a_missing_file_is_named(store):
    uid = store.save(
        _frames(2), {"purpose": "a file goes missing"}, {"profile": "NPY"}, strict=False
    )
    (source,) = store.catalog[f"{uid}/primary/profile"].include_data_sources().data_sources()
    first = source.assets[0].data_uri.removeprefix("file://localhost")
    os.remove(first)
    for read in (
        lambda: store[uid]["primary"]["profile"].read(),
        lambda: store.read(f"{uid}/primary/profile"),
    ):
        with pytest.raises(FileNotFoundError, match=os.path.basename(first)):
            read()


def test_arrays_read_with_a_distributed_client_open_in_this_process(store, saved):
    """A notebook with a Dask cluster: tiled's dask reads would go to the cluster and fail
    to serialize; the store's arrays are read here all the same."""
    from distributed import Client

    uid, frames = saved
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None):
        for key in ("image", "counts", "profile"):
            expected = np.stack([frame["primary"][key] for frame in frames])
            np.testing.assert_array_equal(store[uid]["primary"][key].read(), expected)
        inline = store.save(
            [{"primary": {"grid": np.full((2, 2), float(i))}} for i in range(2)], {}, strict=False
        )
        assert store[inline]["primary"]["grid"].read().tolist() == [
            [[0.0] * 2] * 2,
            [[1.0] * 2] * 2,
        ]
