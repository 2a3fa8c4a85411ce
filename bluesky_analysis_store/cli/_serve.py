"""``serve``: a tiled server over the analysis store, for many clients and writers."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .._serving import STREAMING_MEMORY
from ._exits import EXIT_OK, CommandError
from ._opening import API_KEY_ENV, is_uri, store_location

__all__ = ["add_serve_arguments", "cmd_serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

SERVE_HELP = (
    "serve the analysis store to other machines and processes: a tiled server over the "
    "store's folder, its catalog and event tables in PostgreSQL (--database) or in the "
    "folder's embedded SQLite files (one writer at a time); only the folder's assets and "
    "--read folders are served, and every request needs the API key"
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database",
        metavar="postgresql://USER@HOST:PORT/DB",
        help="keep the catalog and the event tables in this PostgreSQL database (its tables "
        "are made when it is empty), for many concurrent writers and several server "
        "processes; default: the store folder's embedded catalog.db and tables.db",
    )
    parser.add_argument(
        "--read",
        metavar="FOLDER",
        action="append",
        type=Path,
        default=[],
        help="a folder of raw data that runs refer to, which the server may also read; "
        "repeat for more (nothing else outside STORE/assets is served)",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"the address to listen on (default: {DEFAULT_HOST}, this machine only; "
        "0.0.0.0 exposes the server to every network the machine is on)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"the port to listen on (default: {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--streaming",
        metavar="URI",
        nargs="?",
        const=STREAMING_MEMORY,
        help="tell websocket subscribers of new runs and rows (tiled's streaming cache): "
        f"'{STREAMING_MEMORY}' (the default when the option is given without URI) for one "
        "server process, redis://HOST:PORT for several sharing one database",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from .._serving import ServerSettings, serve

    location = store_location(args)
    if is_uri(location):
        raise CommandError(
            f"serve needs the store's folder, not a server's URI ({location}): give --store FOLDER"
        )
    api_key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV)
    if not api_key:
        raise CommandError(
            f"serve needs an API key, which every client must give: pass --api-key KEY or "
            f"set ${API_KEY_ENV} (there is no default key)"
        )
    folder = Path(location).absolute()
    if folder.exists() and not folder.is_dir():
        raise CommandError(f"cannot serve an analysis store at {folder}: it is a file")
    settings = ServerSettings(
        folder=folder,
        api_key=api_key,
        database=args.database,
        read=tuple(args.read),
        streaming=args.streaming,
        host=args.host,
        port=args.port,
    )
    # The one line saying where the server listens, and its stop, whatever the verbosity.
    logging.getLogger("bluesky_analysis_store._serving").setLevel(logging.INFO)
    serve(settings)
    return EXIT_OK
