"""The argument parser: its subcommands and options, their help texts and examples."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn

from .._store import STORE_ENV
from ._argument_types import (
    figure_size,
    key_format,
    key_value,
    non_negative_int,
    positive_int,
)
from ._commands import (
    cmd_demo,
    cmd_export,
    cmd_ingest,
    cmd_lineage,
    cmd_ls,
    cmd_pin,
    cmd_plot,
    cmd_recover,
    cmd_reprocess,
    cmd_reproduce,
    cmd_show,
)
from ._exits import PROG, fail
from ._opening import API_KEY_ENV
from ._serve import SERVE_HELP, add_serve_arguments, cmd_serve
from ._watch import WATCH_HELP, add_watch_arguments, cmd_watch
from ._worker import WORKER_HELP, add_worker_arguments, cmd_worker

DEFAULT_LIMIT = 20


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line on stderr, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        hint = f"; see '{self.prog} --help'"
        fail(message + hint)


def _common_options() -> argparse.ArgumentParser:
    """The global options, accepted before and after the subcommand.

    Their defaults are suppressed, so that a subcommand's parser does not overwrite a value
    given before the subcommand; :func:`._opening.store_location` and friends fill the
    defaults in.
    """
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("store options")
    group.add_argument(
        "--store",
        metavar="PATH_OR_URI",
        default=argparse.SUPPRESS,
        help=(
            f"the analysis store: a folder (embedded catalog) or the http(s) URI of a tiled "
            f"server (default: ${STORE_ENV}, else ./analysis-store)"
        ),
    )
    group.add_argument(
        "--api-key",
        metavar="KEY",
        default=argparse.SUPPRESS,
        help=f"API key for a tiled server (default: ${API_KEY_ENV})",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log what happens (INFO) and show third-party warnings, on stderr; "
        "-vv also logs what the libraries underneath do",
    )
    return common


_EXAMPLES = {
    "demo": """\
example:
  bluesky-analysis-store demo --store /tmp/demo-store --plot centroid.png --points 11""",
    "ls": """\
examples:
  bluesky-analysis-store ls --limit 5
  bluesky-analysis-store ls --children c6041c47
  bluesky-analysis-store ls --children c6041c47 --current
  bluesky-analysis-store --store http://tiled.example:8000/analysis ls --json""",
    "export": """\
examples:
  bluesky-analysis-store export 013f38df --format ro-crate -o crate-013f38df/
  bluesky-analysis-store export 013f38df --format nexus -o 013f38df.nxs""",
    "lineage": """\
examples:
  bluesky-analysis-store lineage 013f38df
  bluesky-analysis-store lineage c6041c47 --json""",
    "pin": """\
examples:
  bluesky-analysis-store ls --children c6041c47
  bluesky-analysis-store pin 013f38df
  bluesky-analysis-store pin 013f38df --clear""",
    "show": """\
examples:
  bluesky-analysis-store show 013f38df
  bluesky-analysis-store show 013f38df --json | jq .provenance.code""",
    "plot": """\
examples:
  bluesky-analysis-store plot 013f38df centroid_x -o centroid.png
  bluesky-analysis-store plot 013f38df normalised --index 10 -o frame10.png
  bluesky-analysis-store plot 013f38df centroid_x --x motor -o centroid.png --size 8x6 --dpi 150
  bluesky-analysis-store plot c6041c47 cam -o cam.png""",
    "reprocess": """\
examples:
  bluesky-analysis-store reprocess c6041c47 --reducer mylab.reduce:spot_centroid
  bluesky-analysis-store reprocess c6041c47 a1b2c3d4 --source /data/raw-store \\
      --reducer mylab.reduce:background --writer normalised=TIFF --md operator=jane --force
  bluesky-analysis-store reprocess c6041c47 a1b2c3d4 --reducer mylab.reduce:spot_centroid \\
      --workers 4  # or --scheduler tcp://dask.example:8786""",
    "ingest": """\
examples:
  bluesky-analysis-store ingest frames/ --md sample=LaB6 --md temperature=295
  bluesky-analysis-store ingest scan.h5::/entry/data --writer TIFF --stream frames""",
    "reproduce": """\
examples:
  bluesky-analysis-store reproduce 013f38df
  bluesky-analysis-store reproduce 013f38df --source /data/raw-store --rtol 1e-6
  bluesky-analysis-store reproduce 013f38df --trust-recorded-code""",
    "recover": """\
examples:
  bluesky-analysis-store recover
  bluesky-analysis-store recover --store http://tiled.example:8000 --journal /data/journal""",
    "watch": """\
examples:
  bluesky-analysis-store watch
  bluesky-analysis-store watch --children c6041c47 --plot centroid_x -o live.png
  bluesky-analysis-store --store http://analysis.example:8000 watch --json --runs 1""",
    "serve": """\
examples:
  bluesky-analysis-store serve --store /srv/analysis    # the API key in $TILED_API_KEY
  bluesky-analysis-store serve --store /srv/analysis --read /data/raw --host 0.0.0.0 \\
      --database postgresql://tiled@db.example/analysis --streaming redis://cache.example:6379""",
    "worker": """\
examples:
  bluesky-analysis-store worker --zmq proxy.example:5578 --reducers mylab.reduce:spot_centroid \\
      --store http://analysis.example:8000 --root-map /beamline/data=/mnt/beamline/data""",
}

_MD_HELP = (
    "metadata for the new run's start document; VALUE is read as JSON when it is JSON "
    "(3, true, [1, 2]), else kept as text; repeat for more keys"
)


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("bluesky-analysis-store")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bluesky-analysis-store`` (documented for ``--help``)."""
    parser = _Parser(
        prog=PROG,
        description=(
            "Derived data from bluesky runs, saved as child runs with provenance: look at them, "
            "plot them, make them again and check that they are reproduced."
        ),
        parents=[_common_options()],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Run 'bluesky-analysis-store COMMAND --help' for a command's options and examples.\n"
            "exit status: 0 success; 1 a run failed to reprocess or was not reproduced; "
            "2 an error.\n\nexamples:\n"
            + "\n".join(examples.splitlines()[1] for examples in _EXAMPLES.values())
        ),
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {_package_version()}",
        help="print the version of bluesky-analysis-store and exit",
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands", parser_class=_Parser
    )
    subparsers.required = True
    common = [_common_options()]

    def add(name: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> Any:
        sub = subparsers.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EXAMPLES[name],
            parents=common,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(func=func)
        return sub

    demo = add(
        "demo",
        "scan a simulated camera, reduce each frame live into the store, print what was saved "
        "and plot it (creates the store if needed)",
        cmd_demo,
    )
    demo.add_argument(
        "--plot",
        metavar="FILE",
        default="demo-centroid.png",
        help="where to write the PNG of the spot centroid (default: demo-centroid.png)",
    )
    demo.add_argument(
        "--points",
        metavar="N",
        type=positive_int,
        default=21,
        help="number of points of the scan (default: 21)",
    )

    ls = add(
        "ls",
        "list recent runs, newest first (or the derived runs of one raw run, marking the "
        "current result of each reducer): uid, start time, raw or derived, and the plan name "
        "of a raw run or the code (with its version) and parents of a derived one",
        cmd_ls,
    )
    ls.add_argument(
        "--children",
        metavar="RAW_UID",
        help="list the runs derived from this run (uid or its first 8+ characters) instead",
    )
    ls.add_argument(
        "--limit",
        metavar="N",
        type=non_negative_int,
        default=DEFAULT_LIMIT,
        help=f"show at most N runs; 0 for all (default: {DEFAULT_LIMIT})",
    )
    ls.add_argument(
        "--current",
        action="store_true",
        help="with --children: only the current result of each reducer (the most recently "
        "pinned, else the newest that succeeded)",
    )
    ls.add_argument("--json", action="store_true", help="print a JSON list instead of a table")

    export = add(
        "export",
        "write a derived run, its data and its provenance (parents, input files with sha256, "
        "code, versions and parameters), as a Workflow Run RO-Crate (a folder with "
        "ro-crate-metadata.json and one STREAM.npz per stream) or a NeXus file (NXentry with "
        "an NXdata group per stream and an NXprocess group)",
        cmd_export,
    )
    export.add_argument("uid", metavar="UID", help="the run's uid, or its first 8+ characters")
    export.add_argument(
        "--format", choices=("ro-crate", "nexus"), required=True, help="the form to write"
    )
    export.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        required=True,
        help="the crate's folder (made; it must not hold a crate) or the NeXus file (not "
        "overwritten)",
    )

    lineage = add(
        "lineage",
        "show where a run came from, back to the raw data (its parents, theirs, ...), and "
        "what was derived from it (its children, grandchildren, ..., each marked current "
        "among its reducer's versions); a parent in another catalog is shown as not in this "
        "store",
        cmd_lineage,
    )
    lineage.add_argument("uid", metavar="UID", help="the run's uid, or its first 8+ characters")
    lineage.add_argument(
        "--depth",
        metavar="N",
        type=positive_int,
        default=20,
        help="follow at most N generations each way (default: 20)",
    )
    lineage.add_argument(
        "--json", action="store_true", help="print one JSON object instead of text"
    )

    pin = add(
        "pin",
        "make a derived run the current result of its reducer for its parents, whatever newer "
        "runs the same code (or another version of it) made; the pin is kept in the store's "
        "catalog, for every user of the store (`ls --children` marks current and pinned runs)",
        cmd_pin,
    )
    pin.add_argument(
        "uid", metavar="CHILD_UID", help="the derived run's uid, or its first 8+ characters"
    )
    pin.add_argument(
        "--clear",
        action="store_true",
        help="take the pin away: the newest run that succeeded is current again",
    )

    show = add(
        "show",
        "show one run: how it ended (a derived run's reduction record: events reduced and "
        "failed, and which events failed in which reducer, with what error; a run on which "
        "every event failed is shown FAILED), start metadata, provenance (parents, files, "
        "code, environment), streams with their keys, shapes and dtypes",
        cmd_show,
    )
    show.add_argument("uid", metavar="UID", help="the run's uid, or its first 8+ characters")
    show.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    plot = add(
        "plot",
        "plot one data key of a run to a PNG: a line over the run for scalars, an image of one "
        "event for frames; titled with the sample, scan id, plan and run uid, axes labelled "
        "with the descriptor's units; strings and events of 3 or more dimensions are refused",
        cmd_plot,
    )
    plot.add_argument("uid", metavar="UID", help="the run's uid, or its first 8+ characters")
    plot.add_argument("key", metavar="KEY", help="the data key to plot")
    plot.add_argument(
        "-o", "--output", metavar="FILE.png", required=True, help="the PNG file to write"
    )
    plot.add_argument(
        "--stream", default="primary", help="the stream holding KEY (default: primary)"
    )
    plot.add_argument(
        "--index",
        type=int,
        default=-1,
        help="for frames: which event to show, from 0; negative counts from the end "
        "(default: -1, the last)",
    )
    plot.add_argument(
        "--x",
        metavar="KEY",
        help="for scalars: the data key for the x axis, of the run's stream, else of its "
        "parent run's stream (each derived event matched to the raw event it came from by "
        "its parent_seq_num) (default: the event number, seq_num)",
    )
    plot.add_argument(
        "--x-stream",
        metavar="NAME",
        help="the parent run's stream holding --x (default: the same name as --stream)",
    )
    plot.add_argument(
        "--size",
        metavar="WxH",
        type=figure_size,
        default=(6.4, 4.8),
        help="figure size in inches (default: 6.4x4.8)",
    )
    plot.add_argument(
        "--dpi",
        type=positive_int,
        default=100,
        help="dots per inch; the PNG is size x dpi pixels (default: 100, so 640x480)",
    )

    reprocess = add(
        "reprocess",
        "reduce saved raw runs again with the given reducers and save the child runs into the "
        "store; runs already reduced by the same code are skipped (only a child with a stop "
        "document, exit status success and no failed event counts: an incomplete or failed "
        "child is redone, and so is one by an edited reducer, committed or not); a raw run "
        "without a stop document (interrupted, or still running) is reduced up to its last "
        "saved event, and its child is marked exit status fail; a run on which every event "
        "fails is reported FAILED with one summary of its failures, and so is a run that has "
        "none of the streams given with --stream (exit status 1)",
        cmd_reprocess,
    )
    reprocess.add_argument(
        "raw_uids",
        metavar="RAW_UID",
        nargs="+",
        help="the raw runs: uids, or their first 8+ characters",
    )
    reprocess.add_argument(
        "--reducer",
        metavar="MODULE:FUNCTION",
        action="append",
        required=True,
        help="a reducer by its import name (a function of one event's data, or a Reducer "
        "class); repeat for more",
    )
    reprocess.add_argument(
        "--source",
        metavar="STORE_OR_URI",
        help="the catalog holding the raw runs: a store folder or a tiled URI "
        "(default: the store itself)",
    )
    reprocess.add_argument(
        "--stream",
        metavar="NAME",
        action="append",
        help="a raw stream whose events function reducers get; repeat for more (default: primary)",
    )
    reprocess.add_argument(
        "--writer",
        metavar="KEY=FORMAT",
        type=key_format,
        action="append",
        help="write derived key KEY in FORMAT (HDF5, TIFF, NPY, PARQUET for 1-D arrays of "
        "any length, any registered format, or 'inline' for the event table); arrays "
        "default to HDF5, tables to PARQUET; repeat for more keys",
    )
    reprocess.add_argument(
        "--force",
        action="store_true",
        help="reduce runs again even if the same code already made a child run of them",
    )
    reprocess.add_argument(
        "--derived",
        action="store_true",
        help="also reduce runs that are themselves derived (their start names parent_uids "
        "or provenance); without it such a run is refused, as it is not raw data",
    )
    reprocess.add_argument(
        "--md", metavar="KEY=VALUE", type=key_value, action="append", help=_MD_HELP
    )
    spread = reprocess.add_mutually_exclusive_group()
    spread.add_argument(
        "--workers",
        metavar="N",
        type=positive_int,
        help="reduce the runs on N worker processes of a Dask LocalCluster started for the "
        "command (one run per task; a lost worker's runs are retried)",
    )
    spread.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="reduce the runs on the workers of the Dask scheduler at ADDRESS "
        "(tcp://host:8786); they must reach the store and the raw data at the same paths",
    )

    ingest = add(
        "ingest",
        "save files (TIFF, NPY, HDF5, CSV) as a new run with their paths and sha256 "
        "recorded; prints the new run's uid (creates the store if needed)",
        cmd_ingest,
    )
    ingest.add_argument(
        "paths",
        metavar="PATH",
        nargs="+",
        help="a file, a folder of files, or FILE.h5::/dataset to take one HDF5 dataset",
    )
    ingest.add_argument("--md", metavar="KEY=VALUE", type=key_value, action="append", help=_MD_HELP)
    ingest.add_argument(
        "--stream",
        metavar="NAME",
        default="primary",
        help="the stream that frames go to (default: primary); each CSV file is its own stream",
    )
    ingest.add_argument(
        "--writer",
        metavar="FORMAT",
        default="HDF5",
        help="file format for arrays: HDF5, TIFF, NPY or any registered format (default: HDF5)",
    )

    reproduce = add(
        "reproduce",
        "re-run a child run's recorded code on its recorded inputs and compare value by value; "
        "says how many events and which keys were compared, which were identical, which "
        "differed and which could not be compared (exit status 0: identical; 1: not, or "
        "nothing to compare, as for a child on which every event failed; 2: error)",
        cmd_reproduce,
    )
    reproduce.add_argument(
        "child_uid", metavar="CHILD_UID", help="the derived run: uid, or its first 8+ characters"
    )
    reproduce.add_argument(
        "--source",
        metavar="STORE_OR_URI",
        help="the catalog holding the parent runs (default: the store itself)",
    )
    reproduce.add_argument(
        "--trust-recorded-code",
        action="store_true",
        help="run the code recorded with the child (a reducer defined in a script, a profile "
        "or at the prompt) after checking its sha256: that definition alone, never the rest "
        "of its file; read it first with `show CHILD_UID --json`",
    )
    reproduce.add_argument(
        "--rtol",
        type=float,
        default=0.0,
        help="relative tolerance for numbers, as numpy.isclose (default: 0, exact)",
    )
    reproduce.add_argument(
        "--atol",
        type=float,
        default=0.0,
        help="absolute tolerance for numbers, as numpy.isclose (default: 0, exact)",
    )
    reproduce.add_argument(
        "--allow-changed-code",
        action="store_true",
        help="deprecated, no effect: changed code is always run, and the report names the "
        "change and how the values compare",
    )

    recover = add(
        "recover",
        "deliver child runs left in the journal (the store was down when their scan ended, "
        "or a process was killed) and close those without a stop with exit status fail and a "
        "reason; journals in use by a running process are left alone; safe to run again "
        "(exit status 0: all delivered, 1: some could not be delivered)",
        cmd_recover,
    )
    recover.add_argument(
        "--journal",
        metavar="FOLDER",
        help="the journal folder (default: the store's: STORE/journal for an embedded store, "
        "$BLUESKY_ANALYSIS_JOURNAL or a folder per server under ~/.local/state for a server)",
    )
    add_serve_arguments(add("serve", SERVE_HELP, cmd_serve))
    add_worker_arguments(add("worker", WORKER_HELP, cmd_worker))
    add_watch_arguments(add("watch", WATCH_HELP, cmd_watch))
    return parser
