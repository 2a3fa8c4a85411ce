"""The subcommands: one function each, from the parsed arguments to an exit status."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from .._errors import MetadataError
from .._replay import start_document
from ._exits import (
    EXIT_FAILED,
    EXIT_OK,
    CommandError,
    command_line_text,
    error_text,
    user_errors,
)
from ._opening import (
    find_parent_uid,
    find_run,
    is_uri,
    open_source,
    open_store,
    run_uid,
    store_location,
)
from ._presenting import (
    lineage_lines,
    lineage_record,
    print_json,
    print_show,
    reprocess_lines,
    run_summary,
    show_record,
    store_header,
    summary_text,
)

# Loggers whose ERROR records are one per failed event or run: the command prints them once,
# summarised, in its report (with --verbose they are logged one by one too).
_SUMMARISED_LOGGERS = ("bluesky_analysis_store._reduction", "bluesky_analysis_store._reprocess")


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _failures_summarised(args: argparse.Namespace) -> Iterator[None]:
    """While a reduction runs: its failures go into the report the command prints, not one
    traceback per event on stderr, unless ``--verbose``."""
    if getattr(args, "verbose", 0):
        yield
        return
    quiet = _BelowError()
    loggers = [logging.getLogger(name) for name in _SUMMARISED_LOGGERS]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


@contextlib.contextmanager
def _about(option: str, *only: type[BaseException]) -> Iterator[None]:
    """A user's mistake raised here (of the types ``only``, if given) is about ``option``
    (``UID``, ``--reducer``): its one line names it first, so the user knows what to fix."""
    try:
        yield
    except Exception as error:
        if not isinstance(error, user_errors()) or (only and not isinstance(error, only)):
            raise
        raise CommandError(f"{option}: {error_text(error)}") from error


def _check_source(args: argparse.Namespace) -> None:
    """``--source`` names a store that exists (it is never created)."""
    source = getattr(args, "source", None)
    if source is None or is_uri(source):
        return
    folder = os.path.abspath(os.path.expanduser(source))
    if not os.path.isfile(os.path.join(folder, "catalog.db")):
        what = "has no catalog.db" if os.path.isdir(folder) else "does not exist"
        raise CommandError(f"--source: no analysis store at {folder}: the folder {what}")


def _check_formats(names: Sequence[str], option: str) -> None:
    """Format names are checked before a store is opened or a file is written."""
    from ..formats import formats

    with _about(option):
        for name in names:
            if name.lower() != "inline":
                formats[name]


def _md(pairs: Sequence[tuple[str, Any]] | None) -> dict[str, Any] | None:
    return dict(pairs) if pairs else None


def cmd_demo(args: argparse.Namespace) -> int:
    from .._demo import run_demo

    location = store_location(args)
    if is_uri(location):
        raise CommandError("the demo writes into a local folder; give --store PATH, not a URI")
    run_demo(location, plot_path=args.plot, points=args.points, out=sys.stdout)
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    store = open_store(args)
    # Plain nodes: listing runs needs their metadata only, not bluesky-tiled-plugins' run
    # client (a second or two to import).
    client = store.catalog
    if args.current and not args.children:
        raise CommandError("--current lists the current results of one run: add --children RAW_UID")
    if args.children:
        with _about("--children"):
            parent_uid = find_parent_uid(store, args.children)
        children = store.children(parent_uid, current=args.current)
        if args.limit:
            children = children[: args.limit]
        summaries = [run_summary(child, client[child], current=child.current) for child in children]
    else:
        newest_first = client.sort(("start.time", -1)).items()
        items = newest_first[: args.limit] if args.limit else list(newest_first)
        summaries = [run_summary(uid, run) for uid, run in items]
    if args.json:
        print_json(summaries)
        return EXIT_OK
    if not args.children:
        print(store_header(store))
    if not summaries:
        print(f"run {parent_uid} has no derived runs" if args.children else "the store is empty")
    else:
        for summary in summaries:
            print(summary_text(summary))
    return EXIT_OK


def cmd_lineage(args: argparse.Namespace) -> int:
    store = open_store(args)
    with _about("UID"):
        found = store.lineage(args.uid, max_depth=args.depth)
    if args.json:
        print_json(
            {
                "uid": found.uid,
                "parents": lineage_record(found.ancestry)["links"],
                "children": lineage_record(found.descent)["links"],
            }
        )
    else:
        print("# where it came from (<- its parents)")
        for line in lineage_lines(found.ancestry, "<-"):
            print(line)
        if not found.ancestry.links and found.ancestry.run is not None:
            print("   (no parents: raw data, or saved without them)")
        print("# what was derived from it (-> its children)")
        for line in lineage_lines(found.descent, "->"):
            print(line)
        if not found.descent.links:
            print("   (no run derived from it in this store)")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .._export import export_nexus, export_ro_crate

    store = open_store(args)
    output = os.path.expanduser(os.path.expandvars(args.output))
    with _about("UID"):
        uid = store.resolve_parent_uid(args.uid)
    with _about("--output", FileExistsError):
        if args.format == "ro-crate":
            written = export_ro_crate(store, uid, output)
        else:
            written = export_nexus(store, uid, output)
    print(f"exported {uid} as {args.format}: {written}")
    return EXIT_OK


def cmd_pin(args: argparse.Namespace) -> int:
    store = open_store(args)
    with _about("CHILD_UID"):
        child = store.unpin(args.uid) if args.clear else store.pin(args.uid)
    reducer = ", ".join(child.reducer) or "(no code)"
    # The plain node's metadata: the run client (bluesky-tiled-plugins) takes a second to import.
    start = store.catalog[child].metadata.get("start") or {}
    parents = ", ".join(start.get("parent_uids") or [])
    if args.clear:
        print(
            f"{child}  unpinned; the current {reducer} result is the one pinned most recently, "
            "else the newest that succeeded"
        )
    else:
        print(f"{child}  pinned: the current {reducer} result of {parents}")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    store = open_store(args)
    with _about("UID"):
        run = find_run(store.catalog, args.uid)
    record = show_record(run_uid(run), run)
    if args.json:
        print_json(record)
    else:
        print_show(record)
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from .._plotting import plot_key

    store = open_store(args)
    with _about("UID"):
        run = find_run(store.catalog, args.uid)
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise CommandError(f"cannot write {args.output!r}: folder {folder} does not exist")
    path = plot_key(
        run,
        args.key,
        args.output,
        stream=args.stream,
        index=args.index,
        x_key=args.x,
        x_stream=args.x_stream,
        size=args.size,
        dpi=args.dpi,
    )
    print(os.path.abspath(path))
    return EXIT_OK


def cmd_reprocess(args: argparse.Namespace) -> int:
    from .._provenance import resolve_code_name
    from .._reprocess import reprocess
    from ._cluster import reprocess_executor

    with _about("--reducer"):
        reducers = [resolve_code_name(name) for name in args.reducer]  # before opening anything
    _check_formats([fmt for _, fmt in args.writer or []], "--writer")
    _check_source(args)
    store = open_store(args, create=args.source is not None)
    source = open_source(args, store)
    with _about("RAW_UID"):
        raw_uids = [run_uid(find_run(source.client, text)) for text in args.raw_uids]
    with (
        reprocess_executor(args) as executor,
        _failures_summarised(args),
        _about("--md", MetadataError),
    ):
        report = reprocess(
            source,
            list(dict.fromkeys(raw_uids)),
            reducers,
            store,
            streams=args.stream or ["primary"],
            writers=dict(args.writer) if args.writer else None,
            md=_md(args.md),
            force=args.force,
            derived=args.derived,
            executor=executor,
        )
    print("\n".join(reprocess_lines(report)))
    return EXIT_FAILED if report.failed else EXIT_OK


def cmd_ingest(args: argparse.Namespace) -> int:
    from .._errors import DataValueError, IngestError
    from .._ingest import DATASET_SEPARATOR, check_ingest_stream, expand_input_path, ingest

    _check_formats([args.writer], "--writer")  # a typo must not leave a new, empty store
    with _about("--stream"):
        check_ingest_stream(args.stream)
    for path in args.paths:
        file_part = expand_input_path(path.partition(DATASET_SEPARATOR)[0])
        if not os.path.exists(file_part):
            raise CommandError(f"PATH: cannot ingest {file_part!r}: no such file or folder")
    store = open_store(args, create=True)
    with _about("--md", MetadataError), _about("PATH", IngestError, DataValueError):
        uid = ingest(args.paths, _md(args.md), store, stream=args.stream, writer=args.writer)
    print(uid)
    return EXIT_OK


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .._reproduce import reproduce

    _check_source(args)
    store = open_store(args)
    with _about("CHILD_UID"):
        child = find_run(store.client, args.child_uid)
    child_uid = run_uid(child)
    if not start_document(child).get("provenance"):
        raise CommandError(
            f"CHILD_UID: run {child_uid} has no provenance record: it is not a derived run, "
            "there is nothing to reproduce"
        )
    source = open_source(args, store)
    with _failures_summarised(args):
        report = reproduce(
            store,
            child_uid,
            source,
            trust_recorded_code=args.trust_recorded_code,
            rtol=args.rtol,
            atol=args.atol,
        )
    print(command_line_text(str(report)))
    return EXIT_OK if report.reproduced else EXIT_FAILED


def cmd_recover(args: argparse.Namespace) -> int:
    from .._recovery import recover

    store = open_store(args)
    folder = os.path.expanduser(args.journal) if args.journal else store.journal_folder
    if args.journal and not os.path.isdir(folder):
        raise CommandError(f"no journal folder {folder!r}")
    report = recover(store, folder)
    for uid in report.delivered:
        closed = " (closed as interrupted)" if uid in report.closed else ""
        print(f"{uid}  delivered{closed}")
    for uid in report.live:
        print(f"{uid}  in use by a running process: left alone")
    for uid, error in report.failed.items():
        print(f"{uid}  not delivered: {error}", file=sys.stderr)
    print(f"recover: {report} (journal {folder})")
    return EXIT_OK if report.ok else EXIT_FAILED
