"""One tiled server process per embedded store folder, started on demand, shared by every
process that opens the folder.

Serving a catalog inside a process costs seconds before the first request: importing
tiled's server stack (the catalog adapter pulls in dask.dataframe, pandas, xarray, awkward,
redis and fastapi) and building the app. A command-line call, a notebook opening the store
and the live callback's worker process would each pay that again. So the first process that
opens a folder starts a server for it (``python -m bluesky_analysis_store._local_server``,
detached, logging to ``<folder>/server.log``), and every process after it talks to that one
over HTTP on localhost, importing only tiled's client. The server also makes the embedded
store's writer one process: it runs one request at a time, holding the catalog lock of
``_catalog_lock`` around each (shared for reads, exclusive for writes), so processes that
serve the folder themselves (``served=False``) still take turns with it.

The server listens on 127.0.0.1 only and requires the folder's API key, kept in
``<folder>/server.key`` (mode 0600: only its owner can connect). What it serves is the
folder's catalog, with the folders ``store.json`` lets it read. ``<folder>/server.json``
names its pid and port. It exits on SIGTERM, after ``$BLUESKY_ANALYSIS_STORE_IDLE`` seconds
(default 1800) without requests, when its catalog is deleted, or, idle for a few seconds,
once another server has taken its place (a newer version of this package, or more readable
folders). A client whose server went away starts a new one on its next request (see
:class:`ServerTransport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from ._errors import AnalysisStoreError
from ._forkserver import ForkedProcess, fork_local_server

__all__ = [
    "IDLE_ENV",
    "SERVED_ENV",
    "ServerInfo",
    "ServerTransport",
    "ensure_server",
    "is_alive",
    "read_server_info",
    "served_by_default",
    "stop_server",
]

logger = logging.getLogger(__name__)

SERVED_ENV = "BLUESKY_ANALYSIS_STORE_SERVED"
"""``0`` makes :meth:`AnalysisStore.open` serve the catalog inside the process instead."""
IDLE_ENV = "BLUESKY_ANALYSIS_STORE_IDLE"
"""Seconds a store server without requests stays up (default 1800)."""

SERVER_FILE = "server.json"
KEY_FILE = "server.key"
LOG_FILE = "server.log"
_START_LOCK = "server-start.lock"
_DEFAULT_IDLE = 1800.0
_STARTUP_TIMEOUT = 120.0  # creating a catalog runs tiled's migrations in a subprocess
_RETIRE_AFTER_IDLE = 5.0  # seconds a replaced server waits for its last clients


def served_by_default() -> bool:
    if os.environ.get(SERVED_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        import fcntl  # noqa: F401 - the server's catalog lock needs flock
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class ServerInfo:
    """What ``server.json`` says of the folder's server."""

    pid: int
    port: int
    version: str
    python: str
    readable: tuple[str, ...]

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"


def read_server_info(folder: Path) -> ServerInfo | None:
    """The folder's server as ``server.json`` names it, or None (none, or a damaged file)."""
    try:
        raw = json.loads((folder / SERVER_FILE).read_text())
        return ServerInfo(
            pid=int(raw["pid"]),
            port=int(raw["port"]),
            version=str(raw["version"]),
            python=str(raw["python"]),
            readable=tuple(str(path) for path in raw["readable"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_server_info(folder: Path, info: ServerInfo) -> None:
    temporary = folder / f".{SERVER_FILE}.{os.getpid()}"
    temporary.write_text(json.dumps(asdict(info), indent=2) + "\n")
    os.replace(temporary, folder / SERVER_FILE)


def api_key(folder: Path) -> str:
    """The folder's API key, made on first use (readable by its owner only)."""
    path = folder / KEY_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    key = secrets.token_hex(32)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text().strip()
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    return key


def is_alive(pid: int) -> bool:
    # A server this process started and that died is a zombie until reaped: reap it.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


@functools.cache  # the code of this process does not change while it runs
def server_version() -> str:
    """This package's version and a digest of the code a server runs: a server started by
    other code (an upgrade, an edited checkout) is replaced rather than used."""
    import hashlib
    from importlib import metadata

    try:
        version = metadata.version("bluesky-analysis-store")
    except metadata.PackageNotFoundError:
        version = "unknown"
    digest = hashlib.sha256()
    for module in ("_local_server.py", "_store.py", "_catalog_lock.py"):
        digest.update((Path(__file__).parent / module).read_bytes())
    return f"{version}+{digest.hexdigest()[:12]}"


def _suits(info: ServerInfo | None, readable: Sequence[str]) -> bool:
    return (
        info is not None
        and info.version == server_version()
        and info.python == sys.executable
        and set(readable) <= set(info.readable)
        and is_alive(info.pid)
        and _answers(info.port)
    )


@contextlib.contextmanager
def _start_lock(folder: Path) -> Iterator[None]:
    import fcntl

    descriptor = os.open(folder / _START_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def ensure_server(folder: Path, readable: Sequence[str]) -> ServerInfo:
    """The folder's running server, started first if there is none that serves this version
    of the package and may read ``readable``."""
    info = read_server_info(folder)
    if _suits(info, readable):
        return info  # type: ignore[return-value]
    with _start_lock(folder):  # two processes opening the folder at once start one server
        info = read_server_info(folder)
        if _suits(info, readable):
            return info  # type: ignore[return-value]
        return _start(folder, previous=info)


def _start(folder: Path, previous: ServerInfo | None) -> ServerInfo:
    logger.info("starting the store server of %s (once; it takes a few seconds)", folder)
    api_key(folder)
    log = open(folder / LOG_FILE, "ab")  # noqa: SIM115 - handed to the server process
    try:
        argv = [str(folder)]
        if previous is not None:
            argv += ["--port", str(previous.port)]  # clients keep their URL if it is free
        # Forked, with tiled's server imported already, where a session has started the
        # fork server of this code (_forkserver.py); started from scratch otherwise.
        process: Any = fork_local_server(argv, log.fileno())
        if process is None:
            process = subprocess.Popen(
                [sys.executable, "-m", "bluesky_analysis_store._local_server", *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the session must not stop the server
                close_fds=True,
            )
    finally:
        log.close()
    try:
        return _wait_until_ready(folder, process)
    finally:
        if isinstance(process, ForkedProcess):
            process.release()


def _wait_until_ready(folder: Path, process: Any) -> ServerInfo:
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise AnalysisStoreError(
                f"the store server of {folder} exited with code {code} before it was ready; "
                f"its log {folder / LOG_FILE} ends:\n{_log_tail(folder)}"
            )
        info = read_server_info(folder)
        if info is not None and info.pid == process.pid and _answers(info.port):
            return info
        time.sleep(0.05)
    process.kill()
    raise AnalysisStoreError(
        f"the store server of {folder} was not ready within {_STARTUP_TIMEOUT:.0f} s; its "
        f"log {folder / LOG_FILE} ends:\n{_log_tail(folder)}"
    )


def _log_tail(folder: Path, lines: int = 20) -> str:
    try:
        return "\n".join((folder / LOG_FILE).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_server(folder: str | os.PathLike[str], timeout: float = 10.0) -> bool:
    """Stop the folder's store server (SIGTERM, then SIGKILL after ``timeout``); whether
    there was one running."""
    info = read_server_info(Path(folder))
    if info is None or not is_alive(info.pid):
        return False
    os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while is_alive(info.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(info.pid):
        os.kill(info.pid, signal.SIGKILL)
    return True


class ServerTransport(httpx.BaseTransport):
    """A client's transport to the folder's server, which starts a new server when the one
    it talked to is gone (stopped after being idle, killed, or replaced) and sends the
    request again, to the new one's port if it had to change."""

    def __init__(self, inner: httpx.BaseTransport, folder: Path, readable: Sequence[str]):
        self.inner = inner
        self.folder = folder
        self.readable = list(readable)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return self.inner.handle_request(request)
        except httpx.ConnectError:
            info = ensure_server(self.folder, self.readable)
            if request.url.port != info.port:
                request.url = request.url.copy_with(port=info.port)
            return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


# --- the server process ---------------------------------------------------------------------


class _OneRequestAtATime:
    """ASGI middleware: one request at a time, each holding the folder's catalog lock
    (``flock``: shared to read, exclusive to write), and the time of the last request.

    One at a time because tiled reaches ``tables.db`` through ADBC connections without a
    busy timeout, which fail on meeting another connection's transaction, in this process as
    in another (see ``_catalog_lock``)."""

    def __init__(self, app: Any, lock_path: Path) -> None:
        self.app = app
        self._lock = asyncio.Lock()
        self._descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        self.last_request = time.monotonic()
        self.in_flight = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":  # a subscriber (watch): the server is in use
            self.in_flight += 1
            try:
                await self.app(scope, receive, send)
            finally:
                self.in_flight -= 1
                self.last_request = time.monotonic()
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        import fcntl

        from ._catalog_lock import READING_METHODS

        mode = fcntl.LOCK_SH if scope["method"] in READING_METHODS else fcntl.LOCK_EX
        self.in_flight += 1
        try:
            async with self._lock:
                # Another process serving the folder itself may hold it: wait off the loop.
                await asyncio.to_thread(fcntl.flock, self._descriptor, mode)
                try:
                    await self.app(scope, receive, send)
                finally:
                    fcntl.flock(self._descriptor, fcntl.LOCK_UN)
        finally:
            self.in_flight -= 1
            self.last_request = time.monotonic()


def _bind(port: int | None) -> socket.socket:
    for candidate in ([port] if port else []) + [0]:
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and
        # without it every reply on a kept-alive connection waits 40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", candidate))
        except OSError:
            sock.close()
            continue
        sock.listen(128)
        return sock
    raise OSError("no free port on 127.0.0.1")  # bind to port 0 does not fail this way


async def _watch(server: Any, app: _OneRequestAtATime, folder: Path, idle_limit: float) -> None:
    """Stop the server once idle for ``idle_limit``, or its catalog is gone, or another
    server has replaced it and its last clients are done."""
    while not server.should_exit:
        await asyncio.sleep(1.0)
        idle = time.monotonic() - app.last_request if not app.in_flight else 0.0
        info = read_server_info(folder)
        replaced = info is None or info.pid != os.getpid()
        if not (folder / "catalog.db").is_file():
            logger.info("the catalog of %s is gone: stopping", folder)
        elif idle > idle_limit:
            logger.info("no request for %.0f s: stopping", idle)
        elif replaced and idle > _RETIRE_AFTER_IDLE:
            logger.info("another server serves %s now: stopping", folder)
        else:
            continue
        server.should_exit = True


# tiled's streaming cache, in memory (one server process): clients subscribed over websockets
# (``watch``) are told of new runs and rows. Data is kept for a subscriber that asks to start
# from earlier for two minutes: a live view's needs, not an archive's.
_STREAMING = {"uri": "memory", "data_ttl": 120}


def import_ahead() -> None:
    """Import what serving a folder needs (seconds: tiled's server and catalog), as a fork
    server does before it forks a server."""
    import uvicorn  # noqa: F401
    from tiled.catalog import from_uri  # noqa: F401
    from tiled.server.app import build_app  # noqa: F401

    from . import _store, _tiled_app  # noqa: F401


def serve(folder: Path, port: int | None = None) -> None:
    import uvicorn

    from ._store import build_embedded_app, readable_folders

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    readable = readable_folders(folder)
    key = api_key(folder)
    app = _OneRequestAtATime(
        build_embedded_app(folder, readable, api_key=key, cache_config=_STREAMING),
        folder / "write.lock",
    )
    sock = _bind(port)
    config = uvicorn.Config(app, lifespan="on", access_log=False, log_config=None)
    server = uvicorn.Server(config)
    info = ServerInfo(
        pid=os.getpid(),
        port=sock.getsockname()[1],
        version=server_version(),
        python=sys.executable,
        readable=tuple(readable),
    )
    idle_limit = float(os.environ.get(IDLE_ENV) or _DEFAULT_IDLE)

    async def run() -> None:
        # Connections made before uvicorn accepts wait in the socket's backlog.
        _write_server_info(folder, info)
        logger.info("serving %s on port %d (pid %d)", folder, info.port, info.pid)
        watcher = asyncio.ensure_future(_watch(server, app, folder, idle_limit))
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()
            current = read_server_info(folder)
            if current is not None and current.pid == os.getpid():
                with contextlib.suppress(OSError):
                    (folder / SERVER_FILE).unlink()

    asyncio.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bluesky_analysis_store._local_server",
        description="Serve an embedded analysis store's folder on localhost (started on "
        "demand by AnalysisStore.open; not meant to be run by hand).",
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--port", type=int, default=None, help="port to try first")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the session's Ctrl-C is not for us
    serve(args.folder.absolute(), args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
