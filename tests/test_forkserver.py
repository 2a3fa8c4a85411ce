"""Worker processes forked from the fork server (``_forkserver``).

Each test that stops, kills or starts a fork server has a cache folder of its own, so a
fork server of its own: started by the first worker it needs (which itself starts from
scratch), forked from after that. The others use the run's (see conftest).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _live import eventually
from bluesky.plans import count
from ophyd.sim import det

from bluesky_analysis_store import AnalysisStoreCallback
from bluesky_analysis_store._catalog_template import CACHE_ENV
from bluesky_analysis_store._forkserver import (
    DISABLE_ENV,
    ForkedProcess,
    fork_worker,
    socket_path,
    start_fork_server,
    stop_fork_server,
)

# Worker processes open the store again: served by its local server, in a fraction of a
# second each (see conftest's ``store``).
STORE_SERVED = True

HANG = 60.0




def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def fork_server_pid(path: Path) -> int:
    """The pid of the process serving ``path``: the one whose command line names it, and
    whose parent's does not (its forked children have the same command line)."""
    named = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(path).encode() in command and b"bluesky_analysis_store._forkserver" in command:
                named.add(int(entry.name))
    for pid in named:
        with contextlib.suppress(OSError):
            if parent_pid(pid) not in named:
                return pid
    raise LookupError(f"no fork server serves {path}")


@pytest.fixture
def own_fork_server(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A cache folder of the test's own: the socket its fork server will have."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    path = socket_path()
    yield path
    stop_fork_server(path)


@pytest.fixture
def runs_fork_server(monkeypatch: pytest.MonkeyPatch) -> int:
    """The pid of the run's fork server (conftest's), for the tests that neither stop nor
    kill theirs: one fork server fewer to start."""
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    return fork_server_pid(start_fork_server(timeout=HANG))


def ended(pid: int) -> bool:
    """Whether ``pid`` has ended; this process's child (a fork server it started) is reaped."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def started_fork_server(path: Path) -> int:
    """Ask for a worker (none answers: one is started), wait until it answers."""
    assert fork_worker(*_unused_pipe()) is None
    eventually(path.exists, "the fork server's socket")
    return fork_server_pid(path)


def _unused_pipe() -> tuple[int, int]:
    read, write = os.pipe()
    os.close(read)
    os.close(write)
    return read, write  # closed: never used, fork_worker returns before sending them


def reducer_seeing_its_process(data):
    return {
        "marker": float(os.environ.get("BAS_TEST_MARKER", "-1")),
        "in_cwd": float(os.path.exists("here.txt")),
        "pid": float(os.getpid()),
    }


def test_a_callbacks_worker_is_forked_with_the_sessions_environment_and_folder(
    runs_fork_server, RE, store, tmp_path, monkeypatch  # noqa: N803
):
    server = runs_fork_server
    monkeypatch.setenv("BAS_TEST_MARKER", "7")  # set after the fork server started
    (tmp_path / "here.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    callback = AnalysisStoreCallback([reducer_seeing_its_process], store)
    try:
        assert parent_pid(callback.worker_pid) == server
        callback.subscribe(RE)
        (raw_uid,) = RE(count([det], num=2))
    finally:
        callback.close()
    (child,) = store.children(raw_uid)
    primary = store.read_stream(child, "primary", ["marker", "in_cwd", "pid"])
    assert list(primary["marker"]) == [7.0, 7.0]
    assert list(primary["in_cwd"]) == [1.0, 1.0]
    assert set(primary["pid"]) == {float(callback.worker_pid)}
    assert store[child].stop["reduction"]["events_failed"] == 0


def test_a_killed_forked_worker_reports_its_signal_and_a_new_one_is_forked(
    runs_fork_server, store, caplog
):
    server = runs_fork_server
    callback = AnalysisStoreCallback([reducer_seeing_its_process], store)
    try:
        first = callback.worker_pid
        assert callback.flush(timeout=HANG)
        with caplog.at_level("ERROR", logger="bluesky_analysis_store"):
            os.kill(first, signal.SIGKILL)
            eventually(lambda: callback.worker_pid != first, "a new worker")
        assert any("killed by SIGKILL" in r.getMessage() for r in caplog.records)
        assert parent_pid(callback.worker_pid) == server
        assert callback.flush(timeout=HANG)
    finally:
        callback.close()


def test_a_worker_outlives_its_killed_fork_server_and_the_next_starts_from_scratch(
    own_fork_server, store
):
    server = started_fork_server(own_fork_server)
    callback = AnalysisStoreCallback([reducer_seeing_its_process], store)
    os.kill(server, signal.SIGKILL)
    try:
        assert callback.flush(timeout=HANG)  # the worker goes on without its fork server
        later = AnalysisStoreCallback([reducer_seeing_its_process], store)
        try:
            assert parent_pid(later.worker_pid) == os.getpid()  # started from scratch
            assert later.flush(timeout=HANG)
        finally:
            later.close()
    finally:
        abandoned = callback.close(timeout=HANG)
    assert not abandoned, str(abandoned)


def test_the_status_of_a_worker_whose_fork_server_is_gone_is_still_waited_for(
    own_fork_server,
):
    server = started_fork_server(own_fork_server)
    to_child, self_out = os.pipe()
    self_in, from_child = os.pipe()
    forked = fork_worker(to_child, from_child)
    os.close(to_child)
    os.close(from_child)
    assert isinstance(forked, ForkedProcess)
    os.kill(server, signal.SIGKILL)
    with pytest.raises(subprocess.TimeoutExpired):
        forked.wait(0.2)  # it waits for its setup message
    os.close(self_out)  # the worker sees its pipe close and ends
    assert forked.wait(HANG) is not None
    os.close(self_in)
    assert ended(forked.pid)


def test_other_code_settings_get_a_fork_server_of_their_own(own_fork_server, monkeypatch):
    environ = dict(os.environ)
    assert socket_path(environ) == own_fork_server
    assert socket_path({**environ, "TILED_RETRY_ATTEMPTS": "9"}) != own_fork_server
    assert socket_path({**environ, "BAS_TEST_MARKER": "9"}) == own_fork_server
    # A cache folder too deep for a socket's address: the socket goes to the temporary
    # folder, still one of its own.
    deep = own_fork_server.parent / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv(CACHE_ENV, str(deep))
    assert len(str(socket_path())) <= 100 and socket_path() != own_fork_server
    monkeypatch.setenv(CACHE_ENV, str(deep / "f"))
    assert socket_path() != own_fork_server


def test_a_removed_socket_ends_its_fork_server_and_forking_can_be_switched_off(
    own_fork_server, monkeypatch
):
    server = started_fork_server(own_fork_server)
    stop_fork_server(own_fork_server)
    eventually(lambda: ended(server), "the fork server's end")
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert fork_worker(*_unused_pipe()) is None
    time.sleep(0.5)
    assert not own_fork_server.exists()  # and none was started


def test_a_fork_server_stopped_while_it_starts_ends_without_serving(own_fork_server):
    start_fork_server(timeout=None)  # importing for seconds before it serves
    pids: list[int] = []

    def found() -> bool:
        with contextlib.suppress(LookupError):
            pids.append(fork_server_pid(own_fork_server))
        return bool(pids)

    eventually(found, "the fork server's process")
    assert not own_fork_server.exists()  # not serving yet
    stop_fork_server(own_fork_server)
    server = pids[0]
    eventually(lambda: ended(server), "the end of the fork server stopped while starting")
    assert not own_fork_server.exists()
    assert not own_fork_server.with_suffix(".starting").exists()


def test_a_local_store_server_is_forked_and_without_a_fork_server_started_anew(
    own_fork_server, tmp_path, monkeypatch
):
    from bluesky_analysis_store import AnalysisStore
    from bluesky_analysis_store._local_server import read_server_info, stop_server

    def served_store_parent(folder: Path) -> int:
        """The parent of the folder's server, read while it serves."""
        store = AnalysisStore.open(folder, served=True)
        try:
            assert len(store.client) == 0  # it answers, with the folder's key
            info = read_server_info(folder)
            assert info is not None
            return parent_pid(info.pid)
        finally:
            stop_server(folder)

    # No fork server yet: this process starts the server from scratch, and starts no fork
    # server for it.
    assert served_store_parent(tmp_path / "scratch") == os.getpid()
    assert not own_fork_server.exists()
    # With one up: the server is its child, with the session's folder taken on.
    server = started_fork_server(own_fork_server)
    monkeypatch.chdir(tmp_path)
    assert served_store_parent(tmp_path / "forked") == server
    assert "serving" in (tmp_path / "forked" / "server.log").read_text()
