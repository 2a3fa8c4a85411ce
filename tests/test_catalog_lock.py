"""Several processes writing one embedded store: their requests take turns on write.lock.

Real processes throughout: a lock held in another process; a writer killed with SIGKILL
while it holds the lock inside an SQLite write transaction, and three writers with a reader
on one folder (both ``slow``). The child processes run this file as a script (see the bottom).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import event_model
import pytest

from bluesky_analysis_store import AnalysisStore
from bluesky_analysis_store._catalog_lock import CatalogLock

EVENTS = 2000


def scalar_run(events: int, label: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """A run of ``events`` scalar events of one stream, composed by event-model."""
    bundle = event_model.compose_run(metadata={"label": label})
    yield "start", bundle.start_doc
    descriptor = bundle.compose_descriptor(
        name="primary",
        data_keys={
            "det": {"source": "sim", "dtype": "number", "shape": []},
            "n": {"source": "sim", "dtype": "integer", "shape": []},
        },
    )
    yield "descriptor", descriptor.descriptor_doc
    for n in range(events):
        now = time.time()
        yield (
            "event",
            descriptor.compose_event(
                data={"det": n * 0.5, "n": n},
                timestamps={"det": now, "n": now},
                seq_num=n + 1,
            ),
        )
    yield "stop", bundle.compose_stop()


def child(*args: str, stdin: bool = False) -> subprocess.Popen[str]:
    """This file run as a script, with ``args``; stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(process: subprocess.Popen[str], expected: str) -> None:
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if line != expected:
        _, err = process.communicate()
        raise AssertionError(f"child said {line!r}, not {expected!r}; stderr:\n{err}")


def kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def assert_run_complete(store: AnalysisStore, uid: str, events: int) -> None:
    run = store[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    table = run["primary"].read()
    assert list(table["n"]) == list(range(events))
    assert list(table["det"]) == [n * 0.5 for n in range(events)]


# --- the lock itself ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exclusive", "shared"])
def test_a_lock_held_in_another_process_excludes_writers(tmp_path: Path, mode: str) -> None:
    holder = child("hold", str(tmp_path), mode)
    wait_for_line(holder, "held")
    lock = CatalogLock(tmp_path)
    try:
        assert not lock.acquire(exclusive=True, blocking=False)
        # Readers share: a reader waits only for a writer.
        assert lock.acquire(exclusive=False, blocking=False) is (mode == "shared")
    finally:
        if lock._depth:
            lock.release()
        kill(holder)
    # The kernel let go of the dead holder's lock.
    assert lock.acquire(exclusive=True, blocking=False)
    lock.release()


def test_threads_of_one_process_take_turns(tmp_path: Path) -> None:
    lock = CatalogLock(tmp_path)
    taken: list[bool] = []
    with lock.held(exclusive=False):
        # flock alone would let a second thread in: one open file, one holder.
        thread = threading.Thread(target=lambda: taken.append(lock.acquire(blocking=False)))
        thread.start()
        thread.join()
        # The same thread may nest, and upgrade a shared hold to an exclusive one.
        with lock.held(exclusive=True):
            other = CatalogLock(tmp_path)
            assert not other.acquire(exclusive=False, blocking=False)
    assert taken == [False]
    assert other.acquire(blocking=False)
    other.release()


# --- a writer killed while it holds the lock ----------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("locked-store")


@pytest.fixture(scope="module")
def writer(folder: Path) -> AnalysisStore:
    return AnalysisStore.open(folder)


@pytest.mark.slow
def test_a_writer_killed_holding_the_lock_does_not_block_the_next(
    folder: Path, writer: AnalysisStore
) -> None:
    # The killed process has a run half written and an SQLite write transaction open on
    # tables.db, under the store's lock.
    holder = child("die-writing", str(folder))
    wait_for_line(holder, "held")
    documents = list(scalar_run(EVENTS, label="after the kill"))
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for name, doc in documents:
                writer(name, doc)
            # Until the run writer is imported, the store keeps what it is handed and
            # returns (_pending_writes): this waits for the writes themselves.
            writer.flush()
        except BaseException as error:  # reported by the test below
            errors.append(error)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        # While the holder lives, this writer waits (it does not fail with "database is
        # locked").
        thread.join(timeout=1.0)
        assert thread.is_alive()
    finally:
        kill(holder)  # a holder left alive would hold the lock past the test
    thread.join()
    assert errors == []
    reader = AnalysisStore.open(folder)
    assert_run_complete(reader, documents[0][1]["uid"], EVENTS)
    # The killed process's transaction was rolled back; its run has no stop.
    with sqlite3.connect(folder / "tables.db") as connection:
        names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert "left_by_a_killed_writer" not in names
    killed_runs = [uid for uid in reader.client if reader[uid].start.get("label") == "killed"]
    assert len(killed_runs) == 1
    assert not reader[killed_runs[0]].metadata.get("stop")


# --- three writers and a reader on one folder ---------------------------------------------


@pytest.mark.slow
def test_three_processes_write_one_folder_and_every_run_is_complete(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    first = AnalysisStore.open(folder)
    to_read = list(scalar_run(EVENTS, label="read"))
    for name, doc in to_read:
        first(name, doc)
    # A short flush interval and paced events: many overlapping writes, as a scan's.
    writers = [child("write", str(folder), f"writer-{n}", stdin=True) for n in range(3)]
    reader = child("read", str(folder), to_read[0][1]["uid"], stdin=True)
    for process in [*writers, reader]:
        wait_for_line(process, "ready")
    for process in [*writers, reader]:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = [process.communicate() for process in writers]
    read_out, read_err = reader.communicate()
    for process, (out, err) in zip(writers, outputs, strict=True):
        assert "database is locked" not in out + err
        assert process.returncode == 0, err
    assert "database is locked" not in read_out + read_err
    assert reader.returncode == 0, read_err
    assert json.loads(read_out.splitlines()[-1])["reads"] > 0
    fresh = AnalysisStore.open(folder)
    uids = [json.loads(out.splitlines()[-1])["uid"] for out, _ in outputs]
    assert len(set(uids)) == 3
    for uid in uids:
        assert_run_complete(fresh, uid, EVENTS)


# --- the child processes ------------------------------------------------------------------


def _hold(folder: str, mode: str) -> None:
    lock = CatalogLock(folder)
    lock.acquire(exclusive=mode == "exclusive")
    print("held", flush=True)
    time.sleep(600)


def _die_writing(folder: str) -> None:
    store = AnalysisStore.open(folder)
    documents = list(scalar_run(EVENTS, label="killed"))
    for name, doc in documents[: EVENTS // 2]:
        store(name, doc)
    store.flush()
    CatalogLock(folder).acquire()
    connection = sqlite3.connect(Path(folder) / "tables.db", isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
    connection.execute("CREATE TABLE left_by_a_killed_writer (x)")
    print("held", flush=True)
    time.sleep(600)


def _write(folder: str, label: str) -> None:
    store = AnalysisStore.open(folder, flush_interval=0.05)
    documents = list(scalar_run(EVENTS, label=label))
    print("ready", flush=True)
    sys.stdin.readline()
    for name, doc in documents:
        store(name, doc)
        time.sleep(0.0005)
    print(json.dumps({"uid": documents[0][1]["uid"]}))


def _read(folder: str, uid: str) -> None:
    store = AnalysisStore.open(folder)
    print("ready", flush=True)
    sys.stdin.readline()
    reads, end = 0, time.monotonic() + EVENTS * 0.0005 + 1.0
    while time.monotonic() < end:
        len(store)
        store[uid]["primary"].read()
        reads += 1
    print(json.dumps({"reads": reads}))


if __name__ == "__main__":
    commands = {"hold": _hold, "die-writing": _die_writing, "write": _write, "read": _read}
    commands[sys.argv[1]](*sys.argv[2:])
