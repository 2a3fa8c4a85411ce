"""Reprocessing a batch on other processes: a Dask LocalCluster and a ProcessPoolExecutor.

Raw runs of a real RunEngine (a spot camera whose 8x8 frames are NPY files) are saved in a
source store; ``reprocess`` reduces them on a 2-worker LocalCluster (shared by the module)
into a target store served by its local server, which every worker writes through. One
worker is SIGKILLed in the middle of a run (``_cluster_reducers.HoldOnce`` holds that run's
first attempt until then): every raw run must end with exactly one complete child, equal to
the same reduction done in this process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _cluster_reducers import HOLD_FOLDER_ENV, HOLD_KEY, HoldOnce, hold_file  # noqa: E402
from _helpers import run_command  # noqa: E402
from _live import DocumentRecorder, children_of  # noqa: E402
from _offline_reducers import row_sums, scaled_total  # noqa: E402
from bluesky import RunEngine  # noqa: E402
from bluesky.plans import count  # noqa: E402
from ophyd.sim import SynAxis  # noqa: E402

from bluesky_analysis_store import AnalysisStore, AnalysisStoreError, reprocess  # noqa: E402
from bluesky_analysis_store._distributed import batch_child_uid  # noqa: E402
from bluesky_analysis_store._journal import RunJournal, journal_paths  # noqa: E402
from bluesky_analysis_store._local_server import stop_server  # noqa: E402
from bluesky_analysis_store._provenance import code_identity  # noqa: E402
from bluesky_analysis_store._reduction import ReductionPlan, RunReduction  # noqa: E402
from bluesky_analysis_store._replay import replay_run  # noqa: E402
from bluesky_analysis_store._reprocess import reduce_run  # noqa: E402
from bluesky_analysis_store.sim import spot_camera  # noqa: E402

pytestmark = pytest.mark.slow

RUNS = 6
HELD_RUN = 3  # the run whose first attempt is killed with its worker
KILL_AFTER = 2  # runs saved before the kill
REDUCERS = [scaled_total, row_sums, HoldOnce()]
COLUMNS = ("total", "row_sums", "parent_seq_num")


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hold_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """Set before the cluster starts, as is the journal folder (the module's own): its
    workers (and pool processes) inherit them."""
    folder = tmp_path_factory.mktemp("hold")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(HOLD_FOLDER_ENV, str(folder))
        patch.setenv("BLUESKY_ANALYSIS_JOURNAL", str(tmp_path_factory.mktemp("journal")))
        yield folder


@pytest.fixture(scope="module", autouse=True)
def _dask_config_restored() -> Iterator[None]:
    """dask's default scheduler as it was before the module: a test that fails with a
    ``distributed.Client`` still open (a client sets it) must not leave the modules after
    it computing on a cluster that is gone."""
    import dask

    saved = {key: dask.config.get(key, None) for key in ("scheduler", "shuffle")}
    yield
    for key, value in saved.items():
        if value is None:
            dask.config.config.pop(key, None)
        else:
            dask.config.set({key: value})


@pytest.fixture(scope="module")
def cluster(hold_folder: pathlib.Path) -> Iterator[Any]:
    """A Dask client of a 2-worker LocalCluster, made as ``reprocess --workers 2`` makes it."""
    import argparse

    from bluesky_analysis_store.cli._cluster import reprocess_executor

    with reprocess_executor(argparse.Namespace(workers=2, scheduler=None)) as client:
        yield client


@pytest.fixture(scope="module")
def raw_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[AnalysisStore, list[str], list[str], DocumentRecorder]]:
    """The source store, its RUNS raw runs (one marked to be held), 3 more for the corrupt
    batch, and every document the RunEngine emitted."""
    import asyncio

    frames = tmp_path_factory.mktemp("frames")
    folder = tmp_path_factory.mktemp("raw-store")
    source = AnalysisStore.open(folder, readable=[frames], served=True)
    loop = asyncio.new_event_loop()
    engine = RunEngine({}, loop=loop)
    recorder = DocumentRecorder()
    engine.subscribe(source)
    engine.subscribe(recorder)
    motor = SynAxis(name="motor")
    cam = spot_camera(motor, str(frames), shape=(8, 8))
    try:
        batch = []
        for n in range(RUNS):
            motor.set(-4.0 + 0.2 * n)  # a frame of its own: runs cannot be mixed up unseen
            md = {HOLD_KEY: True} if n == HELD_RUN else {}
            batch += engine(count([cam], num=3), **md)
        corrupt_batch = [engine(count([cam], num=3))[0] for _ in range(3)]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        engine._th.join()
        loop.close()
    yield source, batch, corrupt_batch, recorder
    stop_server(folder)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnalysisStore]:
    """The store the cluster and the process pool write: served by its local server, as a
    user's folder is."""
    folder = tmp_path_factory.mktemp("target-store")
    yield AnalysisStore.open(folder, served=True)
    stop_server(folder)


@pytest.fixture(scope="module")
def kill_target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AnalysisStore]:
    """Where the batch with a killed worker goes: a ``serve --database postgresql://...``
    server on a throwaway cluster, as a facility's shared store. (Many workers writing a
    folder through its local server are covered by the corrupt-run and command-line tests;
    the whole batch is not repeated there, to keep the suite's time.)"""
    from _serve_process import API_KEY, ServeProcess

    postgres = request.getfixturevalue("postgres")
    folder = tmp_path_factory.mktemp("postgresql-served") / "store"
    with ServeProcess(folder, "--database", postgres.uri()) as server:
        yield AnalysisStore.from_uri(
            server.uri, API_KEY, asset_root=server.assets, readable_roots=[server.assets]
        )


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, raw_runs: Any, hold_folder: pathlib.Path
) -> tuple[AnalysisStore, dict[str, str]]:
    """The same reduction done in this process, of the held run and a few others: raw uid
    -> child uid (their hold files are made first: nothing is held here)."""
    source, batch, _, _ = raw_runs
    store = AnalysisStore.open(tmp_path_factory.mktemp("reference-store"), served=False)
    runs = [batch[HELD_RUN], batch[0], batch[-1]]
    for raw_uid in runs:
        pathlib.Path(hold_file(str(hold_folder), raw_uid)).touch()
    report = reprocess(source, runs, REDUCERS, store, progress=False)
    assert set(report.saved) == set(runs), str(report)
    return store, report.saved


# --- helpers ------------------------------------------------------------------------------


@contextlib.contextmanager
def reading_here() -> Iterator[None]:
    """tiled's client computes its reads with dask's default scheduler, which is the
    cluster's client while one is open in this process: the test reads here."""
    import dask

    with dask.config.set(scheduler="threads"):
        yield


def columns(store: AnalysisStore, child_uid: str) -> dict[str, np.ndarray]:
    with reading_here():
        return store.read_stream(child_uid, keys=COLUMNS)


def assert_same_children(
    store: AnalysisStore,
    saved: dict[str, str],
    reference: tuple[AnalysisStore, dict[str, str]],
    source: AnalysisStore,
) -> None:
    """Each child holds its raw run's numbers, and those of the reduction done here."""
    reference_store, reference_saved = reference
    for raw_uid, child_uid in saved.items():
        got = columns(store, child_uid)
        with reading_here():
            frames = source.read_stream(raw_uid, keys=["cam"])["cam"]
        np.testing.assert_array_equal(got["total"], frames.sum(axis=(1, 2), dtype=np.float64))
        np.testing.assert_array_equal(got["row_sums"], frames.sum(axis=2))
        np.testing.assert_array_equal(got["parent_seq_num"], [1, 2, 3])
        if raw_uid in reference_saved:
            expected = columns(reference_store, reference_saved[raw_uid])
            for key in COLUMNS:
                np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{raw_uid} {key}")


def assert_one_complete_child_each(store: AnalysisStore, saved: dict[str, str]) -> None:
    for raw_uid, child_uid in saved.items():
        children = store.children(raw_uid)
        assert children == [child_uid], f"{raw_uid} has children {children}"
        assert children[0].succeeded, children[0].status
        assert store[child_uid].stop["num_events"] == {"primary": 3}


def journals_left(store: AnalysisStore) -> list[pathlib.Path]:
    return list(journal_paths(store.journal_folder))


def child_files(store: AnalysisStore, child_uid: str) -> list[str]:
    """The child's files, relative to its own folder of the store's assets."""
    folder = pathlib.Path(store.asset_root, child_uid)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _thread_stacks() -> str:
    """Every thread's stack in this process (run on each worker by ``cluster.run``)."""
    import traceback

    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return "\n".join(
        f"--- {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame))
        for ident, frame in sys._current_frames().items()
    )


def _profiling() -> bool:
    """Whether this Dask worker samples its threads' stacks (run by ``cluster.run``)."""
    import dask

    return bool(dask.config.get("distributed.worker.profile.enabled"))


def within(seconds: float, cluster: Any, call: Any) -> Any:
    """``call()``, failed with the stacks of the cluster's workers if it has not returned
    within ``seconds``: a batch that hangs says where its tasks are."""
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(call())
        except BaseException as error:  # noqa: BLE001 - raised again in the test's thread
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        stacks = cluster.run(_thread_stacks)
        pytest.fail(
            f"not done within {seconds} s; the workers' threads:\n"
            + "\n".join(f"=== worker {address}\n{text}" for address, text in stacks.items())
        )
    if errors:
        raise errors[0]
    return results[0]


# --- 1. a worker killed mid-batch ---------------------------------------------------------


def test_a_worker_killed_mid_batch_leaves_every_run_saved_exactly_once(
    cluster, raw_runs, kill_target, hold_folder, reference
):
    source, batch, _, _ = raw_runs
    target = kill_target
    worker_pids = set(cluster.run(os.getpid).values())
    assert len(worker_pids) == 2
    assert set(cluster.run(_profiling).values()) == {False}  # no dashboard shows it
    held = pathlib.Path(hold_file(str(hold_folder), batch[HELD_RUN]))
    held.unlink(missing_ok=True)  # made by the reference fixture, if it ran first
    reports: list[Any] = []
    batch_thread = threading.Thread(
        target=lambda: reports.append(
            reprocess(source, batch, REDUCERS, target, executor=cluster, progress=False)
        )
    )
    batch_thread.start()
    try:
        deadline = time.monotonic() + 120
        while not (held.exists() and held.read_text() and len(target) >= KILL_AFTER):
            assert batch_thread.is_alive(), "the batch ended before a worker was killed"
            assert time.monotonic() < deadline, "the held run or KILL_AFTER saved runs never came"
            time.sleep(0.1)
        killed = int(held.read_text())
        assert killed in worker_pids  # the held run is in a worker, not in this process
        os.kill(killed, signal.SIGKILL)
    finally:
        batch_thread.join(timeout=300)
    assert not batch_thread.is_alive()
    [report] = reports

    assert report.failed == {} and report.skipped == {}, str(report)
    assert list(report.saved) == batch  # in the order asked for
    assert len(set(report.saved.values())) == RUNS
    # The killed attempt's run was made again, in another worker, with the same uid.
    assert killed not in set(cluster.run(os.getpid).values())
    assert_one_complete_child_each(target, report.saved)
    assert len(target) == RUNS  # no second child, nor a partial one, of any run
    assert journals_left(target) == []
    assert_same_children(target, report.saved, reference, source)
    # The held run's files were written again, once: the same files as the reference's.
    reference_store, reference_saved = reference
    held_child = report.saved[batch[HELD_RUN]]
    assert child_files(target, held_child) == child_files(
        reference_store, reference_saved[batch[HELD_RUN]]
    )
    assert child_files(target, held_child)  # row_sums went to a file


# --- 2. a ProcessPoolExecutor -------------------------------------------------------------


def test_a_process_pool_gives_the_same_children_as_this_process(raw_runs, reference, target):
    source, batch, _, _ = raw_runs
    with concurrent.futures.ProcessPoolExecutor(
        2, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        report = reprocess(source, batch[:4], REDUCERS, target, executor=pool, progress=False)
    assert report.failed == {}, str(report)
    assert list(report.saved) == batch[:4]
    assert_one_complete_child_each(target, report.saved)
    assert_same_children(target, report.saved, reference, source)
    assert journals_left(target) == []


# --- 3. a corrupt run fails alone ---------------------------------------------------------


def test_a_corrupt_run_fails_alone_on_the_cluster(cluster, raw_runs, target):
    source, _, corrupt_batch, recorder = raw_runs
    corrupt = corrupt_batch[1]
    missing = recorder.frame_files(corrupt)[("primary", 3)]
    os.remove(missing)
    entries_before = set(os.listdir(target.asset_root))

    report = reprocess(source, corrupt_batch, REDUCERS, target, executor=cluster, progress=False)

    assert list(report.failed) == [corrupt], str(report)
    assert os.path.basename(missing) in report.failed[corrupt]
    assert isinstance(report.errors[corrupt], FileNotFoundError)
    assert set(report.saved) == set(corrupt_batch) - {corrupt}
    assert_one_complete_child_each(target, report.saved)
    assert children_of(target, corrupt) == []
    # The failed attempt left no files, and nothing in the journal.
    assert set(os.listdir(target.asset_root)) == entries_before | set(report.saved.values())
    assert journals_left(target) == []


# --- 4. a retried task replaces what its lost attempt left --------------------------------


def test_a_retried_run_replaces_the_partial_node_files_and_journal_of_its_lost_attempt(
    raw_runs, tmp_path_factory
):
    source, _, corrupt_batch, _ = raw_runs
    raw_uid = corrupt_batch[0]
    store = AnalysisStore.open(tmp_path_factory.mktemp("retry-store"), served=False)
    plan = ReductionPlan.for_store([row_sums], store)
    identity = code_identity(plan.code)
    child_uid = batch_child_uid(raw_uid, identity, "a-batch-token")

    # The lost attempt: its files written, part of its run delivered, its journal left
    # with a line cut short, by a process that is gone (nobody holds the journal).
    from bluesky_analysis_store._delivery import deliver_documents

    documents: list[Any] = []
    lost = RunReduction(plan, lambda name, doc: documents.append((name, doc)), child_uid=child_uid)
    with reading_here():
        for name, doc in replay_run(source.client[raw_uid], stand_in=True):
            lost(name, doc)
    assert documents[0][1]["uid"] == child_uid and documents[-1][0] == "stop"
    lost_files = child_files(store, child_uid)
    assert lost_files
    deliver_documents(store, documents[:-3])
    journal = RunJournal(store.journal_folder, child_uid)
    journal.append_all(documents[:-2])
    journal.close()
    with open(journal.path, "ab") as file:
        file.write(b'["event", {"cut')
    assert not store.catalog[child_uid].metadata.get("stop")

    outcome = reduce_run(
        source.client, raw_uid, plan, store, identity, force=False, derived=False,
        child_uid=child_uid,
    )  # fmt: skip

    assert outcome.failed is None and outcome.saved == child_uid
    assert store.children(raw_uid) == [child_uid] and store.children(raw_uid)[0].succeeded
    assert len(store) == 1
    with reading_here():
        np.testing.assert_array_equal(
            store[child_uid]["primary"]["row_sums"].read(),
            np.asarray(source[raw_uid]["primary"]["cam"].read()).sum(axis=2),
        )
    assert child_files(store, child_uid) == lost_files  # written again, not beside
    assert journals_left(store) == []
    # Once complete, the same task again finds its run saved and does nothing.
    stop_uid = store[child_uid].stop["uid"]
    again = reduce_run(
        source.client, raw_uid, plan, store, identity, force=True, derived=False,
        child_uid=child_uid,
    )  # fmt: skip
    assert again.saved == child_uid and store[child_uid].stop["uid"] == stop_uid


# --- 5. what cannot travel to a worker is refused up front ------------------------------


def test_stores_and_sources_that_cannot_be_reopened_are_refused(raw_runs, tmp_path_factory):
    from tiled.client import from_context

    source, batch, _, _ = raw_runs
    in_process = AnalysisStore.open(tmp_path_factory.mktemp("unpicklable"), served=False)
    around_a_client = AnalysisStore(in_process.client)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with pytest.raises(AnalysisStoreError, match="cannot be opened again in another"):
            reprocess(source, batch[:1], [row_sums], around_a_client, executor=pool)
        app_client = from_context(in_process._context)
        with pytest.raises(AnalysisStoreError, match="served inside this process"):
            reprocess(app_client, batch[:1], [row_sums], in_process, executor=pool)
        with pytest.raises(AnalysisStoreError, match="executor must be"):
            reprocess(source, batch[:1], [row_sums], in_process, executor=object())
    assert len(in_process) == 0


# --- 6. the command line ------------------------------------------------------------------


def test_the_command_reprocesses_on_a_scheduler_and_refuses_bad_options(
    cluster, raw_runs, tmp_path_factory, monkeypatch
):
    import dask

    source, batch, _, _ = raw_runs
    folder = tmp_path_factory.mktemp("cli-store")
    monkeypatch.setenv("BLUESKY_ANALYSIS_STORE_SERVED", "1")  # as a user's folder is
    base = [
        "reprocess", batch[0], batch[1], "--reducer", "_offline_reducers:scaled_total",
        "--store", str(folder), "--source", source.location,
    ]  # fmt: skip
    try:
        address = cluster.scheduler_info()["address"]
        status, out, err = within(120, cluster, lambda: run_command(*base, "--scheduler", address))
        assert status == 0, err
        assert "2 saved" in out
        store = AnalysisStore.open(folder)
        assert all(len(store.children(uid)) == 1 for uid in batch[:2])

        status, _, err = run_command(*base, "--workers", "0")
        assert status == 2 and len(err.splitlines()) == 1
        assert "--workers" in err and "at least 1" in err
        status, _, err = run_command(*base, "--workers", "2", "--scheduler", "tcp://x:1")
        assert status == 2 and len(err.splitlines()) == 1
        assert "--scheduler" in err and "--workers" in err and "not allowed" in err
        with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
            status, _, err = run_command(*base, "--force", "--scheduler", "tcp://127.0.0.1:9")
        assert status == 2 and len(err.splitlines()) == 1, err
        assert "--scheduler: cannot connect to the Dask scheduler at 'tcp://127.0.0.1:9'" in err
    finally:
        stop_server(folder)
