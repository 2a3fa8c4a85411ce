"""``bluesky-analysis-store serve``: a real server process over a store folder, its catalog
and event tables in a throwaway PostgreSQL cluster (or in the folder's SQLite files), written
and read through ``AnalysisStore.from_uri`` by this process, by a live callback's worker
process and by four writer processes at once."""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _faults import free_port
from _helpers import PROVENANCE, assert_same_array, files_under, make_frames
from _serve_process import API_KEY, ServeProcess

from bluesky_analysis_store import AnalysisStore, AssetLocationError
from bluesky_analysis_store._composer import compose_documents
from bluesky_analysis_store.cli import main

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
WRITERS = 4
RUNS_PER_WRITER = 2
DEADLINE = 120.0  # seconds to wait for what must come, not a measured time


@pytest.fixture(scope="module", autouse=True)
def _journal_here(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Journals of this module's runs (and of its subprocesses') under its tmp folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BLUESKY_ANALYSIS_JOURNAL", str(tmp_path_factory.mktemp("journal")))
        yield


@pytest.fixture(scope="module")
def raw_read(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of raw data the server is told it may read (``--read``)."""
    return tmp_path_factory.mktemp("raw-read")


@pytest.fixture(scope="module")
def served(postgres: Any, raw_read: Path, tmp_path_factory: pytest.TempPathFactory):
    """``serve --database postgresql://...`` over a new store folder, with streaming."""
    folder = tmp_path_factory.mktemp("served") / "store"
    options = ("--database", postgres.uri(), "--read", raw_read, "--streaming", "memory")
    with ServeProcess(folder, *options) as server:
        yield server
        assert server.stop() == 0, server.log()  # SIGTERM: a clean stop


def connect(server: ServeProcess, **kwargs: Any) -> AnalysisStore:
    """A new client of ``server``, writing under its assets and checking paths against them."""
    kwargs.setdefault("asset_root", server.assets)
    kwargs.setdefault("readable_roots", [server.assets])
    return AnalysisStore.from_uri(server.uri, API_KEY, **kwargs)


def fresh_reader(server: ServeProcess) -> AnalysisStore:
    """A new client: what it reads, the server read from PostgreSQL and the files."""
    return AnalysisStore.from_uri(server.uri, API_KEY)


def test_a_catalog_made_before_is_reused_without_tiled_s_initialisation(
    served: ServeProcess, postgres: Any
) -> None:
    from bluesky_analysis_store._serving import catalog_is_current

    def asyncpg(uri: str) -> str:
        return uri.replace("postgresql://", "postgresql+asyncpg://", 1)

    # The served database holds the catalog its server made: a restart skips the init
    # subprocess. An empty one, or one that cannot be read, is left to tiled's init.
    assert catalog_is_current(asyncpg(postgres.uri()))
    assert not catalog_is_current(asyncpg(postgres.createdb("never_initialised")))
    assert not catalog_is_current(asyncpg(postgres.uri("no_such_database")))


# --- saving and reading back ------------------------------------------------------------


@pytest.mark.parametrize("fmt_name", ["HDF5", "TIFF", "NPY", "inline"])
def test_arrays_in_files_and_inline_read_back_equal(fmt_name: str, served: ServeProcess) -> None:
    frames = make_frames("uint16", (5, 4), count=3)
    writers = {} if fmt_name == "inline" else {"img": fmt_name}
    store = connect(served)
    uid = store.save(
        [{"primary": {"img": frame, "n": n}} for n, frame in enumerate(frames)],
        {"format": fmt_name},
        writers,
        **PROVENANCE,
    )
    if fmt_name != "inline":
        assert files_under(served.assets / uid)
    reader = fresh_reader(served)
    run = reader[uid]
    primary = reader.read_stream(uid, "primary", ["img", "n"])
    assert_same_array(primary["img"], np.stack(frames))
    np.testing.assert_array_equal(primary["n"], [0, 1, 2])
    assert run.start["format"] == fmt_name
    assert run.stop["num_events"] == {"primary": 3}


def test_children_are_found_by_uid_and_by_prefix(served: ServeProcess) -> None:
    parent = str(uuid.uuid4())
    store = connect(served)
    parents = [{"uid": parent, "time": 0.0}]
    first = store.save([{"primary": {"x": 1.0}}], {}, parents=parents, code=np.mean)
    second = store.save([{"primary": {"x": 2.0}}], {}, parents=parents, code=np.mean)
    reader = fresh_reader(served)
    assert sorted(reader.children(parent)) == sorted([first, second])
    assert sorted(reader.children(parent[:8])) == sorted([first, second])
    assert reader[first].start["parent_uids"] == [parent]


def test_four_writer_processes_at_once_each_run_complete_and_its_own(
    served: ServeProcess,
    RE: Any,  # noqa: N803
) -> None:
    """Four processes save two child runs each of one parent through the one server, all
    starting together, while a live callback saves a scan's child run through it too;
    every run reads back whole, with the values its writer wrote."""
    from bluesky.plans import count
    from ophyd.sim import det

    from bluesky_analysis_store import AnalysisStoreCallback

    sys.path.insert(0, str(TESTS))
    from _reducers_for_tests import scaled
    from _serve_writer import EVENTS, values

    parent = str(uuid.uuid4())
    command = [
        sys.executable, str(TESTS / "_serve_writer.py"), served.uri, API_KEY,
        str(served.assets), str(WRITERS), str(RUNS_PER_WRITER), parent,
    ]  # fmt: skip
    callback = AnalysisStoreCallback([scaled], connect(served))
    RE.subscribe(callback)
    writers = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (live_raw,) = RE(count([det], num=10, delay=0.2))  # while the writers write
        stdout, stderr = writers.communicate(timeout=DEADLINE * 3)
    finally:
        writers.kill()
        callback.close(timeout=60)
    assert writers.returncode == 0, stderr
    reader = fresh_reader(served)
    (live_child,) = reader.children(live_raw)
    assert reader[live_child].stop["num_events"] == {"primary": 10}
    live = reader.read_stream(live_child, "primary", ["parent_seq_num", "total"])
    assert live["parent_seq_num"].tolist() == list(range(1, 11))
    expected = [10.0 * det.read()["det"]["value"]] * 10
    np.testing.assert_allclose(live["total"], expected)
    outcome = {int(writer): result for writer, result in json.loads(stdout).items()}
    assert sorted(outcome) == list(range(WRITERS))
    assert len({result["pid"] for result in outcome.values()}) == WRITERS

    all_uids = [uid for result in outcome.values() for uid in result["uids"]]
    assert len(set(all_uids)) == WRITERS * RUNS_PER_WRITER
    assert sorted(reader.children(parent)) == sorted(all_uids)
    for writer, result in outcome.items():
        for run_number, uid in enumerate(result["uids"]):
            run = reader[uid]
            assert (run.start["writer"], run.start["run"]) == (writer, run_number)
            assert run.stop["exit_status"] == "success"
            assert run.stop["num_events"] == {"primary": EVENTS}
            expected = [values(writer, run_number, event) for event in range(EVENTS)]
            primary = reader.read_stream(uid, "primary", ["frame", "inline", "tag"])
            for key in ("frame", "inline", "tag"):
                assert_same_array(
                    primary[key], np.stack([e[key] for e in expected]), f"{uid} {key}"
                )


def test_a_live_callback_saves_through_serve_from_its_worker_process(
    served: ServeProcess,
    RE: Any,  # noqa: N803
) -> None:
    from bluesky.plans import count
    from ophyd.sim import det

    from bluesky_analysis_store import AnalysisStoreCallback

    sys.path.insert(0, str(TESTS))
    from _reducers_for_tests import scaled

    callback = AnalysisStoreCallback([scaled], connect(served))
    assert callback.mode == "process"
    RE.subscribe(callback)
    try:
        (raw_uid,) = RE(count([det], num=4))
    finally:
        callback.close(timeout=60)
    reader = fresh_reader(served)
    (child_uid,) = reader.children(raw_uid)
    assert reader[child_uid].stop["reduction"]["events_reduced"] == 4
    np.testing.assert_allclose(
        reader.read_stream(child_uid, "primary", ["total"])["total"],
        [10.0 * det.read()["det"]["value"]] * 4,
    )


# --- what the server refuses ------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Apikey wrongkey"}], ids=["none", "wrong"]
)
def test_requests_without_the_api_key_or_with_a_wrong_one_are_refused(
    served: ServeProcess, headers: dict[str, str]
) -> None:
    for path in ("metadata/", "search/"):
        response = httpx.get(f"{served.uri}/api/v1/{path}", headers=headers)
        assert response.status_code in (401, 403), response.text
    right = httpx.get(
        f"{served.uri}/api/v1/metadata/", headers={"Authorization": f"Apikey {API_KEY}"}
    )
    assert right.status_code == 200


def test_tiled_clients_without_the_key_or_with_a_wrong_one_are_refused(
    served: ServeProcess,
) -> None:
    from tiled.client import from_uri

    with pytest.raises(RuntimeError, match="requires API key"):
        from_uri(served.uri)
    with pytest.raises(httpx.HTTPStatusError) as refused:
        from_uri(served.uri, api_key="wrongkey")
    assert refused.value.response.status_code == 401


def _run_with_files_under(root: Path) -> list[tuple[str, dict[str, Any]]]:
    """The documents of a run whose frames are written, as HDF5, under ``root``."""
    frames = make_frames("float32", (3, 2), count=2)
    return list(
        compose_documents(
            [{"primary": {"img": frame}} for frame in frames],
            {},
            {"img": "HDF5"},
            root=root,
            **PROVENANCE,
        )  # fmt: skip
    )


def _save_unchecked(server: ServeProcess, documents: list[tuple[str, dict[str, Any]]]) -> str:
    """Give ``documents`` to a client that checks no path (no readable_roots)."""
    unchecked = AnalysisStore.from_uri(server.uri, API_KEY)
    for name, doc in documents:
        unchecked(name, doc)
    unchecked.flush()
    return documents[0][1]["uid"]


def test_a_file_outside_the_served_folders_cannot_be_read_through_the_server(
    served: ServeProcess, raw_read: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside_uid = _save_unchecked(served, _run_with_files_under(outside))
    assert files_under(outside)  # the file is there: the server will not read it
    # The array's own request (tiled's client retries a server error for half a minute).
    response = httpx.get(
        f"{served.uri}/api/v1/array/full/{outside_uid}/primary/img",
        headers={"Authorization": f"Apikey {API_KEY}"},
    )
    assert response.status_code >= 400
    # The server logs why once it has answered.
    refusal = f"Refusing to serve file://localhost{outside}"
    deadline = time.monotonic() + DEADLINE
    while refusal not in served.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert refusal in served.log()

    # The same run with its file in a --read folder reads back.
    inside = raw_read / uuid.uuid4().hex
    inside_uid = _save_unchecked(served, _run_with_files_under(inside))
    assert fresh_reader(served)[inside_uid]["primary"]["img"].read().shape == (2, 3, 2)


def test_the_client_refuses_a_file_outside_its_readable_roots(
    served: ServeProcess, tmp_path: Path
) -> None:
    documents = _run_with_files_under(tmp_path / "elsewhere")
    store = connect(served)
    with pytest.raises(AssetLocationError):
        for name, doc in documents:
            store(name, doc)
    assert name == "stream_resource"  # the documents before it are only start and descriptor
    # And save refuses a root outside before writing anything there.
    with pytest.raises(AssetLocationError):
        store.save([{"primary": {"img": np.ones((2, 2))}}], {}, {"img": "NPY"},
                   root=tmp_path / "not-made", **PROVENANCE)  # fmt: skip
    assert not (tmp_path / "not-made").exists()


# --- streaming ----------------------------------------------------------------------------


# tiled 0.2.20's websocket client calls websockets' connect() in a way websockets 17.1
# deprecates; with filterwarnings=error that would end the subscription's thread.
WEBSOCKETS_CONNECT_NOTICE = (
    r"ignore:connect\(\) must be used as a context manager:DeprecationWarning"
)


@pytest.mark.filterwarnings(WEBSOCKETS_CONNECT_NOTICE)
def test_a_subscriber_is_told_of_a_new_run(served: ServeProcess) -> None:
    from tiled.client import from_uri

    created: queue.Queue[Any] = queue.Queue()
    on_created = created.put  # the registry holds callbacks weakly: keep this one
    subscription = from_uri(served.uri, api_key=API_KEY).subscribe()
    subscription.child_created.add_callback(on_created)
    subscription.start_in_thread()
    try:
        uid = connect(served).save([{"primary": {"x": 1.0}}], {"streamed": True}, **PROVENANCE)
        while True:
            update = created.get(timeout=DEADLINE)
            if update.key == uid:
                break
    finally:
        subscription.disconnect()
    assert update.metadata["start"]["streamed"] is True


# --- the command's own checks -------------------------------------------------------------


def _serve_in_process(
    capsys: pytest.CaptureFixture[str], *args: str | Path | int
) -> tuple[int, str]:
    """``main(["serve", *args])`` here: its exit status and stderr."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", *map(str, args)])
    return int(exited.value.code or 0), capsys.readouterr().err


def test_serve_without_an_api_key_exits_2_naming_the_option_and_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TILED_API_KEY", raising=False)
    status, err = _serve_in_process(capsys, "--store", tmp_path / "store")
    assert status == 2
    assert "--api-key" in err and "TILED_API_KEY" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    "database",
    [
        "mysql://someone@db.example/analysis",
        "postgresql://someone@db.example",
        "postgresql://someone@db.example:port/analysis",
        "UNREACHABLE",
    ],
)
def test_a_bad_database_uri_is_a_one_line_error(
    database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if database == "UNREACHABLE":
        database = f"postgresql://analysis:hunter2@127.0.0.1:{free_port()}/analysis"
    status, err = _serve_in_process(
        capsys, "--store", tmp_path / "store", "--api-key", API_KEY, "--database", database,
        "--port", "0",
    )  # fmt: skip
    assert status == 2
    assert err.startswith("bluesky-analysis-store: error:") and "--database" in err
    assert len(err.strip().splitlines()) == 1
    assert "hunter2" not in err  # a password is never repeated
    assert not (tmp_path / "store").exists()


def test_a_port_in_use_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        status, err = _serve_in_process(
            capsys, "--store", tmp_path / "store", "--api-key", API_KEY, "--port", port
        )
    assert status == 2 and f"cannot listen on 127.0.0.1:{port}" in err
    assert not (tmp_path / "store").exists()  # refused before anything was made


def test_a_read_folder_that_does_not_exist_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-raw"
    status, err = _serve_in_process(
        capsys, "--store", tmp_path / "store", "--api-key", API_KEY, "--read", missing
    )
    assert status == 2 and f"--read {missing}: no such folder" in err


def test_a_server_uri_as_the_store_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    status, err = _serve_in_process(
        capsys, "--store", "http://tiled.example:8000", "--api-key", API_KEY
    )
    assert status == 2 and "--store FOLDER" in err


def test_an_api_key_that_is_not_letters_and_digits_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = _serve_in_process(capsys, "--store", tmp_path, "--api-key", "not-a-key")
    assert status == 2 and "letters and digits" in err


# --- an embedded folder -------------------------------------------------------------------


def test_serve_over_an_embedded_folder_takes_turns_with_its_other_writers(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``serve`` without ``--database``: the folder's SQLite catalog, which this process
    writes too, by itself, at the same time; both writers' runs are all saved, none is
    refused with "database is locked". SIGINT stops the server cleanly."""
    folder = tmp_path_factory.mktemp("embedded") / "store"
    server = ServeProcess(folder).start()
    try:
        through_server = connect(server)
        direct = AnalysisStore.open(folder, served=False)
        saved: dict[str, list[str]] = {"server": [], "direct": []}
        errors: list[BaseException] = []

        def save_runs(name: str, store: AnalysisStore) -> None:
            try:
                for n in range(RUNS_PER_WRITER):
                    frames = [np.full((3, 3), n, dtype="int32")] * 2
                    saved[name].append(
                        store.save(
                            [{"primary": {"img": f}} for f in frames],
                            {"by": name, "n": n},
                            {"img": "HDF5"},
                            **PROVENANCE,
                        )
                    )
            except BaseException as error:  # reported by the test's thread
                errors.append(error)

        threads = [
            threading.Thread(target=save_runs, args=(name, store))
            for name, store in (("server", through_server), ("direct", direct))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        assert not errors, errors
        reader = fresh_reader(server)
        for name, uids in saved.items():
            assert len(uids) == RUNS_PER_WRITER
            for n, uid in enumerate(uids):
                run = reader[uid]
                assert (run.start["by"], run.start["n"]) == (name, n)
                img = reader.read_stream(uid, "primary", ["img"])["img"]
                assert_same_array(img, np.full((2, 3, 3), n, "int32"))
        assert (folder / "catalog.db").is_file()
    finally:
        status = server.stop(signal.SIGINT)
    assert status == 0, server.log()
    assert "listening on http://127.0.0.1:" in server.log()
    assert "stopped serving" in server.log()


# --- the test cluster itself --------------------------------------------------------------


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie left for init to reap is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_throwaway_cluster_leaves_no_process_and_no_folder_behind() -> None:
    from _postgres import PostgresCluster

    with PostgresCluster() as cluster:
        pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
        assert _running(pid)
        assert cluster.uri().startswith("postgresql://analysis@127.0.0.1:")
    assert not cluster.folder.exists()
    assert not _running(pid)  # pg_ctl stop -w returned once the server had exited
