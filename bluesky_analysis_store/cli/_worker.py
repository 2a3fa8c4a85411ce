"""``bluesky-analysis-store worker --zmq HOST:PORT``: reduce runs published over 0MQ.

The command's options are checked before anything is opened (a bad address or root map is
a usage error, an unimportable reducer names ``--reducers``); then the store is opened and
the worker listens until SIGINT or SIGTERM, closes its callback (delivering what it holds,
for at most a minute) and exits 0. Its one heavy import, bluesky's 0MQ dispatcher, happens
only here.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from typing import Any

from ._argument_types import key_format
from ._commands import _about, _check_formats
from ._exits import EXIT_OK
from ._opening import open_store

__all__ = [
    "WORKER_HELP",
    "add_worker_arguments",
    "cmd_worker",
    "positive_seconds",
    "root_map_entry",
    "zmq_address",
]

WORKER_HELP = (
    "reduce, on this machine, the runs a RunEngine elsewhere publishes over 0MQ "
    "(Publisher(PROXY_IN, serializer=zmq_dumps) into bluesky-0MQ-proxy): each run that "
    "starts after the worker listens gets its child run in the store, journaled and "
    "delivered as the live callback does; messages that are not documents in that "
    "encoding (pickles included) are logged and skipped; runs until SIGINT/SIGTERM"
)

_HOST_PORT = re.compile(r"^(?P<host>[^\s:/]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d+)$")


def zmq_address(text: str) -> str:
    """``HOST:PORT`` (or ``tcp://HOST:PORT``, or ``ipc:///path``) as a 0MQ endpoint."""
    text = text.strip()
    if text.startswith("ipc://"):
        if len(text) == len("ipc://"):
            raise argparse.ArgumentTypeError("expected ipc:///PATH, got 'ipc://'")
        return text
    rest = text.removeprefix("tcp://")
    match = _HOST_PORT.match(rest)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT of the 0MQ proxy's output side (e.g. localhost:5578), got {text!r}"
        )
    return f"tcp://{match['host']}:{int(match['port'])}"


def root_map_entry(text: str) -> tuple[str, str]:
    """``OLD=NEW``: two absolute paths, the raw data's root as the documents name it and
    where it is mounted here."""
    old, separator, new = text.partition("=")
    old, new = old.strip(), new.strip()
    if not separator or not old.startswith("/") or not new.startswith("/"):
        raise argparse.ArgumentTypeError(
            f"expected OLD=NEW, two absolute paths (e.g. /beamline/data=/mnt/data), got {text!r}"
        )
    return old.rstrip("/") or "/", new.rstrip("/") or "/"


def positive_seconds(text: str) -> float:
    """A number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def add_worker_arguments(worker: argparse.ArgumentParser) -> None:
    worker.add_argument(
        "--zmq",
        metavar="HOST:PORT",
        type=zmq_address,
        required=True,
        help="the output side of the 0MQ proxy (bluesky-0MQ-proxy's --out-address)",
    )
    worker.add_argument(
        "--reducers",
        metavar="MODULE:OBJECT",
        action="append",
        required=True,
        help="a reducer (function or Reducer) or a list of them, imported from MODULE; "
        "repeat for more",
    )
    worker.add_argument(
        "--root-map",
        metavar="OLD=NEW",
        type=root_map_entry,
        action="append",
        help="read raw files whose root (legacy resources) or path prefix (stream "
        "resources) is OLD under NEW instead, e.g. a shared file system mounted elsewhere; "
        "NEW must be a folder the store may read, where the store knows them; repeat for more",
    )
    worker.add_argument(
        "--writer",
        metavar="KEY=FORMAT",
        type=key_format,
        action="append",
        help="file format for a derived array key: HDF5, TIFF, NPY, inline or any "
        "registered format (default: HDF5 for arrays); repeat for more keys",
    )
    worker.add_argument(
        "--stream",
        metavar="NAME",
        action="append",
        help="a raw stream to reduce (default: primary); repeat for more",
    )
    worker.add_argument(
        "--run-timeout",
        metavar="SECONDS",
        type=positive_seconds,
        help="close a raw run's child run as failed once the raw run has sent nothing for "
        "SECONDS (its RunEngine died before the stop); choose it longer than any pause of "
        "your plans (default: never; runs still open when the worker stops are closed then)",
    )


def _reducers(names: Sequence[str]) -> list[Any]:
    """Each ``module:object``, imported; an object that is a list or tuple gives its items."""
    from .._provenance import resolve_code_name

    reducers: list[Any] = []
    for name in names:
        obj = resolve_code_name(name)
        reducers.extend(obj if isinstance(obj, (list, tuple)) else [obj])
    return reducers


def cmd_worker(args: argparse.Namespace) -> int:
    with _about("--reducers"):
        reducers = _reducers(args.reducers)  # before anything is opened
    _check_formats([fmt for _, fmt in args.writer or []], "--writer")
    root_map = dict(args.root_map or [])
    store = open_store(args)

    from .._remote_worker import RemoteWorker, check_root_map

    with _about("--root-map"):
        check_root_map(root_map, store)
    worker = RemoteWorker(
        args.zmq,
        reducers,
        store,
        streams=args.stream or ["primary"],
        writers=dict(args.writer) if args.writer else None,
        root_map=root_map,
        run_timeout=args.run_timeout,
    )
    # The listening line and the per-run summaries are what a service's log shows.
    worker_logger = logging.getLogger("bluesky_analysis_store._remote_worker")
    if worker_logger.level == logging.NOTSET:
        worker_logger.setLevel(logging.INFO)
    worker.stop_on_signals()
    worker.run()
    return EXIT_OK
