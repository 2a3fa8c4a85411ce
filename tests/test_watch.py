"""watch: derived runs, rows and frames seen through tiled's streaming as they are saved."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _faults import TiledServer  # noqa: E402
from _reducers_for_tests import scaled  # noqa: E402
from bluesky.plans import count  # noqa: E402
from ophyd.sim import det  # noqa: E402

from bluesky_analysis_store import AnalysisStore, AnalysisStoreCallback, AnalysisStoreError  # noqa: E402
from bluesky_analysis_store._local_server import stop_server  # noqa: E402
from bluesky_analysis_store._watching import (  # noqa: E402
    DerivedRunWatcher,
    RunEnded,
    RunStarted,
    SavedEvent,
    SavedFrames,
)
from bluesky_analysis_store.cli import main  # noqa: E402

pytestmark = pytest.mark.slow

POINTS = 6


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory):
    """An embedded store served by its local server (which streams), writing often."""
    folder = tmp_path_factory.mktemp("watched") / "store"
    yield AnalysisStore.open(folder, served=True, flush_interval=0.1)
    stop_server(folder)


def _watch_process(store: AnalysisStore, *args: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "bluesky_analysis_store", "--store", store.location, "watch",
         *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = process.stderr.readline()  # "watching ..." once it is subscribed
    assert line.startswith("watching"), line + process.stderr.read()
    return process


def test_watch_sees_a_live_scans_derived_events_within_a_second(watched, RE):  # noqa: N803
    raw: list[str] = []
    RE.subscribe(lambda name, doc: raw.append(doc["uid"]) if name == "start" else None)
    callback = AnalysisStoreCallback([scaled], watched)
    callback.subscribe(RE)
    RE(count([det], num=2))  # the worker process has loaded what a run needs
    raw.clear()
    process = _watch_process(watched, "--json", "--runs", "1")
    try:
        RE(count([det], num=POINTS, delay=0.5))
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
        callback.close(timeout=60)
    assert process.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["type"] for r in records][0] == "RunStarted"
    assert records[-1]["type"] == "RunEnded"
    (child_uid,) = watched.children(raw[0])
    assert {r["uid"] for r in records} == {child_uid}
    assert records[0]["start"]["parent_uids"] == raw
    events = [r for r in records if r["type"] == "SavedEvent"]
    assert [e["seq_num"] for e in events] == list(range(1, POINTS + 1))
    saved = watched.read_stream(child_uid, "primary", ["total", "shifted"])
    assert [e["data"]["total"] for e in events] == saved["total"].tolist()
    assert [e["data"]["shifted"] for e in events] == saved["shifted"].tolist()
    # Seen within a second of the server writing it (the server's clock is this machine's).
    latencies = [e["received"] - e["saved"] for e in events]
    assert max(latencies) <= 1.0, latencies
    # ...and rows are saved during the scan, not only at its end.
    assert events[0]["saved"] < records[-1]["saved"] - 1.0
    assert records[-1]["stop"]["exit_status"] == "success"


def test_only_the_children_of_the_raw_run_asked_for_and_their_frames(watched):
    first = watched.save([{"primary": {"x": 1.0}}], {"purpose": "raw one"}, strict=False)
    second = watched.save([{"primary": {"x": 2.0}}], {"purpose": "raw two"}, strict=False)
    updates: list = []
    done = threading.Event()

    def record(update) -> None:
        updates.append(update)
        if isinstance(update, RunEnded):
            done.set()

    frames = [np.full((3, 2), i, dtype=np.float32) for i in range(4)]
    with DerivedRunWatcher(watched, record, parent_uid=first):
        watched.save([{"primary": {"y": 0.5}}], {}, parents=[second], strict=False)
        child = watched.save(
            [{"primary": {"y": float(i), "img": frame}} for i, frame in enumerate(frames)],
            {"purpose": "derived"},
            {"img": "NPY"},
            parents=[first],
            strict=False,
        )
        assert done.wait(30), updates
    assert {u.uid for u in updates} == {child}
    assert isinstance(updates[0], RunStarted)
    rows = [u for u in updates if isinstance(u, SavedEvent)]
    assert [(r.seq_num, r.data["y"]) for r in rows] == [(i + 1, float(i)) for i in range(4)]
    assert all(r.parent_uids == (first,) for r in rows)
    blocks = [u for u in updates if isinstance(u, SavedFrames)]
    assert blocks and {b.key for b in blocks} == {"img"}
    assert sum(b.count for b in blocks) == 4 and blocks[0].frame_shape == (3, 2)


def test_unsealed_runs_are_not_shown(watched):
    import event_model

    raw = watched.save([{"primary": {"x": 1.0}}], {"purpose": "raw"}, strict=False)
    updates: list = []
    with DerivedRunWatcher(watched, updates.append, parent_uid=raw):
        # Documents given to the store directly may claim a parent, but are not sealed.
        bundle = event_model.compose_run(metadata={"parent_uids": [raw]})
        watched("start", bundle.start_doc)
        watched("stop", bundle.compose_stop())
        sealed = watched.save([{"primary": {"x": 3.0}}], {}, parents=[raw], strict=False)
        deadline = time.monotonic() + 30
        while not any(isinstance(u, RunEnded) for u in updates) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert {u.uid for u in updates} == {sealed}


def test_plot_writes_a_png_of_the_key_as_it_is_saved(watched, tmp_path, capsys):
    raw = watched.save([{"primary": {"x": 1.0}}], {"purpose": "raw"}, strict=False)
    png = tmp_path / "live.png"
    codes: list[int] = []
    command = threading.Thread(
        target=lambda: codes.append(
            main(["--store", watched.location, "watch", "--children", raw, "--plot", "y",
                  "-o", str(png), "--runs", "1"])
        )
    )  # fmt: skip
    command.start()
    said = ""
    deadline = time.monotonic() + 30
    while "watching" not in said and time.monotonic() < deadline:  # subscribed
        time.sleep(0.05)
        said += capsys.readouterr().err
    watched.save(
        [{"primary": {"y": float(i) ** 2}} for i in range(5)], {}, parents=[raw], strict=False
    )
    command.join(60)
    assert codes == [0]
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_server_that_does_not_stream_is_refused_at_once(tmp_path):
    server = TiledServer(tmp_path / "server")
    server.start()
    try:
        store = AnalysisStore.from_uri(server.uri, "secret")
        with pytest.raises(AnalysisStoreError, match="does not stream"):
            DerivedRunWatcher(store, print).start()
    finally:
        server.stop()
    in_process = AnalysisStore.open(tmp_path / "in-process", served=False)
    with pytest.raises(AnalysisStoreError, match="served inside this process"):
        DerivedRunWatcher(in_process, print).start()


def test_an_unknown_short_uid_names_the_option(watched, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--store", watched.location, "watch", "--children", "ffffffff"])
    assert exit_.value.code == 2
    assert "error: --children: no run 'ffffffff'" in capsys.readouterr().err


def test_watch_follows_a_shared_server_from_another_process(tmp_path):
    """``serve --streaming memory`` on a store folder, written through its URI; ``watch``
    in another process, given the URI and the key, sees the derived run whole."""
    from _serve_process import API_KEY, ServeProcess

    with ServeProcess(tmp_path / "shared", "--streaming", "memory") as server:
        store = AnalysisStore.from_uri(
            server.uri, API_KEY, asset_root=server.assets, readable_roots=[server.assets]
        )
        raw = store.save([{"primary": {"x": 1.0}}], {"purpose": "raw"}, strict=False)
        process = subprocess.Popen(
            [sys.executable, "-m", "bluesky_analysis_store", "--store", server.uri,
             "--api-key", API_KEY, "watch", "--children", raw, "--json", "--runs", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            line = process.stderr.readline()
            assert line.startswith("watching"), line + process.stderr.read()
            child = store.save(
                [{"primary": {"y": float(i)}} for i in range(3)], {}, parents=[raw], strict=False
            )
            out, err = process.communicate(timeout=60)
        finally:
            process.kill()
    assert process.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["type"] for r in records] == ["RunStarted"] + ["SavedEvent"] * 3 + ["RunEnded"]
    assert {r["uid"] for r in records} == {child}
    assert [r["data"]["y"] for r in records[1:4]] == [0.0, 1.0, 2.0]
