"""Live view in the session: child runs re-emitted to local subscribers, and the scan summary.

``callback.subscribe(LivePlot("roi_total", "motor"))`` (any ``f(name, doc)``: a
``LiveTable``, a ``BestEffortCallback``, a function) gets the documents of every child run
while it is being made, in the session's process whatever the callback's ``background``:
the worker process sends them back over its pipe, but only while there is a subscriber.

What a subscriber receives, for display (the documents saved in the store are unchanged):

- ``start``, ``descriptor``, ``event`` and ``stop`` of each child run, in order; no
  ``resource``/``datum``/``stream_*`` documents and no file-backed data keys: array data
  written to files is read from the store after the scan (``store[uid]``), while inline
  values (scalars, small arrays kept inline) come as they are. Plotting and table callbacks
  show scalars only anyway.
- Each descriptor also holds the parent stream's scalar readings that are not external
  (the motor positions, detector totals), with their units and sources, under their own
  names unless a derived key has that name; each event holds the values of the raw event
  it was reduced from (joined on ``parent_seq_num``). So ``LivePlot("roi_total", "motor")``
  plots a derived value against the scan's motor.
- The start carries the parent's ``scan_id``, ``motors`` and ``hints`` (unless the child's
  metadata has them), and each descriptor hints the derived keys and the scan's motors
  only: bluesky's ``BestEffortCallback`` tables and plots the derived values (not the raw
  detectors again) against the scan's dimensions.

Subscribers are called one after another on a thread of the callback, never on the
RunEngine's: a slow plot does not hold up the scan's points (the wait for derived data
after the run, see below, does wait for it, as a slow RunEngine subscriber would). This is
what bluesky does itself (the RunEngine calls its subscribers on its event loop's thread):
bluesky's Qt-aware callbacks (``LivePlot``, ``BestEffortCallback``) hand the drawing to the
main thread through their "teleporter" when matplotlib's backend is Qt, made on the main
thread when they are. A
subscriber gets the child runs whose start came after it subscribed. What it raises is
logged (once per run with its traceback) and never reaches the reduction or the scan.

After each raw run's stop, once its child run is saved (or kept in its journal, or lost),
the session logs one summary line (``_run_summary``); the RunEngine's wait for derived data
ends only after that, and after the subscribers were handed the whole child run.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from event_model import unpack_event_page

from ._run_summary import SUMMARY_LOGGER, ReductionOutcome, lost_line, summary_line

__all__ = ["DISPLAYED_DOCUMENTS", "LiveView", "Subscriber", "finished_through"]

logger = logging.getLogger(__name__)
summary_logger = logging.getLogger(SUMMARY_LOGGER)

Subscriber = Callable[[str, dict[str, Any]], Any]

# The child documents a subscriber is given (and a worker process sends back).
DISPLAYED_DOCUMENTS = frozenset({"start", "descriptor", "event", "stop"})
# Raw runs whose readings are kept for joining, most recent first; older ones are dropped
# (a child run that lags this far behind its raw run gets no parent readings).
_RAW_RUNS_KEPT = 16
# The object every derived key of a re-emitted descriptor belongs to.
DERIVED_OBJECT = "derived"


class _RawRun:
    """What the session saw of one raw run: enough to join its readings to its child's."""

    def __init__(self, start: dict[str, Any]) -> None:
        self.start = start
        self.scan_id = start.get("scan_id")
        # stream name -> scalar, inline data keys (and the objects they belong to)
        self.data_keys: dict[str, dict[str, dict[str, Any]]] = {}
        self.object_keys: dict[str, dict[str, list[str]]] = {}
        self.hints: dict[str, dict[str, Any]] = {}
        # (stream, seq_num) -> (values, timestamps), until the child event takes them
        self.readings: dict[tuple[str, int], tuple[dict[str, Any], dict[str, Any]]] = {}


class _ChildRun:
    """A child run being re-emitted: its parent and the subscribers it goes to."""

    def __init__(self, parent: _RawRun | None, subscribers: list[tuple[int, Subscriber]]):
        self.parent = parent
        self.subscribers = subscribers
        self.streams: dict[str, str] = {}  # descriptor uid -> stream name
        self.derived_keys: dict[str, frozenset[str]] = {}  # descriptor uid -> displayed keys
        self.failed: set[int] = set()  # subscriber tokens whose failure was logged


class LiveView:
    """The session's end of the live view: subscribers, the parent readings to join, and
    the thread that hands child documents and summary lines out in order."""

    def __init__(self, *, summary: bool = True) -> None:
        self.summary = summary
        self._subscribers: dict[int, Subscriber] = {}
        self._tokens = itertools.count()
        self._lock = threading.Lock()  # raw runs are recorded on the RunEngine's thread
        self._raw: OrderedDict[str, _RawRun] = OrderedDict()
        self._raw_streams: dict[str, tuple[_RawRun, str]] = {}  # raw descriptor uid ->
        self._children: dict[str, _ChildRun] = {}
        self._child_streams: dict[str, _ChildRun] = {}  # child descriptor uid ->
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(
            target=self._dispatch_all, name="analysis-store-live-view", daemon=True
        )
        self._thread.start()

    # --- subscribers ----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether anyone is subscribed (only then are child documents sent here)."""
        return bool(self._subscribers)

    def subscribe(self, subscriber: Subscriber) -> int:
        token = next(self._tokens)
        self._subscribers[token] = subscriber
        return token

    def unsubscribe(self, token_or_subscriber: int | Subscriber) -> None:
        """Remove a subscriber by its token, or every subscription of that callable."""
        if isinstance(token_or_subscriber, int):
            self._subscribers.pop(token_or_subscriber, None)
            return
        for token, subscriber in list(self._subscribers.items()):
            if subscriber is token_or_subscriber:
                del self._subscribers[token]

    # --- the raw runs, seen on the RunEngine's thread -------------------------------------

    def raw(self, name: str, doc: dict[str, Any]) -> None:
        """Note what a child document will need of a raw one: cheap, and it never raises."""
        try:
            if name == "start":
                with self._lock:
                    self._raw[doc["uid"]] = _RawRun(doc)
                    while len(self._raw) > _RAW_RUNS_KEPT:
                        _, dropped = self._raw.popitem(last=False)
                        self._forget_streams(dropped)
            elif not self._subscribers:
                return
            elif name == "descriptor":
                self._raw_descriptor(doc)
            elif name == "event":
                self._raw_event(doc)
            elif name == "event_page":
                for event in unpack_event_page(doc):
                    self._raw_event(event)
        except Exception:  # a reading the join cannot use must not reach the RunEngine
            logger.exception("the live view could not note a raw %s document", name)

    def _raw_descriptor(self, doc: dict[str, Any]) -> None:
        with self._lock:
            run = self._raw.get(doc["run_start"])
            if run is None:
                return
            stream = doc.get("name", "primary")
            scalars = {
                key: copy.deepcopy(data_key)
                for key, data_key in doc.get("data_keys", {}).items()
                if "external" not in data_key and not data_key.get("shape")
            }
            run.data_keys[stream] = scalars
            run.object_keys[stream] = {
                obj: [key for key in keys if key in scalars]
                for obj, keys in doc.get("object_keys", {}).items()
            }
            run.hints[stream] = copy.deepcopy(doc.get("hints", {}))
            self._raw_streams[doc["uid"]] = (run, stream)

    def _raw_event(self, doc: dict[str, Any]) -> None:
        found = self._raw_streams.get(doc["descriptor"])
        if found is None:
            return
        run, stream = found
        keys = run.data_keys[stream]
        data, stamps = doc["data"], doc.get("timestamps", {})
        values = {key: data[key] for key in keys if key in data}
        times = {key: stamps[key] for key in values if key in stamps}
        with self._lock:
            run.readings[(stream, doc["seq_num"])] = (values, times)

    def _forget_streams(self, run: _RawRun) -> None:
        for uid in [uid for uid, (known, _) in self._raw_streams.items() if known is run]:
            del self._raw_streams[uid]

    # --- the child runs, from whichever worker makes them ---------------------------------

    def child(self, name: str, doc: dict[str, Any]) -> None:
        """Hand a child document to the subscribers (later, on the view's thread)."""
        if name in DISPLAYED_DOCUMENTS:
            self._queue.put(("doc", name, doc))

    def child_documents(self, documents: Iterable[tuple[str, dict[str, Any]]]) -> None:
        for name, doc in documents:
            self.child(name, doc)

    def settled(self, outcome: ReductionOutcome, then: Callable[[], None]) -> None:
        """Log ``outcome``'s summary line after the child documents handed over so far have
        been dispatched, then call ``then`` (which ends the scan's wait)."""
        self._queue.put(("settled", outcome, then))

    def lost(self, raw_uids: Iterable[str], why: str) -> None:
        """The child runs of ``raw_uids`` were lost with their worker."""
        raw_uids = tuple(raw_uids)
        if raw_uids:
            self._queue.put(("lost", raw_uids, why))

    def drain(self, timeout: float | None) -> bool:
        """Wait until everything handed over so far is dispatched; False on timeout."""
        if not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(("drain", done))
        return done.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Dispatch what is queued (within ``timeout``), then stop the view's thread."""
        if self._closed:
            return
        self._closed = True
        self.drain(timeout)
        self._queue.put(("close",))

    # --- the view's thread ----------------------------------------------------------------

    def _dispatch_all(self) -> None:
        while True:
            item = self._queue.get()
            kind = item[0]
            if kind == "close":
                return
            try:
                if kind == "doc":
                    self._dispatch(item[1], item[2])
                elif kind == "settled":
                    self._report(item[1])
                    item[2]()
                elif kind == "lost":
                    self._report_lost(item[1], item[2])
                elif kind == "drain":
                    item[1].set()
            except Exception:  # the view goes on with the next document
                logger.exception("the live view failed on a %s", kind)

    def _dispatch(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            parent_uids = doc.get("parent_uids") or [None]
            with self._lock:
                parent = self._raw.get(parent_uids[0])
            subscribers = list(self._subscribers.items())
            if not subscribers:
                return
            child = self._children[doc["uid"]] = _ChildRun(parent, subscribers)
            self._send(child, name, _start_for_display(doc, parent))
            return
        if name == "event":
            child = self._child_streams.get(doc["descriptor"])
        else:
            child = self._children.get(doc["run_start"])
        if child is None:
            return  # a run whose start came before anyone subscribed
        if name == "descriptor":
            shown = self._descriptor_for_display(child, doc)
            child.streams[doc["uid"]] = doc["name"]
            self._child_streams[doc["uid"]] = child
            self._send(child, name, shown)
        elif name == "event":
            self._send(child, name, self._event_for_display(child, doc))
        else:
            self._send(child, name, copy.deepcopy(doc))
            del self._children[doc["run_start"]]
            for uid in child.streams:
                self._child_streams.pop(uid, None)
            if child.parent is not None:
                with self._lock:
                    child.parent.readings.clear()

    def _descriptor_for_display(self, child: _ChildRun, doc: dict[str, Any]) -> dict[str, Any]:
        derived = {
            key: copy.deepcopy(data_key)
            for key, data_key in doc["data_keys"].items()
            if "external" not in data_key
        }
        child.derived_keys[doc["uid"]] = frozenset(derived)
        stream = doc["name"]
        parent = child.parent
        with self._lock:
            parent_keys = dict(parent.data_keys.get(stream, {})) if parent else {}
            parent_objects = dict(parent.object_keys.get(stream, {})) if parent else {}
            parent_hints = dict(parent.hints.get(stream, {})) if parent else {}
            motors = set(parent.start.get("motors") or ()) if parent else set()
        joined = {key: value for key, value in parent_keys.items() if key not in derived}
        object_keys = {
            obj: [key for key in keys if key in joined] for obj, keys in parent_objects.items()
        }
        object_keys = {obj: keys for obj, keys in object_keys.items() if keys}
        object_keys[DERIVED_OBJECT] = list(derived)
        hinted = [key for key in derived if key != "parent_seq_num"]
        # The scan's motors keep their hints (what BestEffortCallback takes as the x axis
        # when the plan hints no dimensions); the parent's detectors are not shown again.
        hints = {
            obj: copy.deepcopy(parent_hints.get(obj, {})) if obj in motors else {"fields": []}
            for obj in object_keys
        }
        hints[DERIVED_OBJECT] = {"fields": hinted}
        return {
            **copy.deepcopy(doc),
            "data_keys": {**joined, **derived},
            "object_keys": object_keys,
            "hints": hints,
        }

    def _event_for_display(self, child: _ChildRun, doc: dict[str, Any]) -> dict[str, Any]:
        shown = child.derived_keys.get(doc["descriptor"], frozenset())
        data = {key: value for key, value in doc["data"].items() if key in shown}
        stamps = {key: value for key, value in doc.get("timestamps", {}).items() if key in shown}
        parent_seq_num = data.get("parent_seq_num")
        if child.parent is not None and parent_seq_num is not None:
            stream = child.streams[doc["descriptor"]]
            with self._lock:
                values, times = child.parent.readings.pop((stream, int(parent_seq_num)), ({}, {}))
            data = {**{k: v for k, v in values.items() if k not in data}, **data}
            stamps = {**{k: v for k, v in times.items() if k not in stamps}, **stamps}
        filled = {key: value for key, value in doc.get("filled", {}).items() if key in shown}
        return {**doc, "data": data, "timestamps": stamps, "filled": filled}

    def _send(self, child: _ChildRun, name: str, doc: dict[str, Any]) -> None:
        for token, subscriber in child.subscribers:
            if token not in self._subscribers:
                continue  # unsubscribed meanwhile
            try:
                subscriber(name, doc)
            except Exception:
                if token in child.failed:
                    logger.debug("a live subscriber failed again on a %s document", name)
                    continue
                child.failed.add(token)
                logger.exception(
                    "the live subscriber %r failed on a %s document of child run %s (logged "
                    "once per run; the reduction and the scan go on)",
                    subscriber,
                    name,
                    doc.get("run_start", doc.get("uid")),
                )

    # --- summary lines --------------------------------------------------------------------

    def _report(self, outcome: ReductionOutcome) -> None:
        with self._lock:  # its child documents came before this: the run is done with
            run = self._raw.pop(outcome.raw_uid, None)
            if run is not None:
                self._forget_streams(run)
        seen = run is not None
        # A run whose start was never seen here was ignored (and said so), not reduced.
        if self.summary and seen:
            level, text = summary_line(outcome)
            summary_logger.log(level, text)

    def _report_lost(self, raw_uids: tuple[str, ...], why: str) -> None:
        if not self.summary:
            return
        for raw_uid in raw_uids:
            with self._lock:
                run = self._raw.pop(raw_uid, None)
            summary_logger.error(lost_line(raw_uid, run.scan_id if run else None, why))


def _start_for_display(doc: dict[str, Any], parent: _RawRun | None) -> dict[str, Any]:
    shown = copy.deepcopy(doc)
    if parent is not None:
        for key in ("scan_id", "motors", "hints"):
            if key in parent.start and key not in shown:
                shown[key] = copy.deepcopy(parent.start[key])
    return shown


def finished_through(
    view: LiveView | None, finished: Callable[[str], None]
) -> Callable[[ReductionOutcome], None]:
    """``on_run_finished`` for a router: ``finished(raw_uid)`` (a RunWaiter's, ending the
    scan's wait) after ``view`` has dispatched the child run and logged its summary."""

    def on_run_finished(outcome: ReductionOutcome) -> None:
        then = functools.partial(finished, outcome.raw_uid)
        if view is None:
            then()
        else:
            view.settled(outcome, then)

    return on_run_finished
