"""The worker process behind ``background=True``: the pipe it is fed through, reducers
from ``__main__``, a worker that dies or is sent Ctrl-C, and stores it cannot reopen."""

from __future__ import annotations

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
from _reducers_for_tests import scaled
from bluesky.plans import count
from ophyd.sim import det

from bluesky_analysis_store import AnalysisStore, AnalysisStoreCallback, AnalysisStoreError
from bluesky_analysis_store._worker_process import MessagePipe, decode, encode

HANG = 60.0  # bound on waits that end at once when things work


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
    )
    assert result.returncode == 0, result.stderr
    raw_uid, worker_pid, value = result.stdout.split()
    assert marks.read_text() == "script ran\n"
    assert worker_pid.isdigit()

    store = AnalysisStore.open(tmp_path / "store")
    (child_uid,) = store.children(raw_uid)
    child = store[child_uid]
    np.testing.assert_allclose(child["primary"]["offset"].read(), [float(value) + 3.0] * 3)
    assert child["primary"]["profile"].read().shape == (3, 5)
    (code,) = child.start["provenance"]["code"]
    assert code["name"] == "__main__:offset_and_profile"


# --- a worker that goes away ----------------------------------------------------------------


def test_a_killed_worker_does_not_break_the_scan_and_the_next_run_gets_a_new_one(
    RE, store, make_callback, caplog
):
    callback = make_callback([scaled])
    RE.subscribe(callback)
    RE(count([det], num=1))  # the worker is up
    first_pid = callback.worker_pid

    @bpp.run_decorator()
    def killed_halfway():
        for n in range(4):
            if n == 2:
                os.kill(first_pid, signal.SIGKILL)
            yield from bps.trigger_and_read([det])

    with caplog.at_level(logging.WARNING, logger="bluesky_analysis_store"):
        (lost_uid,) = RE(killed_halfway())  # completes, no exception
        (next_uid,) = RE(count([det], num=3))

    assert callback.worker_pid != first_pid
    messages = [r.getMessage() for r in caplog.records]
    assert any("worker process ended" in m for m in messages), messages
    assert any("starting a new one" in m for m in messages), messages
    for child_uid in store.children(lost_uid):  # begun, perhaps, but never finished
        assert store[child_uid].metadata.get("stop") is None
    (child_uid,) = store.children(next_uid)
    assert store[child_uid].stop["reduction"]["events_reduced"] == 3


def test_ctrl_c_does_not_reach_the_worker(RE, store, make_callback):
    """Ctrl-C at the prompt pauses a scan; it must not end the reduction."""
    callback = make_callback([scaled])
    RE.subscribe(callback)
    RE(count([det], num=1))
    pid = callback.worker_pid
    os.kill(pid, signal.SIGINT)
    (raw_uid,) = RE(count([det], num=2))
    assert callback.worker_pid == pid
    (child_uid,) = store.children(raw_uid)
    assert store[child_uid].stop["reduction"]["events_reduced"] == 2


def test_closing_ends_the_worker_process(store):
    callback = AnalysisStoreCallback([scaled], store)
    pid = callback.worker_pid
    callback.close(timeout=HANG)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped: it ended


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
