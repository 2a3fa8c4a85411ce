"""A full disk under the catalog, in every mode: the scan ends normally, nothing already
saved is damaged, and delivery resumes from the journal (on another disk) once space
returns. The disk is a real tmpfs of a few MiB, filled with a real file."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _faults import record_outcome
from _reducers_for_tests import SeqNumFrames
from bluesky.plans import count
from ophyd.sim import det

from bluesky_analysis_store import AnalysisStore, AnalysisStoreCallback
from bluesky_analysis_store._store import JOURNAL_ENV

pytestmark = pytest.mark.slow

POINTS = 10
DEADLINE = 120.0  # seconds, at most, not a measured time
TMPFS_SIZE = "48m"
MODES = {True: "worker process", "thread": "worker thread", False: "foreground"}


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mount_point = tmp_path_factory.mktemp("small-disk")
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root; run the fault tests as root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount_point)],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"could not mount a tmpfs at {mount_point}: {result.stderr}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(folder: Path) -> Path:
    """Take every free byte of the file system under ``folder``."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as file:
        for block in (2**20, 4096, 1):
            try:
                while file.write(b"\0" * block):
                    pass
            except OSError:
                pass
    return filler


@pytest.mark.parametrize("background", list(MODES), ids=["process", "thread", "fg"])
def test_catalog_disk_full_during_a_scan_then_space_returns(
    RE, small_disk, tmp_path, monkeypatch, background  # noqa: N803
):
    monkeypatch.setenv(JOURNAL_ENV, str(tmp_path / "journal"))
    folder = small_disk / f"store-{background}"
    store = AnalysisStore.open(folder, readable=[tmp_path])
    earlier = store.save(
        [{"primary": {"x": 1.0}}], {"purpose": "saved before"}, parents=[{"uid": "raw", "time": 0.0}], code=fill,
        strict=False,
    )  # fmt: skip
    # The derived files go to another disk: this is about the catalog's.
    callback = AnalysisStoreCallback(
        [SeqNumFrames()], store, background=background, root=str(tmp_path / "assets"),
        stop_timeout=30,
    )  # fmt: skip
    assert callback.flush(DEADLINE)
    RE.subscribe(callback)
    raw: list[str] = []
    RE.subscribe(lambda name, doc: raw.append(doc["uid"]) if name == "start" else None)
    filler = fill(small_disk)
    try:
        RE(count([det], num=POINTS))
        assert not callback.flush(10), "the store took derived data on a full disk"
        assert list((tmp_path / "journal").glob("*.journal"))
    finally:
        filler.unlink()
    assert callback.flush(DEADLINE)
    callback.close(timeout=DEADLINE)
    reader = AnalysisStore.open(folder)
    (child_uid,) = reader.children(raw[0])
    primary = reader.read_stream(child_uid, "primary", ["parent_seq_num", "y"])
    np.testing.assert_array_equal(primary["parent_seq_num"], np.arange(1, POINTS + 1))
    np.testing.assert_array_equal(primary["y"], np.arange(1, POINTS + 1, dtype=float))
    assert reader[child_uid].metadata["stop"]["num_events"] == {"primary": POINTS}
    record_outcome(
        f"catalog disk full during the scan, then space returns ({MODES[background]})",
        "tmpfs filled", computed=POINTS, delivered=len(primary["parent_seq_num"]),
    )  # fmt: skip
    assert reader[earlier]["primary"]["x"].read().tolist() == [1.0]
    assert not list((tmp_path / "journal").glob("*.journal"))


@pytest.mark.parametrize("background", list(MODES), ids=["process", "thread", "fg"])
def test_asset_disk_full_during_a_scan_then_space_returns(
    RE, small_disk, tmp_path, monkeypatch, background  # noqa: N803
):
    """Frames that do not fit fail their events, recorded, without a crash; the events
    after space returns are saved, each in the row of its raw event."""
    monkeypatch.setenv(JOURNAL_ENV, str(tmp_path / "journal"))
    store = AnalysisStore.open(tmp_path / "store", readable=[small_disk])
    assets = small_disk / f"assets-{background}"
    callback = AnalysisStoreCallback(
        [SeqNumFrames()], store, background=background, root=str(assets), stop_timeout=30
    )
    assert callback.flush(DEADLINE)
    callback.subscribe(RE)
    raw: list[str] = []
    RE.subscribe(lambda name, doc: raw.append(doc["uid"]) if name == "start" else None)

    def free_space_after_the_fourth_event(name: str, doc: dict) -> None:
        if name == "event" and doc["seq_num"] == 4:
            assert callback.flush(DEADLINE)  # events 1-4 met the full disk
            filler.unlink()

    RE.subscribe(free_space_after_the_fourth_event)
    filler = fill(small_disk)
    try:
        RE(count([det], num=POINTS))
    finally:
        filler.unlink(missing_ok=True)
    assert callback.flush(DEADLINE)
    callback.close(timeout=DEADLINE)
    (child_uid,) = store.children(raw[0])
    child = store[child_uid]
    reduction = child.metadata["stop"]["reduction"]
    assert reduction["events_failed"] >= 4
    assert all("DiskFullError" in f["error"] for f in reduction["failures"])
    primary = store.read_stream(child_uid, "primary", ["parent_seq_num", "y", "frame"])
    saved = primary["parent_seq_num"]
    assert len(saved) == POINTS - reduction["events_failed"] and len(saved) > 0
    np.testing.assert_array_equal(primary["y"], saved.astype(float))
    record_outcome(
        f"asset disk full for the first events, then space returns ({MODES[background]}; "
        "events that met the full disk are recorded as failed)",
        "tmpfs filled", computed=reduction["events_reduced"], delivered=len(saved),
    )  # fmt: skip
    frames = primary["frame"]
    for row, n in enumerate(saved):
        assert (frames[row] == n).all(), f"row {row} holds the frame of event {frames[row, 0, 0]}"


@pytest.fixture(scope="module")
def read_only_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder mounted read-only (a bind mount of an empty one)."""
    source = tmp_path_factory.mktemp("read-only-source")
    target = tmp_path_factory.mktemp("read-only")
    for command in (
        ["mount", "--bind", str(source), str(target)],
        ["mount", "-o", "remount,bind,ro", str(target)],
    ):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed (needs root): {result.stderr}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.mark.parametrize("background", list(MODES), ids=["process", "thread", "fg"])
def test_a_read_only_asset_folder_fails_every_event_and_the_scan_goes_on(
    RE, read_only_folder, tmp_path, monkeypatch, background  # noqa: N803
):
    monkeypatch.setenv(JOURNAL_ENV, str(tmp_path / "journal"))
    store = AnalysisStore.open(tmp_path / "store", readable=[read_only_folder])
    callback = AnalysisStoreCallback(
        [SeqNumFrames()], store, background=background, root=str(read_only_folder),
        stop_timeout=30,
    )  # fmt: skip
    callback.subscribe(RE)
    raw: list[str] = []
    RE.subscribe(lambda name, doc: raw.append(doc["uid"]) if name == "start" else None)
    RE(count([det], num=POINTS))
    assert callback.flush(DEADLINE)
    callback.close(timeout=DEADLINE)
    (child_uid,) = store.children(raw[0])
    stop = store[child_uid].metadata["stop"]
    assert stop["reduction"]["events_failed"] == POINTS
    assert stop["reduction"]["events_reduced"] == 0
    assert all("Read-only" in f["error"] or "EROFS" in f["error"] or "read-only" in f["error"]
               for f in stop["reduction"]["failures"]), stop["reduction"]["failures"][0]["error"]
    assert not list(read_only_folder.iterdir())
