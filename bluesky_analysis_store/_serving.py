"""A tiled server over an analysis store, for many clients and many writers at once.

The store is a folder: derived files live under ``<folder>/assets``, which the server may
read, and arrays saved inline go under ``<folder>/data`` as zarr. The catalog and the event
tables live either in PostgreSQL (``database="postgresql://..."``: tiled's catalog through
asyncpg, its tables through ADBC, created when the database is empty) or in the folder's
embedded SQLite files, as :meth:`AnalysisStore.open` makes them.

An embedded folder keeps one writer: this server takes the folder's catalog lock around
every request, as the folder's own local server does (``_local_server``), so it, a local
server and processes serving the folder themselves take turns. PostgreSQL serialises its
own writers, so a PostgreSQL-backed server takes no lock, and several server processes may
share one database (with a Redis streaming cache between them).

Only the folder's ``assets`` and the ``read`` folders are served: tiled refuses to read any
other file a run names. Every request needs the API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ._errors import AnalysisStoreError

__all__ = [
    "STREAMING_MEMORY",
    "ServerSettings",
    "build_server_app",
    "check_database_uri",
    "check_streaming_uri",
    "redacted",
    "serve",
]

logger = logging.getLogger(__name__)

STREAMING_MEMORY = "memory"
"""The streaming cache of one server process (several need ``redis://``)."""

_POSTGRES_SCHEMES = ("postgresql", "postgres")
_STREAMING_SCHEMES = ("redis", "rediss")


def check_database_uri(uri: str) -> str:
    """``uri`` as ``postgresql://[user[:password]@]host[:port]/database``, or
    :class:`AnalysisStoreError` saying what is wrong with it."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in _POSTGRES_SCHEMES:
        raise AnalysisStoreError(
            f"--database must be a postgresql:// URI (postgresql://USER@HOST:PORT/DATABASE), "
            f"not {redacted(uri)!r}"
        )
    if not parts.path.strip("/"):
        raise AnalysisStoreError(
            f"--database {redacted(uri)!r} names no database: end it with /DATABASE"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as error:
        raise AnalysisStoreError(f"--database {redacted(uri)!r}: {error}") from None
    return urlunsplit(("postgresql", *parts[1:]))


def check_streaming_uri(uri: str) -> str:
    """``memory`` or a ``redis://`` / ``rediss://`` URI, else :class:`AnalysisStoreError`."""
    if uri == STREAMING_MEMORY or urlsplit(uri).scheme in _STREAMING_SCHEMES:
        return uri
    raise AnalysisStoreError(
        f"--streaming must be 'memory' (one server process) or a redis:// URI (several), "
        f"not {redacted(uri)!r}"
    )


def redacted(uri: str) -> str:
    """``uri`` without its password, for logs and messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class ServerSettings:
    """What a server over an analysis store serves, and where it listens."""

    folder: Path
    """The store's folder: ``assets`` (served), ``data`` (inline arrays) and, without
    ``database``, the embedded ``catalog.db`` and ``tables.db``."""
    api_key: str
    """The single key every request must carry."""
    database: str | None = None
    """``postgresql://...`` for the catalog and the event tables; None: the folder's SQLite."""
    read: tuple[Path, ...] = ()
    """More folders whose files the server may read (raw data that runs refer to)."""
    streaming: str | None = None
    """tiled's streaming cache: ``memory``, a ``redis://`` URI, or None for none."""
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self) -> None:
        if not self.api_key:
            raise AnalysisStoreError("a server needs an API key")
        if not self.api_key.isascii() or not self.api_key.isalnum():
            # tiled refuses it at startup: a key pasted into a URL must mean one thing.
            raise AnalysisStoreError(
                "the API key must be letters and digits only (make one with `openssl rand -hex 32`)"
            )
        object.__setattr__(self, "folder", Path(self.folder).absolute())
        object.__setattr__(self, "read", tuple(Path(p).absolute() for p in self.read))
        if self.database is not None:
            object.__setattr__(self, "database", check_database_uri(self.database))
        if self.streaming is not None:
            check_streaming_uri(self.streaming)
        for folder in self.read:
            if not folder.is_dir():
                raise AnalysisStoreError(f"--read {folder}: no such folder")

    @property
    def assets(self) -> Path:
        return self.folder / "assets"

    @property
    def readable(self) -> list[str]:
        """The folders whose files the server may serve: the assets and ``read``."""
        return [str(self.assets), *(str(folder) for folder in self.read)]

    def describe(self) -> str:
        """What is served, in a few words, for the server's log."""
        catalog = (
            f"catalog and tables in {redacted(self.database)}"
            if self.database
            else f"embedded catalog {self.folder / 'catalog.db'}"
        )
        streaming = (
            f"streaming cache {redacted(self.streaming)}" if self.streaming else "no streaming"
        )
        return (
            f"the analysis store {self.folder} ({catalog}; files under "
            f"{', '.join(self.readable)}; {streaming}; API key required)"
        )


def _cache_config(settings: ServerSettings) -> dict[str, Any] | None:
    if settings.streaming is None:
        return None
    from tiled.config import StreamingCacheConfig

    return StreamingCacheConfig(uri=settings.streaming).model_dump()


def _check_reachable(database: str) -> None:
    """Refuse at once a database server that does not answer, rather than after tiled's
    catalog initialisation has retried for seconds."""
    parts = urlsplit(database)
    if not parts.hostname or parts.hostname.startswith("/"):
        return  # a unix socket, or libpq's defaults: left to tiled
    try:
        with socket.create_connection((parts.hostname, parts.port or 5432), timeout=10):
            pass
    except OSError as error:
        raise AnalysisStoreError(
            f"cannot reach the PostgreSQL server of --database {redacted(database)}: {error}"
        ) from None


def catalog_is_current(uri: str) -> bool:
    """Whether the database at ``uri`` (an async SQLAlchemy URI) holds a catalog of the
    revision this tiled needs. tiled's ``init_if_not_exists`` runs ``tiled catalog init`` in
    a subprocess at every start (seconds of imports), even for a catalog made long ago; it
    is asked for only when this says no (an empty database, an older revision, an error)."""
    from sqlalchemy.ext.asyncio import create_async_engine
    from tiled.alembic_utils import check_database
    from tiled.catalog.core import ALL_REVISIONS, REQUIRED_REVISION

    async def check() -> bool:
        engine = create_async_engine(uri)
        try:
            await check_database(engine, REQUIRED_REVISION, ALL_REVISIONS)
        except Exception:  # not there, older, unreadable: tiled's init says which
            return False
        finally:
            await engine.dispose()
        return True

    return asyncio.run(check())


def _postgres_app(settings: ServerSettings) -> Any:
    from tiled.catalog import from_uri

    from ._store import _CATALOG_SPECS
    from ._tiled_app import build_store_app

    assert settings.database is not None
    uri = f"postgresql+asyncpg://{settings.database.split('://', 1)[1]}"
    try:
        # An empty database gets tiled's tables; a catalog of this revision is reused.
        adapter = from_uri(
            uri,
            init_if_not_exists=not catalog_is_current(uri),
            specs=_CATALOG_SPECS,
            writable_storage=[str(settings.folder / "data"), settings.database],
            readable_storage=settings.readable,
            cache_config=_cache_config(settings),
        )
    except Exception as error:  # tiled's init subprocess: the server's own words
        detail = " ".join(str(error).split())[-300:]
        raise AnalysisStoreError(
            f"cannot open the catalog in {redacted(settings.database)}: {detail}"
        ) from None
    return build_store_app(adapter, api_key=settings.api_key)


def _embedded_app(settings: ServerSettings) -> Any:
    from ._catalog_lock import LOCK_FILE
    from ._local_server import _OneRequestAtATime, is_alive, read_server_info
    from ._store import build_embedded_app

    local = read_server_info(settings.folder)
    if local is not None and is_alive(local.pid):
        logger.info(
            "the folder's local store server (pid %d) serves it too: the two take turns on "
            "its lock, one writer at a time",
            local.pid,
        )
    app = build_embedded_app(
        settings.folder,
        settings.readable,
        api_key=settings.api_key,
        cache_config=_cache_config(settings),
    )
    return _OneRequestAtATime(app, settings.folder / LOCK_FILE)


def build_server_app(settings: ServerSettings) -> Any:
    """The ASGI app serving the store ``settings`` describe (its catalog made if needed)."""
    if settings.database is not None:
        _check_reachable(settings.database)  # before anything is made
    for name in ("assets", "data"):
        (settings.folder / name).mkdir(parents=True, exist_ok=True)
    if settings.database is not None:
        return _postgres_app(settings)
    return _embedded_app(settings)


def _listening_socket(host: str, port: int) -> socket.socket:
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0]
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so (see
        # docs/decisions/0008).
        sock = socket.socket(family, kind, protocol)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
    except OSError as error:
        raise AnalysisStoreError(f"cannot listen on {host}:{port}: {error}") from None
    return sock


@contextlib.contextmanager
def _stopping_quietly() -> Iterator[None]:
    """SIGINT and SIGTERM stop the server (uvicorn's handlers, installed over these) and
    then end this function normally: uvicorn raises the signal again once it has stopped,
    which reaches these handlers, not Python's KeyboardInterrupt or death by SIGTERM."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(settings: ServerSettings) -> None:
    """Serve the store in the foreground until SIGINT or SIGTERM."""
    import uvicorn

    # The port first: a port in use is said at once, not after the catalog is opened.
    sock = _listening_socket(settings.host, settings.port)
    try:
        app = build_server_app(settings)
        host, port = sock.getsockname()[:2]
        config = uvicorn.Config(app, lifespan="on", access_log=False, log_config=None)
        server = uvicorn.Server(config)
        shown_host = f"[{host}]" if ":" in host else host
        logger.info("listening on http://%s:%d, serving %s", shown_host, port, settings.describe())
        with _stopping_quietly():
            server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise AnalysisStoreError(
            "the server did not start (its catalog could not be opened; run with -vv for "
            "tiled's log)"
        )
    logger.info("stopped serving %s", settings.folder)
