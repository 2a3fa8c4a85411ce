"""Live scans through faults: the store's server stopped mid-scan (SIGTERM or SIGKILL) and
started again, or not before the session ends; the scan's process or its worker killed.
Afterwards every derived event is in the store exactly once, aligned with its raw event,
or the child run is closed as failed with the reason; no process is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from _faults import API_KEY, record_outcome
from _helpers import run_command
from _reducers_for_tests import SeqNumFrames, leaking
from bluesky.plans import count
from ophyd.sim import det

from bluesky_analysis_store import (
    DATA_ROOT_ENV,
    AnalysisStore,
    AnalysisStoreCallback,
    RunNotFoundError,
)
from bluesky_analysis_store._store import JOURNAL_ENV

pytestmark = pytest.mark.slow

POINTS = 20
DEADLINE = 180.0  # seconds a fault's aftermath may take at most here, not a measured time
SCRIPT = Path(__file__).with_name("_scan_in_subprocess.py")


def assert_every_event_once_and_aligned(
    store: AnalysisStore, child_uid: str, events: int, *, scenario: str, fault: str
) -> None:
    """``events`` derived events were computed: each is in the store once, in its row."""
    run = store[child_uid]
    primary = store.read_stream(child_uid, "primary", ["parent_seq_num", "y", "frame"])
    parent_seq = primary["parent_seq_num"]
    np.testing.assert_array_equal(parent_seq, np.arange(1, events + 1))
    np.testing.assert_array_equal(primary["y"], parent_seq.astype(float))
    frames = primary["frame"]
    assert frames.shape == (events, 16, 16)
    for i, n in enumerate(parent_seq):
        assert (frames[i] == n).all(), f"row {i}: the frame of raw event {frames[i, 0, 0]}"
    assert run.metadata["stop"]["num_events"] == {"primary": events}
    record_outcome(scenario, fault, computed=events, delivered=len(parent_seq))


def wait_until_gone(pid: int, deadline: float = DEADLINE) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a child of this process: reap it
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.2)
    return False


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "journal"
    monkeypatch.setenv(JOURNAL_ENV, str(folder))
    return folder


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_server_stopped_mid_scan_and_started_again(RE, server, journal, sig):  # noqa: N803
    store = AnalysisStore.from_uri(server.uri, API_KEY, asset_root=server.assets)
    callback = AnalysisStoreCallback([SeqNumFrames()], store, stop_timeout=60)
    RE.subscribe(callback)
    raw: list[str] = []

    def kill_at_the_fifth_event(name: str, doc: dict) -> None:
        if name == "start":
            raw.append(doc["uid"])
        if name == "event" and doc["seq_num"] == 5:
            threading.Thread(target=server.stop, args=(sig,)).start()

    RE.subscribe(kill_at_the_fifth_event)
    assert callback.flush(DEADLINE)  # the worker has opened the store
    try:
        RE(count([det], num=POINTS, delay=0.1))
        # The scan did not wait for the server: it is started again only now.
        server.start()
        assert callback.flush(DEADLINE)
        (child_uid,) = store.children(raw[0])
        assert_every_event_once_and_aligned(
            store, child_uid, POINTS, scenario="server stopped mid-scan, started again",
            fault=signal.Signals(sig).name,
        )  # fmt: skip
        assert not list(journal.glob("*.journal"))
    finally:
        callback.close(timeout=DEADLINE)
        if server.process is None:
            server.start()


LONG_OUTAGE_SECONDS = 125.0


@pytest.mark.waits
def test_server_down_for_minutes_mid_scan(RE, server, journal):  # noqa: N803
    """Over two minutes without the store, while the scan goes on: the delivery keeps
    retrying with backoff and catches up once the server is back, before the scan ends."""
    store = AnalysisStore.from_uri(server.uri, API_KEY, asset_root=server.assets)
    callback = AnalysisStoreCallback([SeqNumFrames()], store, stop_timeout=60)
    RE.subscribe(callback)
    raw: list[str] = []
    restarted = threading.Event()

    def outage() -> None:
        server.stop(signal.SIGKILL)
        time.sleep(LONG_OUTAGE_SECONDS)
        server.start()
        restarted.set()

    def kill_at_the_third_event(name: str, doc: dict) -> None:
        if name == "start":
            raw.append(doc["uid"])
        if name == "event" and doc["seq_num"] == 3:
            threading.Thread(target=outage).start()

    RE.subscribe(kill_at_the_third_event)
    assert callback.flush(DEADLINE)
    points = int(LONG_OUTAGE_SECONDS / 2) + 15
    try:
        RE(count([det], num=points, delay=2.0))
        assert restarted.wait(DEADLINE), "the server did not come back"
        assert callback.flush(DEADLINE)
        (child_uid,) = store.children(raw[0])
        assert_every_event_once_and_aligned(
            store, child_uid, points, scenario="server down for over two minutes mid-scan",
            fault="SIGKILL",
        )  # fmt: skip
        assert not list(journal.glob("*.journal"))
    finally:
        callback.close(timeout=DEADLINE)
        restarted.wait(DEADLINE)


def run_session(store: str, env: dict[str, str], points: int = POINTS, delay: float = 0.1):
    # A file, not a pipe: a pipe nobody reads would block the worker that inherits it.
    stderr = tempfile.TemporaryFile("w+")
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), store, API_KEY, str(points), str(delay)],
        stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        cwd=SCRIPT.parent,
    )  # fmt: skip


def read_until(process: subprocess.Popen, prefix: str) -> str:
    for line in process.stdout:
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    process.stderr.seek(0)
    raise AssertionError(f"the session ended before {prefix!r}: {process.stderr.read()}")


def test_server_down_until_after_the_session_then_recover(server, journal, monkeypatch):
    env = {**os.environ, DATA_ROOT_ENV: str(server.assets), JOURNAL_ENV: str(journal)}
    session = run_session(server.uri, env)
    try:
        read_until(session, "worker")
        raw_uid = read_until(session, "raw")
        read_until(session, "event")
        server.stop(signal.SIGKILL)
        read_until(session, "closed")
        assert session.wait(DEADLINE) == 0
    finally:
        session.kill()
        if server.process is None:
            server.start()
    store = AnalysisStore.from_uri(server.uri, API_KEY)
    assert [p.name for p in journal.glob("*.journal")], "nothing was journaled"
    monkeypatch.setenv(JOURNAL_ENV, str(journal))
    status, out, err = run_command("recover", "--store", server.uri, "--api-key", API_KEY)
    assert status == 0, out + err
    (child_uid,) = store.children(raw_uid)
    assert_every_event_once_and_aligned(
        store, child_uid, POINTS, scenario="server down until after the session, then recover",
        fault="SIGKILL",
    )  # fmt: skip
    assert not list(journal.glob("*.journal"))


def test_sigkill_of_the_scans_process_leaves_no_orphan_and_a_closed_child(tmp_path):
    folder = tmp_path / "store"
    store = AnalysisStore.open(folder)
    session = run_session(str(folder), dict(os.environ), points=200, delay=0.05)
    try:
        worker = int(read_until(session, "worker"))
        read_until(session, "raw")
        while int(read_until(session, "event")) < 20:
            pass
        session.kill()
        session.wait()
        assert wait_until_gone(worker), "the worker outlived the scan's process"
    finally:
        session.kill()
    # Every derived file is readable by another process.
    (path,) = Path(store.asset_root).rglob("*.h5")
    with h5py.File(path, "r", swmr=True) as file:
        frames_on_disk = file["data"].shape[0]
    report = store.recover()
    assert report.ok
    (child,) = [uid for uid in store.client if store[uid].start.get("parent_uids")]
    stop = store[child].metadata["stop"]
    assert stop is not None and stop["exit_status"] == "fail"
    assert stop["reason"].startswith("interrupted")
    events = stop["num_events"]["primary"]
    assert 0 < events <= frames_on_disk
    assert_every_event_once_and_aligned(
        store, child, events, scenario="scan's process killed mid-scan, then recover",
        fault="SIGKILL",
    )  # fmt: skip
    assert not store.recover().delivered  # idempotent: nothing left to do


def test_sigkill_of_the_worker_mid_scan_leaves_a_closed_child(RE, store):  # noqa: N803
    callback = AnalysisStoreCallback([SeqNumFrames()], store, stop_timeout=30)
    RE.subscribe(callback)
    raw: list[str] = []
    killed: list[int] = []

    def kill_the_worker(name: str, doc: dict) -> None:
        if name == "start":
            raw.append(doc["uid"])
        if name == "event" and doc["seq_num"] == 10 and callback.worker_pid:
            # The worker has the first events by now: wait until they are journaled.
            callback.flush(DEADLINE)
            killed.append(callback.worker_pid)
            os.kill(callback.worker_pid, signal.SIGKILL)

    RE.subscribe(kill_the_worker)
    try:
        RE(count([det], num=POINTS, delay=0.05))
        assert killed and wait_until_gone(killed[0])
        report = store.recover()
        assert report.ok
        (child_uid,) = store.children(raw[0])
        stop = store[child_uid].metadata["stop"]
        assert stop["exit_status"] == "fail" and stop["reason"].startswith("interrupted")
        assert_every_event_once_and_aligned(
            store, child_uid, stop["num_events"]["primary"],
            scenario="worker killed mid-scan, then recover", fault="SIGKILL",
        )  # fmt: skip
        assert stop["num_events"]["primary"] >= 10
    finally:
        callback.close(timeout=DEADLINE)


def test_a_leaking_reducer_is_stopped_by_the_memory_limit(RE, store):  # noqa: N803
    callback = AnalysisStoreCallback([leaking], store, memory_limit=900 * 2**20)
    assert callback.flush(DEADLINE)
    first_worker = callback.worker_pid
    raw: list[str] = []
    RE.subscribe(callback)
    RE.subscribe(lambda name, doc: raw.append(doc["uid"]) if name == "start" else None)
    try:
        RE(count([det], num=40, delay=0.1))
        assert wait_until_gone(first_worker), "the worker went on growing"
        # Its successor closes the child run from the journal when it starts.
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            # A run delivered again is deleted then written whole: it may be gone a moment.
            with contextlib.suppress(RunNotFoundError):
                children = store.children(raw[0])
                if children and store[children[0]].metadata.get("stop"):
                    break
            time.sleep(0.5)
        (child_uid,) = store.children(raw[0])
        stop = store[child_uid].metadata["stop"]
        assert stop["exit_status"] == "fail" and "memory limit" in stop["reason"]
        held = store[child_uid]["primary"]["held"].read()
        np.testing.assert_array_equal(held, np.arange(1, len(held) + 1, dtype=float))
        assert stop["num_events"] == {"primary": len(held)}
        record_outcome(
            "leaking reducer stopped by the memory limit, child closed as failed",
            "memory limit", computed=len(held), delivered=len(held),
        )  # fmt: skip
    finally:
        callback.close(timeout=DEADLINE)
