"""``bluesky-analysis-store worker --zmq``: reduction in another process than the RunEngine's.

Every part is a real process: a ``bluesky-0MQ-proxy`` on free localhost ports; RunEngines
publishing with ``Publisher(..., serializer=zmq_dumps)`` (``_publish_scans.py``); the worker
as the command line (``python -m bluesky_analysis_store worker ...``) writing into an
embedded store served by its local server, and a second one writing into a ``tiled serve``
process that is stopped and started again. The raw frames' resources name a root that does
not exist here (the acquisition machine's mount): the workers read them through
``--root-map`` under a symlinked folder.

Before scans are published, the test waits until a ``ping`` published by the same sender
shows in the worker's log: the 0MQ connections are then up (a PUB socket drops what it
sends before its subscriber is connected, as bluesky's Publisher does).
"""

from __future__ import annotations

import itertools
import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _faults import API_KEY, TiledServer, free_port
from _live import children_of

from bluesky_analysis_store import AnalysisStore, cli
from bluesky_analysis_store._zmq_documents import zmq_dumps
from bluesky_analysis_store.sim import spot_image

TESTS = Path(__file__).parent
DEADLINE = 120.0  # seconds to wait for a process to say something: not a measured time
FRAME_SHAPE = (8, 8)  # _publish_scans.FRAME_SHAPE
REDUCERS = ["_remote_reducers:frame_total", "_remote_reducers:MORE_REDUCERS"]
RUN_TIMEOUT = 4.0  # the embedded store's worker: --run-timeout (no scan here pauses so long)
_tags = itertools.count()


class Process:
    """A subprocess whose stdout and stderr lines are collected as they come."""

    def __init__(self, command: list[str], env: dict[str, str], name: str) -> None:
        self.name = name
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=TESTS,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        for stream, lines in (
            (self.process.stdout, self.stdout),
            (self.process.stderr, self.stderr),
        ):
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True).start()

    def _collect(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def wait_for(self, text: str, *, stream: str = "stdout", after: int = 0) -> str:
        """The first line of ``stream`` from index ``after`` on that contains ``text``."""
        lines = self.stdout if stream == "stdout" else self.stderr
        deadline = time.monotonic() + DEADLINE
        with self._changed:
            while True:
                for line in lines[after:]:
                    if text in line:
                        return line
                if self.process.poll() is not None and not self._changed.wait(0.5):
                    raise AssertionError(f"{self.name} exited before {text!r}:\n{self.output()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} never said {text!r}:\n{self.output()}")
                self._changed.wait(0.5)

    def output(self) -> str:
        return "\n".join(["--- stdout", *self.stdout, "--- stderr", *self.stderr])

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


# --- the processes ------------------------------------------------------------------------


class Proxy:
    def __init__(self) -> None:
        self.in_address = f"tcp://127.0.0.1:{free_port()}"
        self.out_address = f"127.0.0.1:{free_port()}"
        proxy = Path(sys.executable).with_name("bluesky-0MQ-proxy")
        self.process = Process(
            [
                str(proxy),
                "--in-address",
                self.in_address,
                "--out-address",
                f"tcp://{self.out_address}",
            ],
            _env(),
            "the proxy",
        )


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    proxy = Proxy()
    yield proxy
    proxy.process.stop()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Where the publisher writes its frames, the symlink the workers read them through,
    and the root the resources name (nowhere on this machine)."""
    base = tmp_path_factory.mktemp("remote")
    raw = base / "raw"
    raw.mkdir()
    mounted = base / "mounted"
    mounted.symlink_to(raw, target_is_directory=True)
    return {
        "raw": raw,
        "mounted": mounted,
        "root_as": Path(f"/beamline-{uuid.uuid4().hex[:8]}/raw"),
    }


def start_publisher(proxy: Proxy, folders: dict[str, Path]) -> Process:
    publisher = Process(
        [sys.executable, str(TESTS / "_publish_scans.py"), proxy.in_address,
         str(folders["raw"]), str(folders["root_as"])],
        _env(),
        "the publisher",
    )  # fmt: skip
    publisher.wait_for("ready")
    return publisher


def start_worker(
    proxy: Proxy,
    folders: dict[str, Path],
    store: str,
    writer: str,
    options: tuple[str, ...] = (),
    **env: str,
) -> Process:
    """The worker command, reducing with ``REDUCERS`` into ``store``; ``writer`` is the
    format of the derived array ``normalised``; ``options`` are more of its options."""
    root_map = f"{folders['root_as']}={folders['mounted']}"
    command = [sys.executable, "-m", "bluesky_analysis_store", "worker", "--zmq", proxy.out_address,
               "--store", store, "--root-map", root_map, "--writer", f"normalised={writer}",
               "--stream", "primary"]  # fmt: skip
    for name in REDUCERS:
        command += ["--reducers", name]
    command += options
    worker = Process(command, _env(**env), "the worker")
    worker.wait_for("listening on", stream="stderr")
    return worker


def connected(send_ping: Callable[[str], None], *workers: Process) -> None:
    """Ping until every worker has logged one of the pings: the path is up."""
    deadline = time.monotonic() + DEADLINE
    while True:
        tag = f"{next(_tags)}-{uuid.uuid4().hex[:6]}"
        send_ping(tag)
        time.sleep(0.2)
        if all(any(f"ping-{tag}" in line for line in w.stderr) for w in workers):
            return
        for worker in workers:
            if worker.process.poll() is not None:
                raise AssertionError(f"the worker exited:\n{worker.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(
                "the pings never reached the worker(s):\n"
                + "\n".join(worker.output() for worker in workers)
            )


def publisher_ping(publisher: Process) -> Callable[[str], None]:
    return lambda tag: publisher.send(f"ping {tag}")


class Scan:
    """What the publisher said of one scan: its uid and the motor position of each event."""

    def __init__(self, publisher: Process, command: str) -> None:
        after = len(publisher.stdout)
        publisher.send(command)
        self.uid = publisher.wait_for("raw ", after=after).split()[1]
        publisher.wait_for(f"done {self.uid}", after=after)
        lines = publisher.stdout[after:]
        start = lines.index(f"raw {self.uid}")
        end = lines.index(f"done {self.uid}")
        self.positions = [
            float(line.split()[2]) for line in lines[start:end] if line.startswith("event")
        ]


@pytest.fixture(scope="module")
def remote_store_folder(
    tmp_path_factory: pytest.TempPathFactory, folders: dict[str, Path]
) -> Iterator[Path]:
    """The embedded store, served by its local server (the worker and the test share it);
    the folder the workers read raw frames through is one it may read."""
    from bluesky_analysis_store._local_server import stop_server

    folder = tmp_path_factory.mktemp("remote-store") / "store"
    AnalysisStore.open(folder, readable=[folders["mounted"]], served=True)
    yield folder
    stop_server(folder)


@pytest.fixture(scope="module")
def session(
    proxy: Proxy, folders: dict[str, Path], remote_store_folder: Path
) -> Iterator[dict[str, Any]]:
    """A publisher mid-scan when the worker starts; the worker then gets connected and that
    scan ends. Yields the processes and the uid of the scan the worker joined midway."""
    publisher = start_publisher(proxy, folders)
    processes = [publisher]
    try:
        after = len(publisher.stdout)
        publisher.send("endless")
        midway_uid = publisher.wait_for("raw ", after=after).split()[1]
        publisher.wait_for("event 2", after=after)
        worker = start_worker(
            proxy,
            folders,
            str(remote_store_folder),
            "TIFF",
            ("--run-timeout", str(RUN_TIMEOUT)),
            BLUESKY_ANALYSIS_STORE_SERVED="1",
        )
        processes.append(worker)
        connected(publisher_ping(publisher), worker)
        publisher.send("end")
        publisher.wait_for(f"done {midway_uid}", after=after)
        yield {
            "publisher": publisher,
            "worker": worker,
            "midway_uid": midway_uid,
            "processes": processes,
        }
    finally:
        worker_stopped = None
        for process in processes:
            code = process.stop()  # SIGTERM
            if process.name == "the worker":
                worker_stopped = (code, process.output())
    # SIGTERM: the worker closes its callback and exits 0.
    assert worker_stopped is not None and worker_stopped[0] == 0, worker_stopped
    assert "stopped listening" in worker_stopped[1]


@pytest.fixture(scope="module")
def reader(remote_store_folder: Path, session: dict[str, Any]) -> AnalysisStore:
    return AnalysisStore.open(remote_store_folder, served=True)


def complete_child(store: AnalysisStore, raw_uid: str, worker: Process) -> Any:
    """The one child run of ``raw_uid`` once it has its stop (waits for the worker)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        children = children_of(store, raw_uid)
        if children:
            [uid] = children
            child = store.client[uid]
            if child.metadata.get("stop") is not None:
                return child
        if worker.process.poll() is not None:
            raise AssertionError(f"the worker exited:\n{worker.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no complete child of {raw_uid}:\n{worker.output()}")
        time.sleep(0.3)


def check_child(store: AnalysisStore, child: Any, scan: Scan) -> None:
    """Provenance names the raw run and the reducers; values are theirs, of the raw frames.
    ``child`` is a run of ``store``, whose primary stream is read in one ``read_stream``."""
    start = child.start
    assert start["parent_uids"] == [scan.uid]
    assert [code["name"] for code in start["provenance"]["code"]] == [
        "_remote_reducers:frame_total",
        "_remote_reducers:motor_shifted",
        "_remote_reducers:frame_normalised",
    ]
    assert child.stop["exit_status"] == "success"
    primary = store.read_stream(
        start["uid"], "primary", ["total", "peak", "motor_plus_one", "normalised"]
    )
    frames = [spot_image(position, FRAME_SHAPE).astype(np.float64) for position in scan.positions]
    assert len(frames) == 3
    np.testing.assert_array_equal(primary["total"], [frame.sum() for frame in frames])
    np.testing.assert_array_equal(primary["peak"], [frame.max() for frame in frames])
    np.testing.assert_array_equal(primary["motor_plus_one"], np.array(scan.positions) + 1.0)
    normalised = primary["normalised"]
    assert normalised.dtype == np.float32
    expected = [frame.astype(np.float32) / np.float32(frame.max()) for frame in frames]
    np.testing.assert_array_equal(normalised, expected)


@pytest.fixture(scope="module")
def first_scan(session: dict[str, Any]) -> Scan:
    return Scan(session["publisher"], "scan 3")


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.slow
def test_scans_published_after_the_worker_started_get_child_runs(
    session: dict[str, Any], reader: AnalysisStore, first_scan: Scan
) -> None:
    child = complete_child(reader, first_scan.uid, session["worker"])
    check_child(reader, child, first_scan)


@pytest.mark.slow
def test_raw_files_are_read_through_the_root_map(
    session: dict[str, Any], folders: dict[str, Path], reader: AnalysisStore, first_scan: Scan
) -> None:
    """The resources name a root that does not exist here; the values are the frames'."""
    assert not folders["root_as"].exists()
    child = complete_child(reader, first_scan.uid, session["worker"])
    assert child.stop["num_events"]["primary"] == 3
    np.testing.assert_array_equal(
        child["primary"]["total"].read(),
        [spot_image(p, FRAME_SHAPE).astype(np.float64).sum() for p in first_scan.positions],
    )


@pytest.mark.slow
def test_a_run_joined_midway_is_ignored_with_one_warning(
    session: dict[str, Any], reader: AnalysisStore, first_scan: Scan
) -> None:
    complete_child(reader, first_scan.uid, session["worker"])  # later than the midway run's stop
    assert children_of(reader, session["midway_uid"]) == []
    warnings = [line for line in session["worker"].stderr if "did not see" in line]
    assert len(warnings) == 1, session["worker"].output()


@pytest.mark.slow
def test_malformed_and_pickled_messages_are_skipped(
    session: dict[str, Any], proxy: Proxy, reader: AnalysisStore, tmp_path: Path
) -> None:
    import zmq

    marker = tmp_path / "unpickled"
    worker = session["worker"]
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    socket.connect(proxy.in_address)
    try:
        connected(lambda tag: socket.send(b" ping-" + tag.encode() + b" x"), worker)
        after = len(worker.stderr)
        socket.send(b" start " + pickle.dumps(_TouchOnLoad(str(marker))))
        socket.send(b"no-spaces-at-all")
        socket.send(b" start " + zmq_dumps({"uid": "only-a-uid"}))  # not a valid start
        socket.send(b" start " + b"\x92\x01\x02")  # msgpack, but a list
        connected(lambda tag: socket.send(b" ping-" + tag.encode() + b" x"), worker)
    finally:
        socket.close()
        context.term()
    logged = "\n".join(worker.stderr[after:])
    assert not marker.exists(), "the pickle was loaded"
    assert "the start document cannot be decoded" in logged
    assert "is not 'PREFIX NAME DOCUMENT'" in logged
    assert "a malformed start document was skipped" in logged
    assert "a document is a map, not a list" in logged
    assert worker.process.poll() is None
    scan = Scan(session["publisher"], "scan 3")  # the worker goes on
    check_child(reader, complete_child(reader, scan.uid, worker), scan)


@pytest.mark.slow
def test_a_new_publisher_is_reduced_by_the_same_worker(
    session: dict[str, Any], proxy: Proxy, folders: dict[str, Path], reader: AnalysisStore
) -> None:
    worker = session["worker"]
    old = session["publisher"]
    old.send("exit")
    assert old.process.wait(60) == 0
    new = start_publisher(proxy, folders)
    session["processes"].append(new)
    session["publisher"] = new
    connected(publisher_ping(new), worker)
    scan = Scan(new, "scan 3")
    check_child(reader, complete_child(reader, scan.uid, worker), scan)
    assert worker.process.poll() is None


@pytest.mark.slow
def test_a_run_whose_publisher_was_killed_is_closed_as_failed(
    session: dict[str, Any], proxy: Proxy, folders: dict[str, Path], reader: AnalysisStore
) -> None:
    """SIGKILL of the RunEngine's process mid-run: no stop comes; after --run-timeout the
    child run is closed, failed, with what was reduced, and a new publisher is reduced."""
    worker = session["worker"]
    old = session["publisher"]
    after = len(old.stdout)
    old.send("endless")
    raw_uid = old.wait_for("raw ", after=after).split()[1]
    old.wait_for("event 3", after=after)
    # A PUB socket sends from its own thread: a ping published after "event 3" was printed
    # and seen by the worker means the first three events left before the SIGKILL.
    connected(publisher_ping(old), worker)
    old.process.kill()
    old.process.wait()
    new = start_publisher(proxy, folders)  # first, so the next tests have a publisher
    session["processes"].append(new)
    session["publisher"] = new
    child = complete_child(reader, raw_uid, worker)
    assert child.stop["exit_status"] == "fail"
    assert "no stop document came" in child.stop["reason"]
    events_published = sum(1 for line in old.stdout[after:] if line.startswith("event "))
    assert 3 <= child.stop["num_events"]["primary"] <= events_published
    connected(publisher_ping(new), worker)


@pytest.mark.slow
def test_children_are_complete_after_a_server_restart(
    session: dict[str, Any],
    proxy: Proxy,
    folders: dict[str, Path],
    server: TiledServer,
    tmp_path: Path,
) -> None:
    worker = start_worker(
        proxy,
        folders,
        server.uri,
        "inline",  # the server reads files of its own folder only; none is given here
        TILED_API_KEY=API_KEY,
        BLUESKY_ANALYSIS_JOURNAL=str(tmp_path / "journal"),
    )
    try:
        publisher = session["publisher"]
        connected(publisher_ping(publisher), worker)
        server.stop()
        scan = Scan(publisher, "scan 3")
        assert "NOT SAVED" in worker.wait_for(f"(raw {scan.uid[:8]})", stream="stderr")
        server.start()
        store = AnalysisStore.from_uri(server.uri, API_KEY)
        check_child(store, complete_child(store, scan.uid, worker), scan)
    finally:
        worker.process.send_signal(2)  # SIGINT: it closes and exits 0
        try:
            assert worker.process.wait(90) == 0, worker.output()
        finally:
            worker.stop()


class _TouchOnLoad:
    """Unpickled, it creates a file: the proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


# --- usage errors, in this process ------------------------------------------------------


_VALID = ["--zmq", "localhost:5578", "--reducers", "_remote_reducers:frame_total"]


@pytest.mark.parametrize(
    ("arguments", "option"),
    [
        (["--zmq", "localhost"], "--zmq"),
        (["--zmq", "localhost:0"], "--zmq"),
        (["--zmq", "tcp://:5578"], "--zmq"),
        (["--zmq", "localhost:5578", "--reducers", "no_such_module_here:f"], "--reducers"),
        (["--zmq", "localhost:5578", "--reducers", "_remote_reducers:nothing"], "--reducers"),
        (["--zmq", "localhost:5578", "--reducers", "_remote_reducers"], "--reducers"),
        ([*_VALID, "--root-map", "relative=/new"], "--root-map"),
        ([*_VALID, "--root-map", "/old"], "--root-map"),
        ([*_VALID, "--run-timeout", "0"], "--run-timeout"),
        ([*_VALID, "--run-timeout", "soon"], "--run-timeout"),
        ([*_VALID, "--writer", "normalised=NoSuchFormat"], "--writer"),
    ],
)
def test_usage_errors_name_the_option(
    arguments: list[str], option: str, capsys: pytest.CaptureFixture[str], isolated_env: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["worker", *arguments])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert option in err


def test_a_root_map_target_the_store_may_not_read_is_refused(
    capsys: pytest.CaptureFixture[str], shared_store: AnalysisStore, tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["worker", "--zmq", "localhost:5578", "--reducers", "_remote_reducers:frame_total",
                  "--store", shared_store.location, "--root-map", f"/old={tmp_path}"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("bluesky-analysis-store: error: --root-map:")
    assert str(tmp_path) in err


def test_help_shows_the_options_and_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["worker", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--zmq", "--reducers", "--root-map", "--writer", "--stream", "--run-timeout"):
        assert option in out
    assert "zmq_dumps" in out
    assert "\n  bluesky-analysis-store worker --zmq " in out
