"""Delivery: from the journal to the store, on a thread of its own, exactly once.

The reduction hands every child document to :class:`JournaledSink`: it is journaled
(``_journal.py``) and queued here. The delivery thread writes it to the store with
bluesky-tiled-plugins' TiledWriter chain (``_tiled_writing.py``), one writer per child run,
so that a failed request taints only its own run. Nothing upstream waits for the store:
computing derived data never depends on it having accepted anything.

A request that fails leaves the run's state in the store unknown (a table append may or may
not have landed), so the run is delivered again from its journal, whole: the partial node is
deleted, every document is written again, and later documents follow. The stop document is
written last, only once the rows and array lengths read back from the store equal what the
journal holds: a child run in the store is either complete and aligned, or has no stop yet
(and its journal is still on disk). Failed runs are retried with exponential backoff while
the process lives; ``recover`` (``_recovery.py``) delivers journals that outlived theirs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import DeliveryError, JournalError
from ._handover import at_threading_exit
from ._journal import RunJournal, read_journal
from ._replay import StreamNode

__all__ = [
    "Delivery",
    "DeliveryError",
    "JournaledSink",
    "deliver_documents",
    "expected_counts",
    "save_documents",
]

logger = logging.getLogger(__name__)

# How often buffered rows of open runs are written, so readers see derived data live.
FLUSH_SECONDS = 0.5
# Backoff between deliveries of a run whose last one failed.
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0
# A store request taking longer than this counts as an outage: a run whose stop is journaled
# is then settled (the scan need not wait for a server that tiled's client retries for
# tens of seconds per request).
STALL_SECONDS = 3.0


Document = tuple[str, dict[str, Any]]


# --- what a run should look like in the store ---------------------------------------------


@dataclass
class Counts:
    """Events per stream, and frames per stream and external data key, of a run's
    documents, counted as they go by."""

    events: Counter[str] = field(default_factory=Counter)
    frames: Counter[tuple[str, str]] = field(default_factory=Counter)
    _streams: dict[str, str] = field(default_factory=dict, repr=False)
    _data_keys: dict[str, str] = field(default_factory=dict, repr=False)

    def add(self, name: str, doc: dict[str, Any]) -> None:
        if name == "descriptor":
            self._streams[doc["uid"]] = doc["name"]
            self.events[doc["name"]] += 0
        elif name == "event":
            self.events[self._streams[doc["descriptor"]]] += 1
        elif name == "stream_resource":
            self._data_keys[doc["uid"]] = doc["data_key"]
        elif name == "stream_datum":
            key = (self._streams[doc["descriptor"]], self._data_keys[doc["stream_resource"]])
            self.frames[key] += doc["indices"]["stop"] - doc["indices"]["start"]


def expected_counts(documents: Iterable[Document]) -> Counts:
    counts = Counts()
    for name, doc in documents:
        counts.add(name, doc)
    return counts


def stored_counts_match(client: Any, uid: str, expected: Counts) -> str | None:
    """None if the run ``uid`` in the store holds what ``expected`` says; else what differs.
    Each stream node is fetched once, for its rows and its external arrays."""
    run = client[uid]
    frames_by_stream: dict[str, dict[str, int]] = {}
    for (stream, key), frames in expected.frames.items():
        frames_by_stream.setdefault(stream, {})[key] = frames
    for stream in set(expected.events) | set(frames_by_stream):
        events = expected.events.get(stream, 0)
        frames = frames_by_stream.get(stream, {})
        if events == 0 and not frames:
            continue
        try:
            node = StreamNode(run[stream])
        except KeyError:
            return f"stream {stream!r} is missing, the journal has {events} events"
        if events:
            rows = node.length()
            if rows != events:
                return f"stream {stream!r} has {rows} rows, the journal {events} events"
        for key, expected_frames in frames.items():
            length = node.frames(key)
            if length != expected_frames:
                return f"{stream}/{key} has {length} frames, the journal {expected_frames}"
    return None


# --- delivering a whole run at once -------------------------------------------------------


def deliver_documents(store: Any, documents: list[Document]) -> Any:
    """Write a child run's documents into ``store`` from scratch and check them.

    A run of that uid already in the store is replaced (a partial delivery of an earlier
    attempt), unless it is complete with the same stop: then nothing is written. The stop,
    if any, is written only after the rows and frames read back equal the documents'.
    Returns the writer, which can take the run's next documents (None if the run was
    complete already).
    """
    from ._tiled_writing import FlushingTiledWriter

    if not documents or documents[0][0] != "start":
        raise DeliveryError("a run's documents begin with its start")
    uid = documents[0][1]["uid"]
    stop = next((doc for name, doc in documents if name == "stop"), None)
    counts = expected_counts(documents)
    client = store.catalog
    if uid in client:
        if stop is not None and _has_stop(client, uid, stop["uid"]):
            if stored_counts_match(client, uid, counts) is None:
                return None
        client.delete_contents([uid], recursive=True, external_only=False)
    writer = FlushingTiledWriter(client, flush_interval=None, seal=True)
    for name, doc in documents:
        if name != "stop":
            store.check_asset_location(name, doc)
            writer(name, doc)
    writer.flush()
    if stop is not None:
        _write_stop(store, writer, uid, counts, stop, documents[0][1])
    return writer


def save_documents(store: Any, documents: list[Document]) -> None:
    """Save a whole run the durable way: journal it, deliver it, check it, drop the journal.

    If the store fails, the run stays in its journal and :class:`DeliveryError` says where;
    ``recover`` delivers it later. The store never keeps a partial run without a journal
    that completes it.
    """
    for name, doc in documents:
        store.check_asset_location(name, doc)
    journal = RunJournal(store.journal_folder, documents[0][1]["uid"])
    try:
        # A journal of this uid left by an earlier attempt (its process ended, perhaps
        # mid-line) is replaced by the whole run, not appended to.
        journal.clear()
        journal.append_all(documents)
        journal.sync()
        deliver_documents(store, documents)
    except JournalError:
        journal.remove()
        raise
    except Exception as error:
        journal.close()
        raise DeliveryError(
            f"run {journal.run_uid} could not be saved in the store ({type(error).__name__}: "
            f"{error}); it is kept in the journal {journal.path} and "
            "`bluesky-analysis-store recover` delivers it once the store takes it"
        ) from error
    journal.remove()


def _has_stop(client: Any, uid: str, stop_uid: str) -> bool:
    stored = client[uid].metadata.get("stop") or {}
    return stored.get("uid") == stop_uid


def _write_stop(
    store: Any,
    writer: Any,
    uid: str,
    counts: Counts,
    stop: dict[str, Any],
    start: Mapping[str, Any] | None,
) -> None:
    writer.flush()
    mismatch = stored_counts_match(store.catalog, uid, counts)
    if mismatch is not None:
        raise DeliveryError(f"child run {uid} read back differs from its journal: {mismatch}")
    writer("stop", stop, close_streams=False)
    writer.close_streams()
    # The run is whole and checked: its provenance goes into tiled's graph too (best effort:
    # the start document keeps the same facts).
    from ._provenance_graph import write_provenance_links

    if start is None:  # not in hand: the start as the store keeps it
        start = store.catalog[uid].metadata.get("start") or {}
    write_provenance_links(store.catalog, uid, start)


# --- the live delivery thread -------------------------------------------------------------


@dataclass
class _Run:
    journal: RunJournal
    counts: Counts = field(default_factory=Counts)  # of the documents delivered
    writer: Any = None
    delivered: int = 0  # journal records written to the store
    tainted: bool = False  # a request failed: deliver again from the journal
    failures: int = 0
    retry_at: float = 0.0
    stopped: bool = False  # the stop is journaled and on disk
    done: bool = False
    start: dict[str, Any] | None = None  # its start document, once delivered
    on_settled: list[Callable[[], None]] = field(default_factory=list)


class Delivery:
    """Delivers the journaled child runs of this process to ``store``, on its own thread."""

    def __init__(self, store: Any, journal_folder: str | Path | None = None) -> None:
        self.store = store
        self.folder = Path(journal_folder or store.journal_folder)
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._healthy = True
        self._closed = False
        self._busy_since: float | None = None  # when the current store request began
        # Set at interpreter exit, after the callbacks' own exit hooks: no request may then
        # reach a store whose in-process server is being shut down (it would never end).
        self._exiting = False
        self._thread = threading.Thread(
            target=self._deliver_all, name="analysis-store-delivery", daemon=True
        )
        self._thread.start()
        at_threading_exit(functools.partial(_stop_at_exit, weakref.ref(self)))
        threading.Thread(
            target=_watch_for_stalls,
            args=(weakref.ref(self),),
            name="analysis-store-watchdog",
            daemon=True,
        ).start()

    @property
    def healthy(self) -> bool:
        """False from a failed request until a run is delivered again."""
        return self._healthy

    # --- called by the reduction --------------------------------------------------------

    def open_run(self, uid: str) -> RunJournal:
        journal = RunJournal(self.folder, uid)
        with self._lock:
            self._runs[uid] = _Run(journal)
        return journal

    def journaled(self, uid: str, index: int, name: str, doc: dict[str, Any]) -> None:
        """``doc`` is record ``index`` of run ``uid``'s journal: deliver it."""
        self._queue.put(("doc", uid, index, name, doc))

    def stop_journaled(self, uid: str) -> None:
        """Run ``uid``'s stop is on disk: from now on an outage need not hold anyone up."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                return
            run.stopped = True
        if not self._healthy:
            self._settle_if_ready(run)

    def when_settled(self, uid: str | None, callback: Callable[[], None]) -> None:
        """Call ``callback`` once run ``uid`` is delivered, or is safe in its journal while
        the store fails (at once if this delivery does not know the run)."""
        with self._lock:
            run = self._runs.get(uid) if uid else None
            if run is not None and not _settled(run, self._healthy):
                run.on_settled.append(callback)
                return
        callback()

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver what was journaled so far and write the buffered rows; False if the
        store failed (the runs stay in their journals) or ``timeout`` passed."""
        done = threading.Event()
        result: list[bool] = []
        self._queue.put(("flush", done, result))
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(1.0 if deadline is None else min(1.0, deadline - time.monotonic())):
            if not self._thread.is_alive() or (deadline and time.monotonic() >= deadline):
                return False
        return all(result)

    def close(self, timeout: float | None = None) -> list[Path]:
        """Deliver what is queued (retrying failed runs until ``timeout``), then release
        the journals. Returns the journals left undelivered."""
        if self._closed:
            return []
        self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        self._queue.put(("close", deadline))
        self._thread.join(timeout)
        left: list[Path] = []
        with self._lock:
            runs, self._runs = self._runs, {}
        for run in runs.values():
            run.journal.close()
            left.append(run.journal.path)
        if left:
            logger.warning(
                "%d child run(s) not delivered to the analysis store; their journals are in %s "
                "(deliver them with `bluesky-analysis-store recover`)",
                len(left),
                self.folder,
            )
        return left

    def end_open_runs(self, reason: str) -> None:
        """Close every run whose stop is not journaled with a stop of ``exit_status:
        "fail"`` and ``reason``, in its journal only, for a process about to end abruptly
        (``recover`` delivers them)."""
        from ._recovery import interrupted_stop

        with self._lock:
            runs = [r for r in self._runs.values() if not r.stopped]
        for run in runs:
            try:
                contents = read_journal(run.journal.path)
                run.journal.append("stop", interrupted_stop(contents, run.journal.run_uid, reason))
                run.journal.sync()
            except Exception:
                logger.exception("child run %s could not be closed", run.journal.run_uid)

    # --- the thread ---------------------------------------------------------------------

    def _deliver_all(self) -> None:
        try:
            self._deliver_until_closed()
        except Exception:  # a defect here must not pass silently: the journals keep the runs
            logger.exception(
                "the delivery of derived data stopped; child runs stay in the journal %s for "
                "`bluesky-analysis-store recover`",
                self.folder,
            )

    def _deliver_until_closed(self) -> None:
        self._recover_left_over()
        last_flush = time.monotonic()
        while True:
            try:
                item: tuple[Any, ...] | None = self._queue.get(timeout=self._wait())
            except queue.Empty:
                item = None
            while item is not None:
                if item[0] == "doc":
                    self._deliver_one(*item[1:])
                elif item[0] == "flush":
                    self._flush_runs()
                    self._retry_tainted(force=True)
                    item[2].append(self._healthy and not self._any_tainted())
                    item[1].set()
                elif item[0] == "close":
                    self._flush_runs()
                    self._finish(item[1])
                    return
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            self._retry_tainted()
            if time.monotonic() - last_flush >= FLUSH_SECONDS:
                self._flush_runs()
                last_flush = time.monotonic()

    def _recover_left_over(self) -> None:
        """Journals that outlived their process (killed, or the store was down when it
        ended): deliver them now, as ``recover`` would."""
        from ._recovery import recover

        try:
            with self._request():
                recover(self.store, self.folder)
        except Exception:
            logger.exception("journals left by earlier sessions could not be recovered")

    def _wait(self) -> float:
        retry_at = [r.retry_at for r in list(self._runs.values()) if r.tainted]
        if not retry_at:
            return FLUSH_SECONDS
        return min(FLUSH_SECONDS, max(0.01, min(retry_at) - time.monotonic()))

    def _any_tainted(self) -> bool:
        return any(r.tainted for r in list(self._runs.values()))

    def _finish(self, deadline: float | None) -> None:
        """Retry failed runs until none is left or ``deadline`` has passed."""
        while self._any_tainted():
            if deadline is not None and time.monotonic() >= deadline:
                return
            self._retry_tainted(force=True)
            if self._any_tainted():
                time.sleep(RETRY_FIRST_SECONDS)

    def _deliver_one(self, uid: str, index: int, name: str, doc: dict[str, Any]) -> None:
        run = self._runs.get(uid)
        if run is None or run.done or index < run.delivered:
            return
        if run.tainted:  # delivered again from the journal when its retry is due
            self._settle_if_ready(run)
            return
        try:
            with self._request():
                if run.writer is None:
                    from ._tiled_writing import FlushingTiledWriter

                    run.writer = FlushingTiledWriter(
                        self.store.catalog, flush_interval=None, seal=True
                    )
                if name == "stop":
                    _write_stop(self.store, run.writer, uid, run.counts, doc, run.start)
                else:
                    run.writer(name, doc)
                    run.counts.add(name, doc)
                    if name == "start":
                        run.start = doc
            run.delivered = index + 1
        except Exception as error:
            self._taint(run, error)
            return
        if name == "stop":
            self._delivered(uid, run)

    def _flush_runs(self) -> None:
        for run in list(self._runs.values()):
            if run.writer is None or run.tainted or run.done:
                continue
            try:
                with self._request():
                    run.writer.flush()
            except Exception as error:
                self._taint(run, error)

    def _retry_tainted(self, force: bool = False) -> None:
        now = time.monotonic()
        for uid, run in list(self._runs.items()):
            if not run.tainted or (run.retry_at > now and not force):
                continue
            try:
                contents = read_journal(run.journal.path)
                with self._request():
                    writer = deliver_documents(self.store, contents.documents)
            except Exception as error:
                self._taint(run, error)
                continue
            # What the journal did not hold yet follows from the queue, as usual.
            run.tainted = False
            run.writer = writer
            run.delivered = len(contents.documents)
            run.counts = expected_counts(contents.documents)
            logger.info("child run %s delivered again from its journal", uid)
            if not self._healthy and not self._any_tainted():
                self._healthy = True
                logger.warning("the analysis store answers again; derived data is delivered")
            if contents.stop is not None:
                run.stopped = True
                self._delivered(uid, run)

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        if self._exiting:
            raise DeliveryError("the interpreter is exiting: the journal keeps the run")
        self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = None
        if not self._healthy and not self._any_tainted():
            self._healthy = True  # it answered, and nothing waits to be delivered again
            logger.warning("the analysis store answers again; derived data is delivered")

    def _check_stalled(self) -> None:
        since = self._busy_since
        if since is None or time.monotonic() - since < STALL_SECONDS or not self._healthy:
            return
        self._healthy = False
        logger.warning(
            "the analysis store has not answered for %.0f s; child runs are kept in the "
            "journal %s and delivered when it answers, or later with "
            "`bluesky-analysis-store recover`",
            time.monotonic() - since,
            self.folder,
        )
        for run in list(self._runs.values()):
            self._settle_if_ready(run)

    def _taint(self, run: _Run, error: Exception) -> None:
        if self._exiting:  # not a store failure; the journal keeps the run for recover
            return
        run.tainted = True
        run.writer = None
        run.counts = Counts()
        run.delivered = 0
        run.failures += 1
        delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (run.failures - 1))
        run.retry_at = time.monotonic() + delay
        if self._healthy:
            self._healthy = False
            logger.warning(
                "the analysis store did not accept derived data (%s: %s); child runs are kept "
                "in the journal %s and delivered again automatically, or later with "
                "`bluesky-analysis-store recover`",
                type(error).__name__,
                error,
                self.folder,
            )
        else:
            logger.debug("delivery of child run %s failed again: %s", run.journal.run_uid, error)
        self._settle_if_ready(run)

    def _delivered(self, uid: str, run: _Run) -> None:
        run.done = True
        run.tainted = False
        try:
            run.journal.remove()
        except OSError:
            logger.exception(
                "the journal %s of a delivered run could not be removed", run.journal.path
            )
        with self._lock:
            self._runs.pop(uid, None)
        self._settle_if_ready(run)

    def _settle_if_ready(self, run: _Run) -> None:
        with self._lock:
            if not _settled(run, self._healthy):
                return
            callbacks, run.on_settled = run.on_settled, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                logger.exception("a callback waiting for a child run failed")


def _settled(run: _Run, healthy: bool = True) -> bool:
    return run.done or (run.stopped and (run.tainted or not healthy))


# At interpreter exit, how long a store request in flight may take to end.
_EXIT_REQUEST_SECONDS = 5.0


def _stop_at_exit(delivery_ref: weakref.ref[Delivery]) -> None:
    delivery = delivery_ref()
    if delivery is None:
        return
    delivery._exiting = True
    deadline = time.monotonic() + _EXIT_REQUEST_SECONDS
    while delivery._busy_since is not None and time.monotonic() < deadline:
        time.sleep(0.01)


def _watch_for_stalls(delivery_ref: weakref.ref[Delivery]) -> None:
    while True:
        time.sleep(STALL_SECONDS / 3)
        delivery = delivery_ref()
        if delivery is None or delivery._closed:
            return
        delivery._check_stalled()
        del delivery


class JournaledSink:
    """Where a :class:`RunReduction` sends its child run: the journal, then delivery.

    Documents that cannot be journaled raise (the reduction records the failure) and leave
    the journal as it was; those journaled are never lost, whatever the store does. After a
    failed write the child run is not continued (its next documents would not line up with
    the ones lost): it ends with a stop of ``exit_status: "fail"`` whose counts are those
    of the journal, or, if even that cannot be written, ``recover`` closes it later.
    """

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery
        self._journal: RunJournal | None = None
        self._counts = Counts()
        self._broken: str | None = None

    @property
    def uid(self) -> str | None:
        return self._journal.run_uid if self._journal else None

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.write_all([(name, doc)])

    def write_all(self, documents: list[Document]) -> None:
        if documents and documents[0][0] == "start":
            self._journal = self._delivery.open_run(documents[0][1]["uid"])
        journal = self._journal
        if journal is None:
            raise JournalError("a document before its run's start was journaled")
        if self._broken is not None:
            if documents[-1][0] != "stop":
                raise JournalError(f"the child run's journal failed earlier ({self._broken})")
            documents = [("stop", self._failed_stop(documents[-1][1]))]
        try:
            for name, doc in documents:
                self._delivery.store.check_asset_location(name, doc)
            index = journal.append_all(documents)
        except Exception as error:
            self._broken = f"{type(error).__name__}: {error}"
            raise
        for name, doc in documents:
            self._counts.add(name, doc)
        if documents[-1][0] == "stop":
            journal.sync()
            self._delivery.stop_journaled(journal.run_uid)
        for offset, (name, doc) in enumerate(documents):
            self._delivery.journaled(journal.run_uid, index + offset, name, doc)

    def _failed_stop(self, stop: dict[str, Any]) -> dict[str, Any]:
        return {
            **stop,
            "exit_status": "fail",
            "reason": f"derived data could not be journaled: {self._broken}",
            "num_events": dict(self._counts.events),
        }
