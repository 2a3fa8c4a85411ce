"""Fixtures shared by the tests.

Creating an embedded store runs tiled's catalog initialisation in a subprocess (seconds), so
one store is made per session and shared by every test that does not need a fresh one; tests
that share it use uids of their own and never count the runs of others. ``reader`` is a
second store object opened on the same folder: what it reads came from the disk, not from a
cache of the writing object.

A module whose tests need a store of their own uses ``store``: module-scoped, so each module
that asks for it gets its own (one per module, not one per test). The live tests get a fresh
``RE`` for every test, simulated devices, and callbacks on the module's store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _faults import TiledServer
from _live import DocumentRecorder
from bluesky import RunEngine
from bluesky.run_engine import TransitionError
from ophyd.sim import SynAxis

from bluesky_analysis_store import DATA_ROOT_ENV, STORE_ENV, AnalysisStore, AnalysisStoreCallback
from bluesky_analysis_store.sim import spot_camera

# The suite makes stores by the hundred, each used for seconds: serving each from a server
# process of its own (the default, made for stores opened again and again) would start one
# per folder. Stores are served in the test's process (and its subprocesses'), except where
# tests/test_local_server.py and the tests of the user-facing paths ask for the server.
os.environ.setdefault("BLUESKY_ANALYSIS_STORE_SERVED", "0")


@pytest.fixture(scope="session", autouse=True)
def _empty_catalog_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """New stores copy their empty catalog from a cache of the session's (shared by the
    xdist workers of one run), not the user's; the workers' fork server is the run's too."""
    from bluesky_analysis_store._catalog_template import CACHE_ENV

    os.environ[CACHE_ENV] = str(tmp_path_factory.getbasetemp().parent / "catalog-cache")
    from bluesky_analysis_store._forkserver import start_fork_server

    # Started at the first test, without waiting for it: the workers of the callbacks that
    # follow are forked rather than started from scratch.
    start_fork_server(timeout=None)


@pytest.fixture(scope="session", autouse=True)
def _stop_store_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Stop the local store servers and worker fork servers that tests (or the commands
    they ran) started."""
    yield
    from bluesky_analysis_store._forkserver import stop_fork_server
    from bluesky_analysis_store._local_server import SERVER_FILE, stop_server

    folders = [
        server_file.parent for server_file in tmp_path_factory.getbasetemp().rglob(SERVER_FILE)
    ]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # each waits for its server's exit
        list(pool.map(stop_server, folders))
    # The worker fork server of the run (shared by its xdist workers: one that is still
    # running tests starts another on its next callback).
    for fork_server in (tmp_path_factory.getbasetemp().parent / "catalog-cache").glob(
        "forkservers/*.sock"
    ):
        stop_fork_server(fork_server)


# --- the session's store ------------------------------------------------------------------


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the default data root and store at ``tmp_path``: nothing lands in the checkout."""
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "default-data"))
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "default-store"))
    return tmp_path


@pytest.fixture(scope="session")
def store_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared") / "store"


@pytest.fixture(scope="session")
def shared_store(store_folder: Path) -> AnalysisStore:
    """The session's embedded store (created once)."""
    return AnalysisStore.open(store_folder)


@pytest.fixture(scope="session")
def reader(shared_store: AnalysisStore, store_folder: Path) -> AnalysisStore:
    """A separate store object on the same folder, for reading back."""
    return AnalysisStore.open(store_folder)


# --- a store of the module's own ----------------------------------------------------------


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the module's raw frames are written: a folder ``store`` may read."""
    return tmp_path_factory.mktemp("raw")


@pytest.fixture(scope="module")
def module_store_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def store(
    request: pytest.FixtureRequest, module_store_folder: Path, raw_folder: Path
) -> Iterator[AnalysisStore]:
    """The module's own embedded store; the raw frames under ``raw_folder`` are readable.

    A module whose tests start many worker processes sets ``STORE_SERVED = True``: the store
    is then served by its local server, as a user's store is, and each worker opens it in a
    fraction of a second instead of importing tiled's server stack (the server's own start,
    seconds, is paid once).
    """
    from bluesky_analysis_store._local_server import stop_server

    served = getattr(request.module, "STORE_SERVED", False)
    yield AnalysisStore.open(module_store_folder, readable=[raw_folder], served=served)
    if served:
        stop_server(module_store_folder)


# --- a tiled server process of the module's own ------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TiledServer]:
    """A real ``tiled serve`` process over a catalog of the module's own (see _faults.py)."""
    server = TiledServer(tmp_path_factory.mktemp("tiled-server"))
    server.start()
    yield server
    server.stop()


# --- a live RunEngine, its devices and callbacks ------------------------------------------


@pytest.fixture
def RE() -> Iterator[RunEngine]:  # noqa: N802 - the name every bluesky user knows
    """A fresh RunEngine on an event loop of its own, halted and shut down afterwards."""
    loop = asyncio.new_event_loop()
    engine = RunEngine({}, loop=loop)
    yield engine
    if engine.state not in ("idle", "panicked"):
        try:
            engine.halt()
        except TransitionError:
            pass
    loop.call_soon_threadsafe(loop.stop)
    engine._th.join()
    loop.close()


@pytest.fixture
def runs_saved_in_store(RE: RunEngine, store: AnalysisStore) -> None:  # noqa: N803
    """Every run ``RE`` takes is saved into the module's store.

    A module whose tests need their raw runs in the store asks for it for every test,
    ``pytestmark = pytest.mark.usefixtures("runs_saved_in_store")``: fixtures named there are
    made first, so the store is subscribed before any recorder or callback.
    """
    RE.subscribe(store)


@pytest.fixture
def recorder(RE: RunEngine) -> DocumentRecorder:  # noqa: N803
    """Every document ``RE`` emits, as it emitted it."""
    recorder = DocumentRecorder()
    RE.subscribe(recorder)
    return recorder


@pytest.fixture
def motor() -> SynAxis:
    return SynAxis(name="motor")


@pytest.fixture
def cam_shape() -> tuple[int, int]:
    """The shape of ``cam``'s frames (a module may override it)."""
    return (32, 32)


@pytest.fixture
def cam(motor: SynAxis, raw_folder: Path, cam_shape: tuple[int, int]) -> Any:
    """A spot camera whose frame follows ``motor``; its frames are NPY files in ``raw_folder``."""
    return spot_camera(motor, str(raw_folder), shape=cam_shape)


@pytest.fixture(scope="module")
def _module_callbacks() -> Iterator[dict[str, AnalysisStoreCallback]]:
    made: dict[str, AnalysisStoreCallback] = {}
    yield made
    for callback in made.values():
        callback.close(timeout=60)


def _configuration(reducers: Any, kwargs: dict[str, Any]) -> str:
    """What makes two callbacks alike: their reducers and every option, defaults included."""
    bound = inspect.signature(AnalysisStoreCallback).bind(reducers, None, **kwargs)
    bound.apply_defaults()
    options = {k: v for k, v in bound.arguments.items() if k not in ("reducers", "store")}
    return repr((list(reducers), sorted(options.items())))


@pytest.fixture
def shared_callback(
    store: AnalysisStore,
    RE: RunEngine,  # noqa: N803
    _module_callbacks: dict[str, AnalysisStoreCallback],
):
    """Like ``make_callback``, but a callback of the same reducers and options is made once
    per module and serves every test that asks for one alike: one worker process for them
    all, not one each (a worker takes seconds to start and to stop). For tests that look
    only at the child runs of their own raw runs, not at the callback's life (closing,
    workers dying, what it abandons). Each test's ``RE`` is unsubscribed afterwards."""
    used: list[AnalysisStoreCallback] = []

    def make(reducers: Any, **kwargs: Any) -> AnalysisStoreCallback:
        key = _configuration(reducers, kwargs)
        if key not in _module_callbacks:
            _module_callbacks[key] = AnalysisStoreCallback(reducers, store, **kwargs)
        used.append(_module_callbacks[key])
        return _module_callbacks[key]

    yield make
    for callback in used:
        callback.unsubscribe(RE)
        assert callback.flush(timeout=60), "a shared callback did not finish a test's runs"


@pytest.fixture
def make_callback(store: AnalysisStore):
    """Build callbacks on the module's store; every one is closed (worker joined) afterwards."""
    made: list[AnalysisStoreCallback] = []

    def make(reducers: Any, **kwargs: Any) -> AnalysisStoreCallback:
        callback = AnalysisStoreCallback(reducers, store, **kwargs)
        made.append(callback)
        return callback

    yield make
    for callback in made:
        callback.close(timeout=60)


# --- the order modules run in ---------------------------------------------------------------

# pytest-xdist (``--dist loadfile --no-loadscope-reorder``, as the Makefile runs it) gives
# each free worker the next module in collection order. The modules that take longest (their
# times in a ``--durations=0`` run) go first, so that no long one starts last and ends the
# run alone while the other core idles. Without ``--no-loadscope-reorder`` xdist orders the
# modules by their number of tests instead.
_LONG_MODULES = (
    "test_distributed_reprocess.py",
    "test_callback.py",
    "test_outage.py",
    "test_cli.py",
    "test_serve.py",
    "test_worker_process.py",
    "test_reprocess.py",
    "test_reproduce.py",
    "test_remote_worker.py",
    "test_local_server.py",
    "test_watch.py",
    "test_forkserver.py",
    "test_delivery.py",
    "test_catalog_lock.py",
    "test_disk_full.py",
    "test_formats.py",
    "test_store.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return _LONG_MODULES.index(name) if name in _LONG_MODULES else len(_LONG_MODULES)

    items.sort(key=rank)  # stable: tests keep their order within a module


# --- a PostgreSQL cluster of the module's own -----------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[Any]:
    """A throwaway PostgreSQL 15 server on a free 127.0.0.1 port (see _postgres.py), with
    one empty database; ``postgres.uri()`` names it, ``postgres.createdb(name)`` makes more."""
    from _postgres import PostgresCluster

    with PostgresCluster() as cluster:
        yield cluster
