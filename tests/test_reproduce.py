"""``reproduce``: re-running a child run's recorded code on its recorded inputs, and comparing.

Raw runs come from a real RunEngine into a real embedded store (frames as NPY files the store
may read); child runs are made live by :class:`AnalysisStoreCallback`. Changing a raw frame,
the code (in a git checkout of its own) or an ingested input file must be found and named.
"""

from __future__ import annotations

import importlib
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from bluesky import RunEngine  # noqa: E402
from bluesky.plans import count  # noqa: E402

from _live import dark_then_positions  # noqa: E402
from _offline_reducers import ingest_table  # noqa: E402
from bluesky_analysis_store import AnalysisStore, ProvenanceError, reproduce  # noqa: E402
from bluesky_analysis_store._provenance import _git_state  # noqa: E402
from bluesky_analysis_store.example_reducers import (  # noqa: E402
    DarkSubtracted,
    normalise_and_sum,
)
from bluesky_analysis_store.sim import spot_image  # noqa: E402

# The RunEngine, the devices and the module's store are fixtures of conftest.py.
pytestmark = pytest.mark.usefixtures("runs_saved_in_store")


REDUCERS = [normalise_and_sum, DarkSubtracted(key="cam")]
POSITIONS = [-2.0, -1.0, 1.0, 2.0]
DARKS = {0: -4.0, 2: 4.0}


def live_child(
    RE: RunEngine, store: AnalysisStore, cam: Any, motor: Any, make_callback: Any  # noqa: N803
) -> tuple[str, str]:
    """A raw run with a ``dark`` and a ``primary`` stream, reduced live: (raw uid, child uid)."""
    make_callback(REDUCERS).subscribe(RE)
    (raw_uid,) = RE(dark_then_positions(cam, motor, POSITIONS, DARKS))
    (child_uid,) = store.children(raw_uid)
    return raw_uid, child_uid


# --- 5. a live child run is reproduced; a changed raw file is found -----------------------


def test_a_live_child_run_is_reproduced_event_for_event(RE, store, cam, motor, make_callback):
    _, child_uid = live_child(RE, store, cam, motor, make_callback)
    child = store[child_uid]
    assert child.stop["num_events"] == {"primary": 4, "summary": 1}

    report = reproduce(store, child_uid, progress=False)

    assert report.child_uid == child_uid
    assert report.identical is True
    assert report.difference is None
    assert report.code_changes == [] and report.file_changes == []
    assert report.events_compared == 5 == sum(len(child[s]["seq_num"]) for s in child)
    assert "reproduced: 5 events identical" in str(report)


def test_a_changed_raw_data_file_is_named_by_stream_key_and_seq_num(
    RE, store, cam, motor, recorder, make_callback
):
    raw_uid, child_uid = live_child(RE, store, cam, motor, make_callback)
    path = recorder.frame_files(raw_uid)[("primary", 3)]
    original = np.load(path)
    replacement = spot_image(-4.5, original.shape)  # the spot somewhere else entirely
    assert replacement.dtype == original.dtype and not np.array_equal(replacement, original)
    np.save(path, replacement)

    report = reproduce(store, child_uid, progress=False)

    assert report.identical is False
    assert report.difference is not None
    # The first key of the first event that differs: normalise_and_sum's frame.
    assert (report.difference.stream, report.difference.key, report.difference.seq_num) == (
        "primary",
        "normalised",
        3,
    )
    assert "differ" in report.difference.detail
    assert "seq_num 3" in str(report) and "'normalised'" in str(report)
    assert report.file_changes == [] and report.code_changes == []

    # Putting the frame back makes the child reproducible again.
    np.save(path, original)
    assert reproduce(store, child_uid, progress=False).identical is True


# --- 5. changed code: refused, or run and compared when allowed ---------------------------

GIT_MODULE = "offline_reducer_in_git"
FIRST_VERSION = textwrap.dedent(
    """
    import numpy as np


    def frame_total(data):
        return {"total": float(np.asarray(data["cam"]).sum(dtype=np.float64))}
    """
)
SECOND_VERSION = textwrap.dedent(
    """
    import numpy as np


    def frame_total(data):
        # Counts are now reported in kilo-counts.
        return {"total": float(np.asarray(data["cam"]).sum(dtype=np.float64)) / 1000.0}
    """
)


def git(folder: pathlib.Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(folder), "-c", "user.name=Test", "-c", "user.email=test@example.org",
         "-c", "commit.gpgsign=false", *args],
        capture_output=True, text=True, check=True,
    )
    return result.stdout.strip()


@pytest.fixture
def code_checkout(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A git checkout holding one committed reducer module, importable for this test only."""
    folder = tmp_path / "checkout"
    folder.mkdir()
    git(folder, "init", "-q")
    (folder / f"{GIT_MODULE}.py").write_text(FIRST_VERSION)
    git(folder, "add", f"{GIT_MODULE}.py")
    git(folder, "commit", "-q", "-m", "first version")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    _git_state.cache_clear()
    yield folder
    sys.modules.pop(GIT_MODULE, None)
    _git_state.cache_clear()


def test_changed_code_is_refused_and_when_allowed_the_difference_is_reported(
    RE, store, cam, code_checkout, make_callback
):
    first_commit = git(code_checkout, "rev-parse", "HEAD")
    module = importlib.import_module(GIT_MODULE)
    make_callback([module.frame_total]).subscribe(RE)
    (raw_uid,) = RE(count([cam], num=3))
    (child_uid,) = store.children(raw_uid)
    [code] = store[child_uid].start["provenance"]["code"]
    assert code["name"] == f"{GIT_MODULE}:frame_total"
    assert (code["commit"], code["dirty"], code["version"]) == (first_commit, False, first_commit)
    assert reproduce(store, child_uid, progress=False).identical is True

    (code_checkout / f"{GIT_MODULE}.py").write_text(SECOND_VERSION)
    git(code_checkout, "commit", "-q", "-am", "report kilo-counts")
    second_commit = git(code_checkout, "rev-parse", "HEAD")
    assert second_commit != first_commit
    _git_state.cache_clear()
    importlib.reload(module)

    with pytest.raises(ProvenanceError) as refused:
        reproduce(store, child_uid, progress=False)
    message = str(refused.value)
    assert f"{GIT_MODULE}:frame_total" in message
    assert first_commit in message and second_commit in message
    assert message.index(first_commit) < message.index(second_commit)  # recorded -> current

    report = reproduce(store, child_uid, allow_changed_code=True, progress=False)
    assert report.identical is False
    assert len(report.code_changes) == 1
    assert first_commit in report.code_changes[0] and second_commit in report.code_changes[0]
    assert report.difference is not None
    assert (report.difference.stream, report.difference.key, report.difference.seq_num) == (
        "primary",
        "total",
        1,
    )
    saved_total = float(store[child_uid]["primary"]["total"].read()[0])
    assert repr(saved_total) in report.difference.detail
    assert repr(saved_total / 1000.0) in report.difference.detail


# --- 6. an ingested run: its input files are checked --------------------------------------


def test_an_ingested_run_is_checked_against_its_input_file(store, tmp_path):
    path = tmp_path / "table.txt"
    path.write_text("1.5\n2.5\n4.0\n")
    uid = store.save(
        ingest_table(str(path)), {"purpose": "ingested"}, files=[path], code=ingest_table
    )
    [record] = store[uid].start["provenance"]["files"]
    assert record["path"] == str(path)

    unchanged = reproduce(store, uid, progress=False)
    assert unchanged.identical is True
    assert unchanged.file_changes == [] and unchanged.code_changes == []

    path.write_text("1.5\n2.5\n4.5\n")
    changed = reproduce(store, uid, progress=False)
    assert changed.identical is False
    assert len(changed.file_changes) == 1 and str(path) in changed.file_changes[0]
    assert str(path) in str(changed)

    path.unlink()
    missing = reproduce(store, uid, progress=False)
    assert missing.identical is False
    assert missing.file_changes == [f"{path} is missing"]
