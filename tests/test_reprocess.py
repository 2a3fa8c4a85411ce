"""Offline reduction: raw runs saved in a real embedded store, reduced again by ``reprocess``.

The raw runs come from a real RunEngine with the store subscribed; their frames are NPY files
in a folder the store may read. A module shares one store (creating one costs seconds); every
test makes raw runs of its own and looks only at those.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from bluesky.plans import count  # noqa: E402

from _helpers import assert_same_array  # noqa: E402
from _live import dark_then_positions  # noqa: E402
from _offline_reducers import frame_peak, row_sums, scaled_total  # noqa: E402
from bluesky_analysis_store import AnalysisStore, AnalysisStoreError, reprocess  # noqa: E402
from bluesky_analysis_store.example_reducers import (  # noqa: E402
    DarkSubtracted,
    normalise_and_sum,
)

# Worker processes open the store again: served by its local server, in a fraction of a
# second each (see conftest's ``store``).
STORE_SERVED = True

# The RunEngine, the devices and the module's store are fixtures of conftest.py.
pytestmark = pytest.mark.usefixtures("runs_saved_in_store")


# --- helpers ------------------------------------------------------------------------------


def data_columns(run: Any, stream: str) -> list[str]:
    """The stream's columns that hold data: not the event times nor the timestamps."""
    return sorted(k for k in run[stream] if k != "time" and not k.startswith("ts_"))


def asset_entries(store: AnalysisStore) -> set[str]:
    """The top-level entries of the store's asset folder: one folder per child run."""
    return set(os.listdir(store.asset_root))


def files_of(store: AnalysisStore, child_uid: str) -> list[str]:
    folder = pathlib.Path(store.asset_root, child_uid)
    return sorted(str(p) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# --- 1. live and offline reduction give the same child data --------------------------------


def test_live_and_reprocessed_children_hold_identical_data(RE, store, cam, motor, make_callback):
    reducers = [normalise_and_sum, row_sums, DarkSubtracted(key="cam")]
    writers = {"corrected": "TIFF"}
    make_callback(reducers, writers=writers).subscribe(RE)
    # Two different dark frames: the second replaces the first half way, so the offline
    # replay must interleave the streams in time exactly as the RunEngine emitted them.
    plan = dark_then_positions(cam, motor, [-2.0, -1.0, 0.5, 1.0, 2.0], darks={0: -4.0, 3: 4.0})
    (raw_uid,) = RE(plan)
    [live_uid] = store.children(raw_uid)

    report = reprocess(store, raw_uid, reducers, store, writers=writers, force=True, progress=False)

    assert report.failed == {} and report.skipped == {}
    offline_uid = report.saved[raw_uid]
    assert offline_uid != live_uid
    assert store.children(raw_uid) == [offline_uid, live_uid]
    live, offline = store[live_uid], store[offline_uid]
    assert live.start["parent_uids"] == offline.start["parent_uids"] == [raw_uid]
    assert live.start["provenance"]["code"] == offline.start["provenance"]["code"]

    expected = {
        "primary": [
            "corrected", "corrected_total", "normalised", "parent_seq_num", "row_sums",
            "seq_num", "total",
        ],
        "summary": ["seq_num", "summed"],
    }
    assert sorted(live) == sorted(offline) == sorted(expected)
    offline_read: dict[str, dict[str, np.ndarray]] = {}  # stream -> key -> values
    for stream, keys in expected.items():
        assert data_columns(live, stream) == data_columns(offline, stream) == keys
        # The frame-valued keys went to files, identically described in both children.
        live_keys = live[stream].descriptors[0]["data_keys"]
        offline_keys = offline[stream].descriptors[0]["data_keys"]
        assert live_keys == offline_keys
        live_columns = store.read_stream(live_uid, stream, keys)
        offline_columns = offline_read[stream] = store.read_stream(offline_uid, stream, keys)
        for key in keys:
            assert_same_array(live_columns[key], offline_columns[key], f"{stream}/{key}")
    files = (("primary", "normalised"), ("primary", "corrected"), ("primary", "row_sums"),
             ("summary", "summed"))
    for stream, key in files:
        assert live[stream].descriptors[0]["data_keys"][key].get("external") == "STREAM:"
    assert files_of(store, offline_uid), "the offline child wrote no files of its own"

    # Both hold the right numbers, not merely the same ones.
    # (The offline child's values as read above, each key's every event.)
    primary, summary = offline_read["primary"], offline_read["summary"]
    raw_frames = store.read_stream(raw_uid, "primary", ["cam"])["cam"]
    assert raw_frames.dtype == np.uint16  # as the camera took them
    assert_same_array(primary["row_sums"], raw_frames.sum(axis=2), "row_sums")
    frames = np.asarray(raw_frames, dtype=np.float32)
    darks = np.asarray(store.read_stream(raw_uid, "dark", ["cam"])["cam"], dtype=np.float32)
    assert frames.shape == (5, 32, 32) and darks.shape == (2, 32, 32)
    assert not np.array_equal(darks[0], darks[1])
    corrected = frames - darks[[0, 0, 0, 1, 1]]
    np.testing.assert_array_equal(primary["corrected"], corrected)
    np.testing.assert_array_equal(primary["total"], frames.sum(axis=(1, 2), dtype=np.float64))
    np.testing.assert_array_equal(summary["summed"][0], corrected.sum(axis=0))
    assert primary["parent_seq_num"].tolist() == [1, 2, 3, 4, 5]


# --- 2. a batch with one corrupt run -------------------------------------------------------


# Runs in the corrupt-run batch: three reduced live first, the rest only saved raw.
RUNS = 5


def test_a_corrupt_run_fails_alone_and_nothing_saved_before_is_lost(
    RE, store, cam, recorder, make_callback
):
    reducers = [normalise_and_sum]
    corrupt_at = 2
    # Reduce three runs live first, the one that will be corrupted among them.
    live_token = make_callback(reducers).subscribe(RE)
    raw_uids = []
    for n in range(RUNS):
        if n == 3:
            RE.unsubscribe(live_token)
        # The corrupt run is longer than a replay block, and its last frame goes missing:
        # derived files of its first events are written before the failure.
        raw_uids += RE(count([cam], num=24 if n == corrupt_at else 3))
    corrupt_uid = raw_uids[corrupt_at]
    earlier = {uid: store.children(uid) for uid in raw_uids}
    reduced_before = {uid: kids[0] for uid, kids in earlier.items() if kids}
    assert set(reduced_before) == set(raw_uids[:3])
    assert all(len(kids) <= 1 for kids in earlier.values())
    saved_before = {
        uid: store.read_stream(child, keys=["total", "normalised"])
        for uid, child in reduced_before.items()
    }
    runs_before = len(store)
    entries_before = asset_entries(store)

    missing = recorder.frame_files(corrupt_uid)[("primary", 24)]
    os.remove(missing)

    report = reprocess(store, raw_uids, reducers, store, force=True, progress=False)

    assert list(report.failed) == [corrupt_uid]
    assert os.path.basename(missing) in report.failed[corrupt_uid]
    assert report.skipped == {}
    assert set(report.saved) == set(raw_uids) - {corrupt_uid}
    assert len(set(report.saved.values())) == RUNS - 1
    assert corrupt_uid in str(report)

    # The good runs got a new, complete child each.
    later = {uid: store.children(uid) for uid in raw_uids}
    for uid, child_uid in report.saved.items():
        assert later[uid] == [child_uid, *earlier[uid]]
        child = store[child_uid]
        assert child.stop["exit_status"] == "success"
        assert child.stop["num_events"] == {"primary": 3}
        assert len(child["primary"]["normalised"].read()) == 3
    # Nothing was saved for the corrupt run, and nothing of its attempt was left on disk.
    assert later[corrupt_uid] == earlier[corrupt_uid]
    assert len(store) == runs_before + RUNS - 1
    assert asset_entries(store) == entries_before | set(report.saved.values())
    # What was saved before the batch is still there and reads back the same.
    for uid, child_uid in reduced_before.items():
        assert child_uid in later[uid]
        now = store.read_stream(child_uid, keys=["total", "normalised"])
        for key in ("total", "normalised"):
            assert_same_array(now[key], saved_before[uid][key], key)
    assert files_of(store, reduced_before[corrupt_uid])


# --- 3. skipped when already reduced by the same code; new code, new child ----------------


def test_same_code_is_skipped_and_other_code_gives_a_new_child_beside_the_old(
    RE, store, cam, make_callback
):
    doubled = functools.partial(scaled_total, factor=2.0)
    make_callback([doubled]).subscribe(RE)
    (raw_uid,) = RE(count([cam], num=3))
    [live_uid] = store.children(raw_uid)

    same = functools.partial(scaled_total, factor=2.0)  # an equal partial, not the same object
    again = reprocess(store, raw_uid, [same], store, progress=False)
    assert again.skipped == {raw_uid: live_uid}
    assert again.saved == {} and again.failed == {}
    assert store.children(raw_uid) == [live_uid]

    forced = reprocess(store, raw_uid, [doubled], store, force=True, progress=False)
    assert forced.skipped == {} and list(forced.saved) == [raw_uid]
    forced_uid = forced.saved[raw_uid]

    tripled = functools.partial(scaled_total, factor=3.0)
    new_params = reprocess(store, raw_uid, [tripled], store, progress=False)
    assert new_params.skipped == {} and list(new_params.saved) == [raw_uid]
    tripled_uid = new_params.saved[raw_uid]

    new_function = reprocess(store, raw_uid, [frame_peak], store, progress=False)
    assert new_function.skipped == {} and list(new_function.saved) == [raw_uid]
    peak_uid = new_function.saved[raw_uid]

    # With several children, the one made by the same code is the one named.
    assert reprocess(store, raw_uid, [tripled], store, progress=False).skipped == {
        raw_uid: tripled_uid
    }

    children = store.children(raw_uid)
    assert children == [peak_uid, tripled_uid, forced_uid, live_uid]
    times = [store[c].start["time"] for c in children]
    assert times == sorted(times, reverse=True) and len(set(times)) == 4
    codes = {c: store[c].start["provenance"]["code"] for c in children}
    expected_params = {live_uid: 2.0, forced_uid: 2.0, tripled_uid: 3.0}
    for uid, factor in expected_params.items():
        [code] = codes[uid]
        assert code["name"] == "_offline_reducers:scaled_total"
        assert code["params"] == {"factor": factor}
    [peak_code] = codes[peak_uid]
    assert peak_code["name"] == "_offline_reducers:frame_peak"
    assert "params" not in peak_code
    assert codes[live_uid][0]["version"] == peak_code["version"]  # same file, same version

    # The data follow the code, and the oldest child is untouched.
    live_total = store[live_uid]["primary"]["total"].read()
    frames = np.asarray(store[raw_uid]["primary"]["cam"].read())
    np.testing.assert_array_equal(live_total, 2.0 * frames.sum(axis=(1, 2), dtype=np.float64))
    assert_same_array(store[forced_uid]["primary"]["total"].read(), live_total, "forced total")
    np.testing.assert_array_equal(store[tripled_uid]["primary"]["total"].read(), 1.5 * live_total)
    assert store[peak_uid]["primary"]["peak"].read().tolist() == frames.max(axis=(1, 2)).tolist()
    assert "peak" not in store[live_uid]["primary"]


# --- 4. progress bars -----------------------------------------------------------------------


def test_progress_bars_go_to_stderr_only_when_asked(RE, store, cam, capfd):
    raw_uids = [RE(count([cam], num=3))[0] for _ in range(2)]
    capfd.readouterr()

    report = reprocess(store, raw_uids, [scaled_total], store, progress=True)
    captured = capfd.readouterr()
    assert set(report.saved) == set(raw_uids)
    assert "runs" in captured.err and "2/2" in captured.err
    for uid in raw_uids:  # and one bar over the 3 events of each run
        assert f"{uid[:8]}:   0%" in captured.err and "0/3" in captured.err
    assert captured.out == ""

    report = reprocess(store, raw_uids, [scaled_total], store, force=True, progress=False)
    captured = capfd.readouterr()
    assert set(report.saved) == set(raw_uids)
    assert captured.err == ""
    assert captured.out == ""


# --- 5. code identity: an edit, committed or not, is other code ------------------------------

REDUCER_V1 = '''
import numpy as np


def total(data):
    return {"total": float(np.asarray(data["cam"]).sum(dtype=np.float64))}


def from_total(data):
    return {"half": data["total"] / 2}


def broken(data):
    raise ValueError("broken on purpose")
'''
REDUCER_V2 = REDUCER_V1.replace('{"total": float(', '{"total": 2 * float(')


def git(folder: pathlib.Path, *args: str) -> str:
    import subprocess

    result = subprocess.run(
        ["git", "-C", str(folder), "-c", "user.name=Test", "-c", "user.email=test@example.org",
         *args],
        capture_output=True, text=True, check=True,
    )
    return result.stdout.strip()


@pytest.fixture
def reducer_checkout(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    """A reducer module committed in a git checkout of its own, importable from sys.path."""
    import importlib
    import uuid

    repo = tmp_path / "checkout"
    repo.mkdir()
    git(repo, "init", "-q")
    name = f"bas_git_reducers_{uuid.uuid4().hex[:12]}"
    path = repo / f"{name}.py"
    path.write_text(REDUCER_V1)
    git(repo, "add", path.name)
    git(repo, "commit", "-q", "-m", "v1")
    monkeypatch.syspath_prepend(str(repo))
    module = importlib.import_module(name)
    yield repo, path, module
    sys.modules.pop(name, None)


def code_of(store: AnalysisStore, child_uid: str) -> dict[str, Any]:
    [code] = store[child_uid].start["provenance"]["code"]
    return code


def test_an_edit_without_and_with_a_commit_reduces_again(RE, store, cam, reducer_checkout):
    import hashlib
    import importlib

    repo, path, module = reducer_checkout
    (raw_uid,) = RE(count([cam], num=3))
    frames = np.asarray(store[raw_uid]["primary"]["cam"].read(), dtype=np.float64)
    sums = frames.sum(axis=(1, 2))
    first_commit = git(repo, "rev-parse", "HEAD")

    first = reprocess(store, raw_uid, [module.total], store, progress=False).saved[raw_uid]
    assert (code_of(store, first)["commit"], code_of(store, first)["dirty"]) == (
        first_commit, False
    )
    assert reprocess(store, raw_uid, [module.total], store, progress=False).skipped == {
        raw_uid: first
    }

    # Edited, not committed (and reloaded, as %autoreload does): other code.
    path.write_text(REDUCER_V2)
    importlib.reload(module)
    edited = reprocess(store, raw_uid, [module.total], store, progress=False)
    assert edited.skipped == {}
    dirty_uid = edited.saved[raw_uid]
    dirty_code = code_of(store, dirty_uid)
    assert (dirty_code["commit"], dirty_code["dirty"]) == (first_commit, True)
    assert dirty_code["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert dirty_code["sha256"] != code_of(store, first)["sha256"]
    np.testing.assert_array_equal(store[dirty_uid]["primary"]["total"].read(), 2 * sums)

    # The same edit, now committed: the same file, but a commit of its own.
    git(repo, "commit", "-q", "-am", "v2")
    second_commit = git(repo, "rev-parse", "HEAD")
    committed = reprocess(store, raw_uid, [module.total], store, progress=False)
    assert committed.skipped == {}
    committed_uid = committed.saved[raw_uid]
    assert (code_of(store, committed_uid)["commit"], code_of(store, committed_uid)["dirty"]) == (
        second_commit, False
    )
    assert code_of(store, committed_uid)["sha256"] == dirty_code["sha256"]
    assert reprocess(store, raw_uid, [module.total], store, progress=False).skipped == {
        raw_uid: committed_uid
    }
    assert store.children(raw_uid) == [committed_uid, dirty_uid, first]


# --- 6. what never counts, and what is refused ------------------------------------------------


def test_a_hand_made_child_claiming_the_same_code_does_not_block(RE, store, cam, reducer_checkout):
    import uuid

    from bluesky_analysis_store._reduction import ReductionPlan

    _, _, module = reducer_checkout
    (raw_uid,) = RE(count([cam], num=2))
    plan = ReductionPlan.for_store([module.total], store)
    start = {"uid": str(uuid.uuid4()), "time": 1.0, "parent_uids": [raw_uid],
             "provenance": {"parents": [{"uid": raw_uid}], "code": plan.code}}
    store("start", start)
    store("stop", {"uid": str(uuid.uuid4()), "time": 2.0, "run_start": start["uid"],
                   "exit_status": "success", "num_events": {}})
    store.flush()

    report = reprocess(store, raw_uid, [module.total], store, progress=False)
    assert report.skipped == {} and list(report.saved) == [raw_uid]
    assert store.children(raw_uid) == [report.saved[raw_uid]]


def test_an_all_failed_child_is_reported_as_failed(RE, store, cam, reducer_checkout, capsys):
    from bluesky_analysis_store.cli import main

    _, _, module = reducer_checkout
    (raw_uid,) = RE(count([cam], num=3))

    report = reprocess(store, raw_uid, [module.broken], store, progress=False)
    assert report.saved == {}
    child_uid = report.failed_children[raw_uid]
    assert "every event failed (3; first: ValueError: broken on purpose)" in report.failed[raw_uid]
    assert "1 failed" in str(report)
    # Saved all the same: its stop says what failed, and it never counts as reduced.
    assert store[child_uid].stop["reduction"]["events_failed"] == 3
    [child] = store.children(raw_uid)
    assert child == child_uid and child.all_failed and not child.succeeded

    assert report.reductions[raw_uid]["events_failed"] == 3
    assert [f["seq_num"] for f in report.reductions[raw_uid]["failures"]] == [1, 2, 3]

    capsys.readouterr()
    status = main(["--store", str(store.location), "reprocess", raw_uid,
                   "--reducer", f"{module.__name__}:broken"])
    captured = capsys.readouterr()
    assert status == 1
    assert f"FAILED {raw_uid}: every event failed (3 of 3)" in captured.out
    # One summary line for the three failures, not a traceback per event.
    assert (
        "    failed at stream primary, seq_num 1-3 (3 events) while broken.event: "
        "ValueError: broken on purpose\n"
    ) in captured.out
    assert "Traceback" not in captured.err and "broken on purpose" not in captured.err
    assert len(store.children(raw_uid)) == 2  # tried again: the failed one did not count


def test_a_derived_run_is_refused_as_raw_unless_asked(RE, store, cam, reducer_checkout, capsys):
    from bluesky_analysis_store.cli import main

    _, _, module = reducer_checkout
    (raw_uid,) = RE(count([cam], num=2))
    child_uid = reprocess(store, raw_uid, [module.total], store, progress=False).saved[raw_uid]
    runs = len(store)

    refused = reprocess(store, child_uid, [module.from_total], store, progress=False)
    assert refused.saved == {} and "is a derived run" in refused.failed[child_uid]
    assert "derived=True" in refused.failed[child_uid]
    capsys.readouterr()
    status = main(["--store", str(store.location), "reprocess", child_uid,
                   "--reducer", f"{module.__name__}:from_total"])
    out = capsys.readouterr().out
    assert status == 1 and "is a derived run" in out
    assert "--derived reduces it anyway" in out and "derived=True" not in out  # what to type
    assert len(store) == runs  # nothing was saved

    allowed = reprocess(store, child_uid, [module.from_total], store, progress=False,
                        derived=True)
    grandchild = allowed.saved[child_uid]
    assert store[grandchild].start["parent_uids"] == [child_uid]
    assert store.children(child_uid) == [grandchild]
    np.testing.assert_array_equal(
        store[grandchild]["primary"]["half"].read(),
        np.asarray(store[child_uid]["primary"]["total"].read()) / 2,
    )
    capsys.readouterr()
    status = main(["--store", str(store.location), "reprocess", child_uid, "--derived",
                   "--force", "--reducer", f"{module.__name__}:from_total"])
    assert status == 0 and len(store.children(child_uid)) == 2

    # Reduced as if it were raw data, with a reducer that fails on each of its events: one
    # summary of the failures and exit status 1, not a traceback per event and "1 saved".
    capsys.readouterr()
    status = main(["--store", str(store.location), "reprocess", child_uid, "--derived",
                   "--reducer", f"{module.__name__}:broken"])
    captured = capsys.readouterr()
    assert status == 1 and captured.out.startswith("0 saved, 0 already reduced, 1 failed")
    assert "seq_num 1-2 (2 events) while broken.event: ValueError" in captured.out
    assert "Traceback" not in captured.err


def test_a_run_without_the_streams_asked_for_is_refused(RE, store, cam):
    (raw_uid,) = RE(count([cam], num=2))
    runs = set(store.client)

    report = reprocess(store, raw_uid, [scaled_total], store, streams=["no_such"], progress=False)

    assert report.saved == {} and report.failed_children == {}
    assert "has no stream 'no_such'; its streams are 'primary'" in report.failed[raw_uid]
    assert isinstance(report.errors[raw_uid], AnalysisStoreError)
    assert set(store.client) == runs  # no empty child that would look like a success
    # A Reducer class sees every stream it is given: the streams asked for are not its.
    dark = reprocess(
        store, raw_uid, [DarkSubtracted(key="cam")], store, streams=["no_such"], progress=False
    )
    assert list(dark.saved) == [raw_uid]
