"""The worker process behind ``background=True``: the pipe it is fed through, reducers
from ``__main__``, a worker that dies, cannot start or is sent Ctrl-C, a callback that is
dropped or outlived by its interpreter, and stores it cannot reopen."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
import pytest
from _helpers import users_environment
from _live import DocumentRecorder, children_of, eventually
from _reducers_for_tests import scaled
from bluesky.plans import count
from ophyd.sim import det

from bluesky_analysis_store import (
    Abandoned,
    AnalysisStore,
    AnalysisStoreCallback,
    AnalysisStoreError,
)
from bluesky_analysis_store._recovery import INTERRUPTED_REASON
from bluesky_analysis_store._worker_process import MessagePipe, decode, encode

HANG = 60.0  # bound on waits that end at once when things work


# Worker processes open the store again: served by its local server, they need a fraction of
# a second for it, not the seconds of tiled's server stack each (see conftest's ``store``).
STORE_SERVED = True


def running(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie not yet reaped by its parent counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- the pipe --------------------------------------------------------------------------------


def test_messages_carry_arrays_out_of_band_into_writable_buffers():
    read_fd, write_fd = os.pipe()
    inbox, outbox = MessagePipe(read_fd, "rb"), MessagePipe(write_fd, "wb")
    frame = np.arange(300_000, dtype=np.uint16).reshape(600, 500)  # more than a pipe holds
    items = [("doc", "event", {"data": {"img": frame, "x": 1.5}, "seq_num": 1}), ("flush", 7)]
    parts = encode(items)
    assert len(parts) == 2, "the frame travels as a part of its own, not inside the pickle"

    sender = threading.Thread(target=outbox.send, args=(parts,), daemon=True)
    sender.start()
    received = decode(inbox.recv())
    sender.join(HANG)

    assert received[1] == ("flush", 7)
    doc = received[0][2]
    np.testing.assert_array_equal(doc["data"]["img"], frame)
    assert doc["data"]["img"].flags.writeable
    assert doc["data"]["x"] == 1.5
    outbox.close()
    with pytest.raises(EOFError):
        inbox.recv()
    inbox.close()


# --- a script's own reducer ---------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    # No `if __name__ == "__main__"` guard: the worker must not run this file again.
    import sys
    import numpy as np
    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd.sim import det
    from bluesky_analysis_store import AnalysisStore, AnalysisStoreCallback

    store_folder, marks = sys.argv[1], sys.argv[2]
    with open(marks, "a") as f:
        f.write("script ran\\n")

    OFFSET = 3.0

    def offset_and_profile(data):
        return {"offset": data["det"] + OFFSET, "profile": np.full(5, data["det"], np.float32)}

    store = AnalysisStore.open(store_folder)
    RE = RunEngine({})
    callback = AnalysisStoreCallback([offset_and_profile], store)
    RE.subscribe(callback)
    (uid,) = RE(count([det], num=3))
    callback.close()
    print(uid, callback.worker_pid, det.read()["det"]["value"])
    """
)


def test_a_reducer_defined_in_a_script_runs_in_the_worker_without_rerunning_the_script(
    tmp_path: Path,
):
    script, marks = tmp_path / "reduce_scan.py", tmp_path / "marks.txt"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store"), str(marks)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=users_environment(),
    )
    assert result.returncode == 0, result.stderr
    raw_uid, worker_pid, value = result.stdout.split()
    assert marks.read_text() == "script ran\n"
    assert worker_pid.isdigit()

    store = AnalysisStore.open(tmp_path / "store")
    (child_uid,) = store.children(raw_uid)
    child = store[child_uid]
    primary = store.read_stream(child_uid, "primary", ["offset", "profile"])
    np.testing.assert_allclose(primary["offset"], [float(value) + 3.0] * 3)
    assert primary["profile"].shape == (3, 5)
    (code,) = child.start["provenance"]["code"]
    assert code["name"] == "__main__:offset_and_profile"


# --- a worker that goes away ----------------------------------------------------------------


def test_a_killed_worker_does_not_break_the_scan_and_the_next_run_gets_a_new_one(
    RE, store, make_callback, caplog
):
    callback = make_callback([scaled])
    callback.subscribe(RE)
    RE(count([det], num=1))  # the worker is up
    first_pid = callback.worker_pid

    @bpp.run_decorator()
    def killed_halfway():
        for n in range(4):
            if n == 2:
                os.kill(first_pid, signal.SIGKILL)
            yield from bps.trigger_and_read([det])

    with caplog.at_level(logging.WARNING, logger="bluesky_analysis_store"):
        (lost_uid,) = RE(killed_halfway())  # completes, no exception, no endless wait
        # The new worker starts in the background, a second after the old one died.
        eventually(lambda: callback.worker_pid != first_pid, "a new worker process")
        (next_uid,) = RE(count([det], num=3))

    messages = [r.getMessage() for r in caplog.records]
    [death] = [m for m in messages if "worker process ended" in m]  # said once
    assert "killed by SIGKILL" in death and "starting a new one in 1 s" in death, death
    assert any(lost_uid in m and "ended first" in m for m in messages), messages
    # Begun, perhaps, by the killed worker: then journaled, and closed as interrupted by the
    # new worker's delivery (its journal recovered first), before the next run's child.
    for child_uid in children_of(store, lost_uid):
        stop = store[child_uid].metadata.get("stop")
        assert stop is not None and stop["exit_status"] == "fail", stop
        assert stop["reason"] == INTERRUPTED_REASON and stop["reduction"]["interrupted"]
    (child_uid,) = store.children(next_uid)
    assert store[child_uid].stop["reduction"]["events_reduced"] == 3


def test_ctrl_c_does_not_reach_the_worker(RE, store, make_callback, caplog):
    """Ctrl-C at the prompt pauses a scan; it must not end the reduction. The first scan,
    made as soon as the callback is, waits for the new worker: the session says so, once."""
    caplog.set_level(logging.WARNING, logger="bluesky_analysis_store._callback")
    callback = make_callback([scaled])
    callback.subscribe(RE)
    RE(count([det], num=1))
    waits = [r for r in caplog.records if "waits for the analysis worker process" in r.message]
    assert len(waits) == 1
    pid = callback.worker_pid
    os.kill(pid, signal.SIGINT)
    (raw_uid,) = RE(count([det], num=2))
    assert callback.worker_pid == pid
    (child_uid,) = store.children(raw_uid)
    assert store[child_uid].stop["reduction"]["events_reduced"] == 2
    assert [r for r in caplog.records if "waits for the analysis worker" in r.message] == waits


def test_closing_ends_the_worker_process(store):
    callback = AnalysisStoreCallback([scaled], store)
    pid = callback.worker_pid
    assert callback.close(timeout=HANG) == Abandoned()  # nothing was left undone
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped: it ended


def test_a_dropped_callback_stops_its_worker(store):
    callback = AnalysisStoreCallback([scaled], store)
    pid = callback.worker_pid
    assert callback.flush(timeout=HANG)  # up, with its sender and listener threads
    del callback
    gc.collect()
    eventually(lambda: not running(pid), "the worker of a dropped callback ended")


def test_close_says_what_it_left_undone(RE, store, make_callback):
    raw = DocumentRecorder()
    RE.subscribe(raw)
    (open_uid,) = RE(count([det], num=2))
    callback = make_callback([scaled])
    for name, doc in raw.run(open_uid)[:-1]:  # all but its stop
        callback(name, doc)

    abandoned = callback.close(timeout=HANG)

    assert abandoned == Abandoned(documents=0, runs=(open_uid,))


# --- a worker that cannot start ---------------------------------------------------------------

VANISHING = "def plus_one(data):\n    return {'plus_one': float(data['det']) + 1.0}\n"


@pytest.mark.slow
def test_a_worker_that_cannot_start_is_replaced_with_growing_delays(
    RE, store, make_callback, tmp_path, monkeypatch, caplog
):
    """Its reducer's module is gone when the worker process imports it: the worker ends at
    once, again and again, until the module is back. (It is gone before the callback is
    made: a worker forked from the fork server imports it within milliseconds.)"""
    module = tmp_path / "vanishing_reducer.py"
    module.write_text(VANISHING)
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanishing_reducer

    module.unlink()
    callback = make_callback([vanishing_reducer.plus_one])
    deaths: list[str] = []

    def died(count: int) -> bool:
        deaths[:] = [r.getMessage() for r in caplog.records if "could not start" in r.getMessage()]
        return len(deaths) >= count

    with caplog.at_level(logging.INFO, logger="bluesky_analysis_store"):
        for attempt in (1, 2):
            pid = callback.worker_pid
            assert callback.flush(timeout=HANG) is False  # sends it the reducers: it ends
            eventually(lambda attempt=attempt: died(attempt), "the worker's end logged")
            if attempt == 2:  # back, whole, within the 2 s before the next worker starts
                staged = tmp_path / "vanishing_reducer.staged"
                staged.write_text(VANISHING)
                os.replace(staged, module)
            eventually(lambda pid=pid: callback.worker_pid != pid, "a new worker process")
        assert callback.flush(timeout=HANG) is True
        callback.subscribe(RE)
        (raw_uid,) = RE(count([det], num=2))

    assert len(deaths) == 2, deaths
    assert "exit status 1" in deaths[0] and "starting a new one in 1 s" in deaths[0]
    assert "starting a new one in 2 s" in deaths[1]
    (child_uid,) = store.children(raw_uid)
    np.testing.assert_allclose(
        store[child_uid]["primary"]["plus_one"].read(), [det.read()["det"]["value"] + 1.0] * 2
    )


# --- interpreter exit -------------------------------------------------------------------------

EXIT_SCRIPT = textwrap.dedent(
    """
    # Scans and exits without closing the callback, while its worker is seconds behind.
    import functools, logging, sys
    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd.sim import det
    from bluesky_analysis_store import AnalysisStore, AnalysisStoreCallback, _handover
    from _live import slow_scaled

    logging.basicConfig(level=logging.WARNING)
    store_folder, background, exit_timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    _handover.EXIT_TIMEOUT_SECONDS = exit_timeout
    background = {"foreground": False, "process": "process"}.get(background, background)
    store = AnalysisStore.open(store_folder)
    RE = RunEngine({})
    callback = AnalysisStoreCallback(
        [functools.partial(slow_scaled, seconds=0.05)], store, background=background
    )
    RE.subscribe(callback)  # no waiting: RE(...) returns with the reduction behind
    (uid,) = RE(count([det], num=60))
    print(uid, flush=True)
    """
)


def run_and_exit(store_folder: Path, background: str, exit_timeout: float):
    return subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(store_folder), background, str(exit_timeout)],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "PYTHONPATH": str(Path(__file__).parent),
            "BLUESKY_ANALYSIS_STORE_SERVED": "1",  # the module's store's server
        },
    )


@pytest.mark.parametrize(
    "background",
    ["thread", pytest.param("process", marks=pytest.mark.slow), "foreground"],
)
def test_at_exit_the_queued_work_is_finished(store, module_store_folder, background):
    result = run_and_exit(module_store_folder, background, exit_timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    raw_uid = result.stdout.split()[-1]
    (child_uid,) = store.children(raw_uid)
    child = store[child_uid]
    assert child.stop["num_events"] == {"primary": 60}
    assert len(child["primary"]["total"].read()) == 60
    assert "could not finish" not in result.stderr


@pytest.mark.slow
def test_at_exit_work_that_takes_too_long_is_left_behind_with_a_log_line(
    store, module_store_folder
):
    result = run_and_exit(module_store_folder, "thread", exit_timeout=0.5)
    assert result.returncode == 0, result.stderr[-3000:]
    raw_uid = result.stdout.split()[-1]
    [line] = [x for x in result.stderr.splitlines() if "could not finish" in x]
    assert "worker thread" in line and raw_uid in line and "documents not reduced" in line
    for child_uid in children_of(store, raw_uid):  # none, if not even its start was saved
        assert store[child_uid].metadata.get("stop") is None


# --- what cannot go to a worker process ---------------------------------------------------


def test_a_store_that_cannot_be_reopened_needs_the_thread_mode(store):
    wrapped = AnalysisStore(store.client, asset_root=store.asset_root)
    with pytest.raises(AnalysisStoreError, match="background='thread'"):
        AnalysisStoreCallback([scaled], wrapped)
    callback = AnalysisStoreCallback([scaled], wrapped, background="thread")
    assert callback.mode == "thread" and callback.worker_pid is None
    callback.close()


class Unpicklable:
    """A reducer holding something no process can be sent (an open lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self, data):
        return {"x": 1.0}


def test_a_reducer_that_cannot_be_sent_is_refused_when_the_callback_is_made(store):
    with pytest.raises(AnalysisStoreError, match="cannot be sent to a worker process"):
        AnalysisStoreCallback([Unpicklable()], store, strict=False)
