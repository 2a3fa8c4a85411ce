"""The subcommands: one function each, from the parsed arguments to an exit status."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._exits import EXIT_FAILED, EXIT_OK, CommandError
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
    print_json,
    print_show,
    run_summary,
    show_record,
    store_header,
    summary_text,
)


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
    client = store.client
    if args.children:
        parent_uid = find_parent_uid(store, args.children)
        uids = store.children(parent_uid)
        if args.limit:
            uids = uids[: args.limit]
        summaries = [run_summary(uid, store[uid]) for uid in uids]
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


def cmd_show(args: argparse.Namespace) -> int:
    store = open_store(args)
    run = find_run(store.client, args.uid)
    record = show_record(run_uid(run), run)
    if args.json:
        print_json(record)
    else:
        print_show(record)
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from .._plotting import plot_key

    store = open_store(args)
    run = find_run(store.client, args.uid)
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

    reducers = [resolve_code_name(name) for name in args.reducer]  # before opening anything
    store = open_store(args, create=args.source is not None)
    source = open_source(args, store)
    raw_uids = [run_uid(find_run(source.client, text)) for text in args.raw_uids]
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
    )
    print(report)
    for raw_uid, child_uid in report.saved.items():
        print(f"  saved {raw_uid}: child run {child_uid}")
    for raw_uid, child_uid in report.skipped.items():
        print(f"  already reduced {raw_uid}: child run {child_uid} (use --force for another)")
    for raw_uid, child_uid in report.failed_children.items():
        print(f"  FAILED {raw_uid}: every event failed; child run {child_uid} records why")
    return EXIT_FAILED if report.failed else EXIT_OK


def cmd_ingest(args: argparse.Namespace) -> int:
    from .._ingest import ingest
    from ..formats import formats

    formats[args.writer]  # a typo must not leave a new, empty store behind
    for path in args.paths:
        file_part = path.partition("::")[0]
        if not os.path.exists(file_part):
            raise CommandError(
                f"cannot ingest {os.path.abspath(file_part)!r}: no such file or folder"
            )
    store = open_store(args, create=True)
    uid = ingest(args.paths, _md(args.md), store, stream=args.stream, writer=args.writer)
    print(uid)
    return EXIT_OK


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .._reproduce import reproduce

    store = open_store(args)
    child_uid = run_uid(find_run(store.client, args.child_uid))
    source = open_source(args, store)
    report = reproduce(
        store,
        child_uid,
        source,
        trust_recorded_code=args.trust_recorded_code,
        rtol=args.rtol,
        atol=args.atol,
    )
    print(report)
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
