"""``watch``: derived runs, rows and frames printed (or plotted) as the store saves them."""

from __future__ import annotations

import argparse
import datetime
import json
import queue
import re
import sys
from typing import Any

from .._watching import DerivedRunWatcher, RunEnded, RunStarted, SavedEvent, SavedFrames
from ._exits import EXIT_OK, CommandError
from ._opening import find_parent_uid, open_store

__all__ = ["WATCH_HELP", "add_watch_arguments", "cmd_watch"]

WATCH_HELP = (
    "print each derived run, event row and block of frames as the store saves it, from this "
    "machine or another, through tiled's websocket streaming (the store's server must stream: "
    "an embedded store's local server does; a shared one runs 'serve --streaming')"
)

_FULL_UID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# How often the command looks for updates (and redraws a live plot).
_POLL_SECONDS = 0.05


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    from ._argument_types import positive_int

    parser.add_argument(
        "--children",
        metavar="RAW_UID",
        help="only the runs derived from this raw run (its whole uid, also before it has any "
        "child, or the first 8+ characters of a run the store knows)",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per update (with its 'type')"
    )
    parser.add_argument(
        "--plot",
        metavar="KEY",
        help="also plot this scalar key against the event number, one line per derived run",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="with --plot: write the plot to this PNG file after each update instead of a window",
    )
    parser.add_argument(
        "--runs",
        metavar="N",
        type=positive_int,
        help="stop after N derived runs have ended (default: run until Ctrl-C)",
    )


def cmd_watch(args: argparse.Namespace) -> int:
    store = open_store(args, served=True)  # an embedded store streams through its server
    parent_uid = None
    if args.children:
        text = args.children.strip()
        # A scan still running has no child yet: a whole uid is taken as it is.
        try:
            parent_uid = text if _FULL_UID.match(text) else find_parent_uid(store, text)
        except CommandError as error:
            raise CommandError(f"--children: {error}") from None
    plot = _LivePlot(args.plot, args.output) if args.plot else None
    updates: queue.Queue[Any] = queue.Queue()
    ended = 0
    with DerivedRunWatcher(store, updates.put, parent_uid=parent_uid):
        what = f"runs derived from {parent_uid}" if parent_uid else "derived runs"
        print(f"watching {what} in {store.location} (Ctrl-C to stop)", file=sys.stderr)
        try:
            while args.runs is None or ended < args.runs:
                try:
                    update = updates.get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    if plot is not None:
                        plot.idle()
                    continue
                _print(update, args.json)
                if plot is not None:
                    plot.add(update)
                if isinstance(update, RunEnded):
                    ended += 1
        except KeyboardInterrupt:
            pass
    if plot is not None:
        plot.close()
    return EXIT_OK


def _print(update: Any, as_json: bool) -> None:
    if as_json:
        record = {"type": type(update).__name__, **vars(update)}
        print(json.dumps(record, default=str), flush=True)
        return
    print(_text(update), flush=True)


def _clock(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).strftime("%H:%M:%S.%f")[:-3]


def _text(update: Any) -> str:
    stamp = _clock(update.received)
    if isinstance(update, RunStarted):
        start = update.start
        parents = ", ".join(uid[:8] for uid in start.get("parent_uids") or ())
        code = ", ".join(
            str(record.get("name"))
            for record in (start.get("provenance") or {}).get("code") or ()
            if isinstance(record, dict)
        )
        return f"{stamp} {update.uid[:8]} new derived run of {parents}" + (
            f" by {code}" if code else ""
        )
    if isinstance(update, SavedEvent):
        values = "  ".join(f"{key}={_value(value)}" for key, value in update.data.items())
        return f"{stamp} {update.uid[:8]} {update.stream} #{update.seq_num}  {values}"
    if isinstance(update, SavedFrames):
        last = update.first + update.count
        shape = "x".join(str(n) for n in update.frame_shape) or "scalar"
        return (
            f"{stamp} {update.uid[:8]} {update.stream} {update.key}: frames "
            f"{update.first + 1}-{last} ({shape})"
        )
    stop = update.stop
    counts = ", ".join(f"{k} {v}" for k, v in (stop.get("num_events") or {}).items())
    reduction = stop.get("reduction") or {}
    failed = reduction.get("events_failed")
    status = str(stop.get("exit_status", "?"))
    if failed:
        status += f", {failed} events failed"
    return f"{stamp} {update.uid[:8]} ended: {status}" + (f" ({counts})" if counts else "")


def _value(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class _LivePlot:
    """One line per derived run of a scalar key against the event number, redrawn as rows
    arrive: in a window, or into a PNG file rewritten after each batch (``-o``)."""

    def __init__(self, key: str, output: str | None) -> None:
        import matplotlib

        if output is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if output is None and matplotlib.get_backend().lower() == "agg":
            raise CommandError("--plot: no display to draw on here; give -o FILE.png")
        self._plt = plt
        self._key = key
        self._output = output
        self._figure, self._axes = plt.subplots()
        self._axes.set_xlabel("event (seq_num)")
        self._axes.set_ylabel(key)
        self._axes.set_title(f"{key}, as saved")
        self._lines: dict[str, Any] = {}
        self._points: dict[str, tuple[list[int], list[float]]] = {}
        self._changed = False
        if output is None:
            plt.ion()
            plt.show(block=False)

    def add(self, update: Any) -> None:
        if not isinstance(update, SavedEvent) or self._key not in update.data:
            return
        value = update.data[self._key]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return
        xs, ys = self._points.setdefault(update.uid, ([], []))
        xs.append(update.seq_num)
        ys.append(float(value))
        if update.uid not in self._lines:
            (self._lines[update.uid],) = self._axes.plot([], [], marker=".", label=update.uid[:8])
            self._axes.legend(title="derived run")
        self._lines[update.uid].set_data(xs, ys)
        self._changed = True

    def idle(self) -> None:
        """Between updates: draw what changed."""
        if not self._changed:
            if self._output is None:
                self._plt.pause(0.001)
            return
        self._changed = False
        self._axes.relim()
        self._axes.autoscale_view()
        self._axes.xaxis.get_major_locator().set_params(integer=True)
        if self._output is not None:
            self._figure.savefig(self._output)
        else:
            self._plt.pause(0.001)

    def close(self) -> None:
        self.idle()
        self._plt.close(self._figure)
