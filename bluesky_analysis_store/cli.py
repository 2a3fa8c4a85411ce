"""The command line, ``bluesky-analysis-store``: look at, plot, make and check derived runs.

Every subcommand works on one analysis store: ``--store PATH_OR_URI`` (before or after the
subcommand), else ``$BLUESKY_ANALYSIS_STORE``, else ``./analysis-store``. Only ``demo``,
``ingest`` and ``reprocess --source`` may create a store; the others refuse a folder without
a catalog. A user's mistake prints one line, ``bluesky-analysis-store: error: ...``, on
stderr and exits with status 2; stdout carries only the result (pure JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from ._errors import AnalysisStoreError
from ._store import STORE_ENV, default_store_location

__all__ = ["API_KEY_ENV", "main"]

logger = logging.getLogger(__name__)

PROG = "bluesky-analysis-store"
API_KEY_ENV = "TILED_API_KEY"
"""Environment variable holding the API key of a tiled server (as tiled itself reads it)."""

MIN_UID_PREFIX = 8
"""How many leading characters of a uid are enough to name a run (if they are unique)."""
DEFAULT_LIMIT = 20

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran, but a run failed to reprocess or did not reproduce
EXIT_ERROR = 2  # a user's mistake, or an error that stopped the command

_UID_CHARACTERS = re.compile(r"^[0-9A-Za-z-]+$")
_NOT_DATA_KEYS = frozenset({"seq_num", "time"})
_TEXT_VALUE_WIDTH = 100


class CommandError(Exception):
    """A mistake to report on one line: the message is all the user needs."""


# --- output helpers -----------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """tiled's read-only views (DictView, ListView) as plain dicts and lists, for JSON."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(_plain(value), indent=2, default=str))


def _format_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "?"
    moment = datetime.datetime.fromtimestamp(timestamp).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _iso_time(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _short(text: str, width: int = _TEXT_VALUE_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(_plain(value), default=str)


# --- parsing values -------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; the value is read as JSON when it is JSON (``3``, ``true``, ``[1, 2]``),
    else kept as the string given."""
    key, separator, raw = text.partition("=")
    if not separator or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _key_format(text: str) -> tuple[str, str]:
    key, separator, fmt = text.partition("=")
    if not separator or not key.strip() or not fmt.strip():
        raise argparse.ArgumentTypeError(
            f"expected KEY=FORMAT (e.g. normalised=TIFF), got {text!r}"
        )
    return key.strip(), fmt.strip()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {value}")
    return value


def _figure_size(text: str) -> tuple[float, float]:
    width, separator, height = text.lower().partition("x")
    try:
        size = (float(width), float(height))
    except ValueError:
        size = (0.0, 0.0)
    if not separator or min(size) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT in inches, e.g. 6.4x4.8, got {text!r}"
        )
    return size


def _md(pairs: Sequence[tuple[str, Any]] | None) -> dict[str, Any] | None:
    return dict(pairs) if pairs else None


# --- opening the store and finding runs -----------------------------------------------------


def _is_uri(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _store_location(args: argparse.Namespace) -> str:
    return getattr(args, "store", None) or default_store_location()


def _open(location: str, args: argparse.Namespace, *, create: bool) -> Any:
    """The :class:`AnalysisStore` at ``location``; a folder without a catalog is refused
    unless ``create``."""
    from ._store import AnalysisStore

    if _is_uri(location):
        api_key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV)
        try:
            return AnalysisStore.from_uri(location, api_key=api_key)
        except Exception as error:  # httpx's and tiled's errors: say what failed, in one line
            raise CommandError(
                f"cannot connect to the analysis store at {location}: {error}"
            ) from error
    folder = os.path.abspath(location)
    if not create:
        if not os.path.isdir(folder):
            raise CommandError(
                f"no analysis store at {folder}: the folder does not exist "
                f"(give --store PATH_OR_URI or set {STORE_ENV})"
            )
        if not os.path.isfile(os.path.join(folder, "catalog.db")):
            raise CommandError(
                f"no analysis store at {folder}: the folder has no catalog.db "
                f"(give --store PATH_OR_URI or set {STORE_ENV})"
            )
    elif os.path.exists(folder) and not os.path.isdir(folder):
        raise CommandError(f"cannot make an analysis store at {folder}: it is a file")
    logger.info("opening the analysis store in %s", folder)
    return AnalysisStore.open(folder)


def _open_store(args: argparse.Namespace, *, create: bool = False) -> Any:
    return _open(_store_location(args), args, create=create)


def _open_source(args: argparse.Namespace, store: Any) -> Any:
    """The catalog to read raw runs from: ``--source``, else the store itself."""
    source = getattr(args, "source", None)
    if source is None:
        return store
    if source == store.location or (
        not _is_uri(source) and store.location == os.path.abspath(source)
    ):
        return store
    return _open(source, args, create=False)


def _find_run(client: Any, text: str) -> Any:
    """The run named by a uid, or by its first ``MIN_UID_PREFIX`` or more characters."""
    from tiled.client.container import Container

    text = text.strip()
    if not _UID_CHARACTERS.match(text):
        raise CommandError(f"{text!r} is not a run uid (letters, digits and '-' only)")
    try:  # the exact key first: no search, and no prefix magic
        return Container.__getitem__(client, text)
    except KeyError:
        pass
    if len(text) < MIN_UID_PREFIX:
        raise CommandError(
            f"no run {text!r} in the analysis store (a shortened uid needs at least "
            f"{MIN_UID_PREFIX} characters)"
        )
    try:
        return client[text]  # CatalogOfBlueskyRuns looks a partial uid up
    except KeyError:
        raise CommandError(f"no run {text!r} in the analysis store") from None
    except ValueError:
        raise CommandError(
            f"uid prefix {text!r} matches more than one run; give more characters"
        ) from None


def _run_uid(run: Any) -> str:
    return run.start["uid"]


def _parent_uid(store: Any, text: str) -> str:
    """The uid of a run that children in ``store`` name as parent; the parent itself may be in
    another catalog (``reprocess --source``), so the children's records are searched too."""
    from tiled.queries import Contains

    try:
        return _run_uid(_find_run(store.client, text))
    except CommandError:
        if len(text) < MIN_UID_PREFIX:
            raise
    # Contains is a substring match on the JSON text; the prefix is checked again here.
    results = store.client.search(Contains("start.parent_uids", text))
    matches = {
        uid
        for run in results.values()
        for uid in run.start.get("parent_uids") or ()
        if uid.startswith(text)
    }
    if len(matches) > 1:
        raise CommandError(f"uid prefix {text!r} matches more than one run; give more characters")
    if not matches:
        raise CommandError(f"no run {text!r} in the analysis store, nor any run derived from it")
    return matches.pop()


# --- describing runs -------------------------------------------------------------------------


def _kind(start: Mapping[str, Any]) -> str:
    return "derived" if start.get("parent_uids") or start.get("provenance") else "raw"


def _code_summaries(start: Mapping[str, Any]) -> list[dict[str, Any]]:
    code = (start.get("provenance") or {}).get("code") or []
    return [
        {k: record[k] for k in ("name", "version", "commit", "dirty") if k in record}
        for record in code
    ]


def _version_text(record: Mapping[str, Any]) -> str:
    version = str(record.get("version", "?"))
    if re.fullmatch(r"[0-9a-f]{40}", version):  # a git commit: the first 12 are enough here
        version = version[:12]
    return version + (" (dirty)" if record.get("dirty") else "")


def _run_summary(uid: str, run: Any) -> dict[str, Any]:
    start = run.start
    stop = run.stop
    summary: dict[str, Any] = {
        "uid": uid,
        "time": start.get("time"),
        "time_iso": _iso_time(start.get("time")),
        "kind": _kind(start),
        "plan_name": start.get("plan_name"),
        "scan_id": start.get("scan_id"),
        "parent_uids": list(start.get("parent_uids") or []),
        "files": [f.get("path") for f in (start.get("provenance") or {}).get("files") or []],
        "code": _code_summaries(start),
        "exit_status": stop.get("exit_status") if stop else None,
        "num_events": dict(stop.get("num_events") or {}) if stop else {},
    }
    return summary


def _summary_text(summary: Mapping[str, Any]) -> str:
    if summary["kind"] == "derived":
        what = "; ".join(f"{c['name']} {_version_text(c)}" for c in summary["code"]) or "(no code)"
        origins = [p[:MIN_UID_PREFIX] for p in summary["parent_uids"]]
        origins += [os.path.basename(f or "?") for f in summary["files"]]
        if origins:
            more = f" +{len(origins) - 3} more" if len(origins) > 3 else ""
            what += " <- " + ", ".join(origins[:3]) + more
    else:
        what = summary["plan_name"] or "(no plan name)"
        if summary["scan_id"] is not None:
            what += f" (scan_id {summary['scan_id']})"
    status = summary["exit_status"]
    if status is None:
        what += " [no stop document]"
    elif status != "success":
        what += f" [{status}]"
    return f"{summary['uid']}  {_format_time(summary['time'])}  {summary['kind']:<7}  {what}"


def _data_keys(node: Any) -> list[str]:
    keys = list(node)
    names = set(keys)
    return [
        k for k in keys if k not in _NOT_DATA_KEYS and not (k.startswith("ts_") and k[3:] in names)
    ]


def _streams(run: Any) -> dict[str, Any]:
    streams: dict[str, Any] = {}
    stop = run.stop or {}
    for name in run:
        node = run[name]
        keys = {}
        for key in _data_keys(node):
            item = node[key]
            shape = getattr(item, "shape", None)
            keys[key] = {
                "shape": list(shape) if shape is not None else None,
                "dtype": str(getattr(item, "dtype", "?")),
            }
        events = (stop.get("num_events") or {}).get(name)
        streams[name] = {"events": events, "keys": keys}
    return streams


def _show_record(uid: str, run: Any) -> dict[str, Any]:
    start = _plain(run.start)
    return {
        "uid": uid,
        "kind": _kind(start),
        "time_iso": _iso_time(start.get("time")),
        "start": start,
        "provenance": start.get("provenance"),
        "stop": _plain(run.stop) if run.stop else None,
        "streams": _streams(run),
    }


def _print_provenance(provenance: Mapping[str, Any]) -> None:
    print("provenance:")
    parents = provenance.get("parents") or []
    print(f"  parents ({len(parents)}):")
    for parent in parents:
        streams = parent.get("streams")
        print(f"    {parent['uid']}" + (f"  streams {', '.join(streams)}" if streams else ""))
    files = provenance.get("files") or []
    print(f"  files ({len(files)}):")
    for record in files:
        print(f"    {record.get('path')}")
        print(f"      sha256 {record.get('sha256')}  size {record.get('size')} bytes")
    code = provenance.get("code") or []
    print(f"  code ({len(code)}):")
    for record in code:
        print(f"    {record.get('name')}")
        details = [f"version {record.get('version', '?')}"]
        if "distribution" in record:
            details.append(f"distribution {record['distribution']}")
        if "commit" in record:
            details.append(
                f"commit {record['commit']}" + (" (dirty)" if record.get("dirty") else "")
            )
        if not record.get("importable", True):
            details.append("NOT importable by name")
        print("      " + ", ".join(details))
        if "file" in record:
            print(f"      file {record['file']}")
        if "sha256" in record:
            print(f"      sha256 {record['sha256']}")
        if record.get("params"):
            print(f"      params {_short(_value_text(record['params']))}")
        if record.get("streams"):
            print(f"      streams {', '.join(record['streams'])}")
    environment = provenance.get("environment") or {}
    if environment:
        print("  environment:")
        print(
            f"    python {environment.get('python', '?')} "
            f"({environment.get('implementation', '?')}) on {environment.get('platform', '?')}"
        )
        packages = environment.get("packages") or {}
        for name, version in sorted(packages.items()):
            print(f"    {name} {version}")
    if "strict" in provenance:
        print(f"  strict: {provenance['strict']}")
    for gap in provenance.get("missing") or []:
        print(f"  MISSING: {gap}")


def _print_show(record: Mapping[str, Any]) -> None:
    start = record["start"]
    stop = record["stop"]
    print(f"run {record['uid']} ({record['kind']})")
    print(f"  time: {_format_time(start.get('time'))}")
    if stop:
        print(
            f"  exit status: {stop.get('exit_status')}"
            + (f" ({stop['reason']})" if stop.get("reason") else "")
        )
    else:
        print("  exit status: none (no stop document)")
    print("start metadata:")
    for key, value in start.items():
        if key in ("uid", "time", "provenance"):
            continue
        print(f"  {key}: {_short(_value_text(value))}")
    if record["provenance"]:
        _print_provenance(record["provenance"])
    else:
        print("provenance: none (a raw run)")
    print("streams:")
    if not record["streams"]:
        print("  (none)")
    for name, stream in record["streams"].items():
        events = stream["events"]
        print(f"  {name}" + (f" ({events} events)" if events is not None else ""))
        width = max((len(k) for k in stream["keys"]), default=0)
        for key, info in stream["keys"].items():
            shape = tuple(info["shape"]) if info["shape"] is not None else "?"
            print(f"    {key:<{width}}  shape {shape}  dtype {info['dtype']}")


# --- the subcommands ---------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    location = _store_location(args)
    if _is_uri(location):
        raise CommandError("the demo writes into a local folder; give --store PATH, not a URI")
    run_demo(location, plot_path=args.plot, points=args.points, out=sys.stdout)
    return EXIT_OK


def _cmd_ls(args: argparse.Namespace) -> int:
    store = _open_store(args)
    client = store.client
    if args.children:
        parent_uid = _parent_uid(store, args.children)
        uids = store.children(parent_uid)
        if args.limit:
            uids = uids[: args.limit]
        summaries = [_run_summary(uid, store[uid]) for uid in uids]
    else:
        newest_first = client.sort(("start.time", -1)).items()
        items = newest_first[: args.limit] if args.limit else list(newest_first)
        summaries = [_run_summary(uid, run) for uid, run in items]
    if args.json:
        _print_json(summaries)
    elif not summaries:
        print(f"run {parent_uid} has no derived runs" if args.children else "the store is empty")
    else:
        for summary in summaries:
            print(_summary_text(summary))
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    store = _open_store(args)
    run = _find_run(store.client, args.uid)
    record = _show_record(_run_uid(run), run)
    if args.json:
        _print_json(record)
    else:
        _print_show(record)
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    from ._plotting import plot_key

    store = _open_store(args)
    run = _find_run(store.client, args.uid)
    if args.x is not None and args.stream in run and args.x not in run[args.stream]:
        keys = _data_keys(run[args.stream])
        raise CommandError(f"stream {args.stream!r} has no key {args.x!r} for x; it has {keys}")
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
        size=args.size,
        dpi=args.dpi,
    )
    print(os.path.abspath(path))
    return EXIT_OK


def _cmd_reprocess(args: argparse.Namespace) -> int:
    from ._provenance import resolve_code_name
    from ._reprocess import reprocess

    reducers = [resolve_code_name(name) for name in args.reducer]  # before opening anything
    store = _open_store(args, create=args.source is not None)
    source = _open_source(args, store)
    raw_uids = [_run_uid(_find_run(source.client, text)) for text in args.raw_uids]
    report = reprocess(
        source,
        list(dict.fromkeys(raw_uids)),
        reducers,
        store,
        streams=args.stream or ["primary"],
        writers=dict(args.writer) if args.writer else None,
        md=_md(args.md),
        force=args.force,
    )
    print(report)
    for raw_uid, child_uid in report.saved.items():
        print(f"  saved {raw_uid}: child run {child_uid}")
    for raw_uid, child_uid in report.skipped.items():
        print(f"  already reduced {raw_uid}: child run {child_uid} (use --force for another)")
    return EXIT_FAILED if report.failed else EXIT_OK


def _cmd_ingest(args: argparse.Namespace) -> int:
    from ._ingest import ingest
    from .formats import formats

    formats[args.writer]  # a typo must not leave a new, empty store behind
    for path in args.paths:
        file_part = path.partition("::")[0]
        if not os.path.exists(file_part):
            raise CommandError(
                f"cannot ingest {os.path.abspath(file_part)!r}: no such file or folder"
            )
    store = _open_store(args, create=True)
    uid = ingest(args.paths, _md(args.md), store, stream=args.stream, writer=args.writer)
    print(uid)
    return EXIT_OK


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from ._reproduce import reproduce

    store = _open_store(args)
    child_uid = _run_uid(_find_run(store.client, args.child_uid))
    source = _open_source(args, store)
    report = reproduce(store, child_uid, source, allow_changed_code=args.allow_changed_code)
    print(report)
    return EXIT_OK if report.identical else EXIT_FAILED


# --- the parser ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line on stderr, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        hint = f"; see '{self.prog} --help'"
        _fail(message + hint)


def _fail(message: str) -> NoReturn:
    first_line = " ".join(str(message).split())  # one line, whatever the message held
    sys.stderr.write(f"{PROG}: error: {first_line}\n")
    raise SystemExit(EXIT_ERROR)


def _common_options() -> argparse.ArgumentParser:
    """The global options, accepted before and after the subcommand.

    Their defaults are suppressed, so that a subcommand's parser does not overwrite a value
    given before the subcommand; :func:`_store_location` and friends fill the defaults in.
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
  bluesky-analysis-store --store http://tiled.example:8000/analysis ls --json""",
    "show": """\
examples:
  bluesky-analysis-store show 013f38df
  bluesky-analysis-store show 013f38df --json | jq .provenance.code""",
    "plot": """\
examples:
  bluesky-analysis-store plot 013f38df centroid_x -o centroid.png
  bluesky-analysis-store plot 013f38df normalised --index 10 -o frame10.png
  bluesky-analysis-store plot c6041c47 cam --x motor -o cam.png --size 8x6 --dpi 150""",
    "reprocess": """\
examples:
  bluesky-analysis-store reprocess c6041c47 --reducer mylab.reduce:spot_centroid
  bluesky-analysis-store reprocess c6041c47 a1b2c3d4 --source /data/raw-store \\
      --reducer mylab.reduce:background --writer normalised=TIFF --md operator=jane --force""",
    "ingest": """\
examples:
  bluesky-analysis-store ingest frames/ --md sample=LaB6 --md temperature=295
  bluesky-analysis-store ingest scan.h5::/entry/data --writer TIFF --stream frames""",
    "reproduce": """\
examples:
  bluesky-analysis-store reproduce 013f38df
  bluesky-analysis-store reproduce 013f38df --source /data/raw-store --allow-changed-code""",
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
        _cmd_demo,
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
        type=_positive_int,
        default=21,
        help="number of points of the scan (default: 21)",
    )

    ls = add(
        "ls",
        "list recent runs, newest first (or the derived runs of one raw run): uid, start "
        "time, raw or derived, and the plan name of a raw run or the code (with its version) "
        "and parents of a derived one",
        _cmd_ls,
    )
    ls.add_argument(
        "--children",
        metavar="RAW_UID",
        help="list the runs derived from this run (uid or its first 8+ characters) instead",
    )
    ls.add_argument(
        "--limit",
        metavar="N",
        type=_non_negative_int,
        default=DEFAULT_LIMIT,
        help=f"show at most N runs; 0 for all (default: {DEFAULT_LIMIT})",
    )
    ls.add_argument("--json", action="store_true", help="print a JSON list instead of a table")

    show = add(
        "show",
        "show one run: start metadata, provenance (parents, files, code, environment), "
        "streams with their keys, shapes and dtypes",
        _cmd_show,
    )
    show.add_argument("uid", metavar="UID", help="the run's uid, or its first 8+ characters")
    show.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    plot = add(
        "plot",
        "plot one data key of a run to a PNG: a line over the run for scalars, an image of one "
        "event for frames",
        _cmd_plot,
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
        help="for scalars: the data key for the x axis (default: the event number)",
    )
    plot.add_argument(
        "--size",
        metavar="WxH",
        type=_figure_size,
        default=(6.4, 4.8),
        help="figure size in inches (default: 6.4x4.8)",
    )
    plot.add_argument(
        "--dpi",
        type=_positive_int,
        default=100,
        help="dots per inch; the PNG is size x dpi pixels (default: 100, so 640x480)",
    )

    reprocess = add(
        "reprocess",
        "reduce saved raw runs again with the given reducers and save the child runs into the "
        "store; runs already reduced by the same code are skipped",
        _cmd_reprocess,
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
        type=_key_format,
        action="append",
        help="write derived key KEY in FORMAT (HDF5, TIFF, NPY, any registered format, or "
        "'inline' for the event table); arrays default to HDF5; repeat for more keys",
    )
    reprocess.add_argument(
        "--force",
        action="store_true",
        help="reduce runs again even if the same code already made a child run of them",
    )
    reprocess.add_argument(
        "--md", metavar="KEY=VALUE", type=_key_value, action="append", help=_MD_HELP
    )

    ingest = add(
        "ingest",
        "save files (TIFF, NPY, HDF5, CSV) as a new run with their paths and sha256 "
        "recorded; prints the new run's uid (creates the store if needed)",
        _cmd_ingest,
    )
    ingest.add_argument(
        "paths",
        metavar="PATH",
        nargs="+",
        help="a file, a folder of files, or FILE.h5::/dataset to take one HDF5 dataset",
    )
    ingest.add_argument(
        "--md", metavar="KEY=VALUE", type=_key_value, action="append", help=_MD_HELP
    )
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
        "re-run a child run's recorded code on its recorded inputs and compare value by value "
        "(exit status 0: identical, 1: not, 2: error)",
        _cmd_reproduce,
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
        "--allow-changed-code",
        action="store_true",
        help="run the code even if its version, commit or source differs from the record",
    )
    return parser


# --- running -----------------------------------------------------------------------------------


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def _configure_logging(verbosity: int) -> None:
    """Warnings on stderr; with ``-v`` this package's INFO too, with ``-vv`` everyone's."""
    logging.basicConfig(
        level=logging.INFO if verbosity > 1 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if verbosity:
        logging.getLogger(__package__).setLevel(logging.INFO)
        return
    # tiled's server logs "Tiled version ..." at INFO through a handler of its own, and sets
    # its level when imported; a filter on the logger outlives that.
    logging.getLogger("tiled.server.app").addFilter(_BelowWarning())
    # Dependencies' deprecation notices are for developers, not for the command's user.
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("ignore", message=r".*starlette\.testclient.*")


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user's mistake raises: the package's errors and the builtins they refine, and
    a tiled server's HTTP errors (a wrong URI, a missing API key)."""
    errors: tuple[type[BaseException], ...] = (
        CommandError,
        AnalysisStoreError,
        KeyError,
        ValueError,
        OSError,
    )
    if "httpx" in sys.modules:  # imported by tiled's client; absent, nothing can raise it
        errors += (sys.modules["httpx"].HTTPError,)
    return errors


def _error_text(error: BaseException) -> str:
    if isinstance(error, KeyError) and not isinstance(error, AnalysisStoreError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error)
    if isinstance(error, (CommandError, AnalysisStoreError)):
        return text or type(error).__name__
    return f"{text} ({type(error).__name__})" if text else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bluesky-analysis-store`` with ``argv`` (default: the process's) and return the
    exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(getattr(args, "verbose", 0))
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `ls | head`: the reader left; nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as error:
        if not isinstance(error, _user_errors()):
            raise  # a bug: its traceback is what the report needs
        logger.info("the command failed:", exc_info=True)  # the traceback, with --verbose
        _fail(_error_text(error))


if __name__ == "__main__":
    sys.exit(main())
