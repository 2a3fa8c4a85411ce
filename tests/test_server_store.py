"""The analysis store behind a real tiled server: a ``tiled serve catalog`` process on
127.0.0.1, written and read through ``AnalysisStore.from_uri``."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from _faults import API_KEY, TiledServer
from _tables import assert_read_back, events, peak_lists, spectra
from _helpers import (
    DTYPES,
    FORMAT_NAMES,
    PROVENANCE,
    assert_same_array,
    files_under,
    make_frames,
)

from bluesky_analysis_store import AnalysisStore, AssetLocationError, RunNotFoundError

pytestmark = pytest.mark.usefixtures("isolated_env")


@pytest.fixture(scope="module")
def store(server: TiledServer) -> AnalysisStore:
    return AnalysisStore.from_uri(server.uri, api_key=API_KEY, asset_root=server.assets,
                                  readable_roots=[server.assets])


def fresh_reader(server: TiledServer) -> AnalysisStore:
    """A new client: what it reads, the server read from its catalog and files."""
    return AnalysisStore.from_uri(server.uri, api_key=API_KEY)


@pytest.fixture(scope="module")
def saved(server: TiledServer, store: AnalysisStore) -> dict[str, tuple[str, dict[str, list]]]:
    """One run per format with an image and a pattern key per dtype (one save per format)."""
    runs = {}
    for fmt_name in FORMAT_NAMES:
        frames = {}
        for dtype in DTYPES:
            frames[f"img_{dtype}"] = make_frames(dtype, (5, 4), count=3)
            frames[f"pattern_{dtype}"] = make_frames(dtype, (9,), count=3, seed=1)
        uid = store.save(
            [{"primary": {**{k: f[n] for k, f in frames.items()}, "n": n}} for n in range(3)],
            {"server": True}, dict.fromkeys(frames, fmt_name), root=server.assets,
            **PROVENANCE,
        )
        runs[fmt_name] = (uid, frames)
    return runs


@pytest.fixture(scope="module")
def reader(server: TiledServer, saved) -> AnalysisStore:
    """A new client: what it reads, the server read from its catalog and files."""
    return AnalysisStore.from_uri(server.uri, api_key=API_KEY)


@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_save_and_read_back_through_the_server(
    fmt_name, dtype, server: TiledServer, saved, reader: AnalysisStore
) -> None:
    uid, frames = saved[fmt_name]
    assert files_under(server.assets / uid)
    run = reader[uid]
    for key in (f"img_{dtype}", f"pattern_{dtype}"):
        assert_same_array(run["primary"][key].read(), np.stack(frames[key]))
    np.testing.assert_array_equal(run["primary"]["n"].read(), [0, 1, 2])
    assert run.start["server"] is True
    assert run.start["parent_uids"] == [p["uid"] for p in PROVENANCE["parents"]]
    assert run.stop["num_events"] == {"primary": 3}


def test_save_uses_the_asset_root_by_default(server: TiledServer, store: AnalysisStore) -> None:
    frames = make_frames("uint16", (3, 3), count=2)
    uid = store.save([{"primary": {"img": f}} for f in frames], {}, {"img": "TIFF"},
                     **PROVENANCE)
    assert len(files_under(server.assets / uid)) == 2
    assert_same_array(fresh_reader(server)[uid]["primary"]["img"].read(), np.stack(frames))


def test_children_and_missing_runs(server: TiledServer, store: AnalysisStore) -> None:
    parent = str(uuid.uuid4())
    first = store.save([{"primary": {"x": 1.0}}], {}, parents=[{"uid": parent, "time": 0.0}], code=np.mean)
    time.sleep(0.01)
    second = store.save([{"primary": {"x": 2.0}}], {}, parents=[{"uid": parent, "time": 0.0}], code=np.mean)
    store.save([{"primary": {"x": 3.0}}], {}, parents=[{"uid": parent + "0", "time": 0.0}], code=np.mean)
    assert fresh_reader(server).children(parent) == [second, first]
    missing = str(uuid.uuid4())
    with pytest.raises(RunNotFoundError):
        store[missing]
    assert missing not in store and first in store


def test_assets_the_server_cannot_read_are_refused(
    server: TiledServer, store: AnalysisStore, tmp_path: Path
) -> None:
    before = set(store.client)
    with pytest.raises(AssetLocationError):
        store.save([{"primary": {"img": np.ones((2, 2))}}], {}, {"img": "NPY"},
                   root=tmp_path / "elsewhere", **PROVENANCE)
    assert not (tmp_path / "elsewhere").exists()  # refused before anything was made there
    assert set(store.client) == before


def test_open_accepts_a_server_uri(server: TiledServer, store: AnalysisStore,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    uid = store.save([{"primary": {"x": 1}}], {"via": "open"}, **PROVENANCE)
    monkeypatch.setenv("TILED_API_KEY", API_KEY)
    opened = AnalysisStore.open(server.uri)
    assert opened.location == server.uri
    assert opened[uid].start["via"] == "open"
    assert os.fspath(server.assets) not in (opened.readable_roots or [])


def test_a_live_callback_saves_through_the_server_from_its_worker_process(
    server: TiledServer, store: AnalysisStore
) -> None:
    """The worker process connects to the server again, with the same API key."""
    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd.sim import det

    from bluesky_analysis_store import AnalysisStoreCallback

    sys.path.insert(0, str(Path(__file__).parent))
    from _reducers_for_tests import scaled

    RE = RunEngine({})  # noqa: N806
    callback = AnalysisStoreCallback([scaled], store)
    assert callback.mode == "process" and callback.worker_pid != os.getpid()
    RE.subscribe(callback)
    try:
        (raw_uid,) = RE(count([det], num=4))
    finally:
        callback.close(timeout=60)
    (child_uid,) = fresh_reader(server).children(raw_uid)
    child = fresh_reader(server)[child_uid]
    assert child.stop["reduction"]["events_reduced"] == 4
    np.testing.assert_allclose(
        child["primary"]["total"].read(), [10.0 * det.read()["det"]["value"]] * 4
    )


def test_a_pin_is_kept_by_the_server_for_every_client(
    server: TiledServer, store: AnalysisStore
) -> None:
    parent = {"uid": str(uuid.uuid4()), "time": 0.0}
    older, newer = (
        store.save([{"primary": {"y": float(n)}}], {}, parents=[parent], code=np.mean)
        for n in range(2)
    )
    assert list(fresh_reader(server).children(parent["uid"], current=True)) == [newer]
    store.pin(older)
    assert list(fresh_reader(server).children(parent["uid"], current=True)) == [older]
    store.unpin(older)
    assert list(fresh_reader(server).children(parent["uid"], current=True)) == [newer]


def test_a_child_saved_through_the_server_gets_its_prov_links(
    server: TiledServer, store: AnalysisStore, tmp_path: Path
) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_provenance_graph import assert_child_links, save_linked_child

    data_folder = Path(server.assets) / f"inputs-{uuid.uuid4()}"
    data_folder.mkdir()
    raw, child, data = save_linked_child(store, data_folder)
    assert_child_links(fresh_reader(server), raw, child, data)


def test_tables_and_variable_lengths_through_the_server(
    server: TiledServer, store: AnalysisStore
) -> None:
    tables, peaks = spectra(), peak_lists()
    uid = store.save(events(tables, peaks), {}, **PROVENANCE)
    assert len(files_under(server.assets / uid)) == 2 * len(tables)  # a file per event and key
    assert_read_back(fresh_reader(server), uid, tables, peaks)
