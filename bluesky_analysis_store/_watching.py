"""Following a store's derived runs as they are saved, from any machine, over tiled's
websocket streaming.

A store whose server has a streaming cache (every embedded store's local server, and
``bluesky-analysis-store serve --streaming``) tells subscribers of each node created under
a container and of each block of rows or frames written to a table or an array. A
:class:`DerivedRunWatcher` subscribes to the catalog's root; for every new run that this
package sealed as derived data (and, if asked, whose parents include a given raw run), it
follows the run's streams down to their event tables and arrays, and hands each saved row
on as a :class:`SavedEvent` and each block of frames as a :class:`SavedFrames`.

Nested subscriptions start from the node's first update (``start=0``): the streams of a run
are created right after the run, before a subscription made on hearing of the run could
otherwise connect. tiled keeps its callbacks by weak reference, so the watcher holds them.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ._errors import AnalysisStoreError
from ._trust import is_sealed

__all__ = ["DerivedRunWatcher", "RunEnded", "RunStarted", "SavedEvent", "SavedFrames"]

logger = logging.getLogger(__name__)

# Columns of an event table that are not the event's data.
_BOOKKEEPING = ("seq_num", "time")


@dataclasses.dataclass(frozen=True)
class RunStarted:
    """A derived run appeared in the store (``received``: when this process heard of it)."""

    uid: str
    start: Mapping[str, Any]
    received: float


@dataclasses.dataclass(frozen=True)
class SavedEvent:
    """One event row of a derived run, as it reached the store: its scalar data. ``saved``
    is when the server wrote it (its clock), ``received`` when this process heard of it."""

    uid: str
    parent_uids: tuple[str, ...]
    stream: str
    seq_num: int
    time: float
    data: Mapping[str, Any]
    saved: float
    received: float


@dataclasses.dataclass(frozen=True)
class SavedFrames:
    """A block of an array key of a derived run (external or inline frames) was saved."""

    uid: str
    stream: str
    key: str
    first: int
    count: int
    frame_shape: tuple[int, ...]
    saved: float
    received: float


@dataclasses.dataclass(frozen=True)
class RunEnded:
    """A derived run's stop document was saved; it comes after the run's rows."""

    uid: str
    stop: Mapping[str, Any]
    saved: float
    received: float


Update = RunStarted | SavedEvent | SavedFrames | RunEnded

# How long the end of a run waits for rows its stop counts but that have not been heard of
# (each node streams on a connection of its own: the stop may be heard of first).
ROWS_AFTER_STOP_SECONDS = 5.0


@dataclasses.dataclass
class _FollowedRun:
    parents: tuple[str, ...]
    sealed: bool = False
    ended: bool = False
    pending: list[Any] = dataclasses.field(default_factory=list)
    rows: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    stop: RunEnded | None = None


class DerivedRunWatcher:
    """Call ``on_update`` with every derived run, row and block of frames saved into the
    store from now on (runs of ``parent_uid`` only, when given); see the module's doc.

    ``on_update`` is called from the subscriptions' threads, one update at a time. A run's
    :class:`RunEnded` comes after its rows (at most ``ROWS_AFTER_STOP_SECONDS`` late).
    Use as a context manager, or :meth:`start` then :meth:`close`.
    """

    def __init__(
        self,
        store: Any,
        on_update: Callable[[Update], None],
        *,
        parent_uid: str | None = None,
    ) -> None:
        self._catalog = store.catalog
        self._on_update = on_update
        self._parent_uid = parent_uid
        self._lock = threading.RLock()  # the runs' state, and one update at a time
        self._subscriptions: list[Any] = []
        self._callbacks: list[Callable[[Any], None]] = []  # tiled holds them weakly
        self._runs: dict[str, _FollowedRun] = {}
        self._closed = False

    def start(self) -> DerivedRunWatcher:
        """Subscribe to the store's root; raises :class:`AnalysisStoreError` if the store's
        server does not stream."""
        _check_streaming(self._catalog.context)
        _import_what_updates_need()
        try:
            root = self._catalog.subscribe()
            root.child_created.add_callback(self._guarded(self._new_run))
            # A container is told of its children's metadata changes (a run's seal, its stop).
            root.child_metadata_updated.add_callback(
                self._guarded(
                    lambda changed: self._run_metadata(
                        changed.key, changed.metadata, _seconds(changed.timestamp)
                    )
                )
            )
            self._started(root, replay=False)
        except Exception as error:
            raise AnalysisStoreError(
                f"the store's server does not stream updates ({type(error).__name__}: "
                f"{error}); start it with 'bluesky-analysis-store serve --streaming memory'"
            ) from error
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
            subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            try:
                subscription.disconnect(wait=False)
            except Exception:  # noqa: BLE001 - closing what may already be gone
                logger.debug("closing a subscription failed", exc_info=True)

    def __enter__(self) -> DerivedRunWatcher:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- subscriptions ----------------------------------------------------------------------

    def _follow(self, node: Any, on_child: Callable[[Any], None]) -> Any:
        subscription = node.subscribe()
        subscription.child_created.add_callback(self._guarded(on_child))
        return self._started(subscription, replay=True)

    def _started(self, subscription: Any, replay: bool) -> Any:
        with self._lock:
            if self._closed:
                return None
            self._subscriptions.append(subscription)
        subscription.start_in_thread(start=0 if replay else None)
        return subscription

    def _guarded(self, callback: Callable[[Any], None]) -> Callable[[Any], None]:
        """``callback``, kept alive here, with what it raises logged (tiled would drop it)."""

        def guarded(update: Any) -> None:
            try:
                callback(update)
            except Exception:
                logger.exception("an update of the store could not be handled")

        self._callbacks.append(guarded)
        return guarded

    def _new_run(self, update: Any) -> None:
        run = update.child()
        metadata = dict(run.metadata or {})
        start = metadata.get("start") or {}
        parents = tuple(p for p in start.get("parent_uids") or () if isinstance(p, str))
        if not parents:
            return  # raw data
        if self._parent_uid is not None and self._parent_uid not in parents:
            return
        uid = str(start.get("uid", update.key))
        with self._lock:
            # The writer seals a run just after creating it: its updates wait for the seal.
            self._runs[uid] = _FollowedRun(parents)
            self._run_metadata(uid, metadata, _seconds(update.timestamp))
        self._follow(run, lambda stream: self._new_stream(uid, stream))

    def _run_metadata(self, uid: str, metadata: Mapping[str, Any] | None, saved: float) -> None:
        with self._lock:
            run = self._runs.get(uid)
            if run is None or not metadata or run.ended:
                return  # not a run followed here
            if not run.sealed and is_sealed(metadata):
                run.sealed = True
                self._on_update(RunStarted(uid, metadata["start"], time.time()))
                pending, run.pending = run.pending, []
                for held in pending:
                    self._count_and_send(run, held)
            stop = metadata.get("stop")
            if not stop or run.stop is not None:
                return
            if not run.sealed:  # not this package's derived data (children() skips it too)
                run.ended = True
                run.pending.clear()
                return
            run.stop = RunEnded(uid, stop, saved, time.time())
        if not self._end_if_complete(uid):
            timer = threading.Timer(ROWS_AFTER_STOP_SECONDS, self._end, args=(uid,))
            timer.daemon = True
            timer.start()

    def _end_if_complete(self, uid: str) -> bool:
        with self._lock:
            run = self._runs[uid]
            if run.stop is None or run.ended:
                return run.ended
            expected = run.stop.stop.get("num_events") or {}
            if any(run.rows[stream] < int(count) for stream, count in expected.items()):
                return False
            self._end(uid)
            return True

    def _end(self, uid: str) -> None:
        with self._lock:
            run = self._runs[uid]
            if run.ended or run.stop is None:
                return
            run.ended = True
            ended = dataclasses.replace(run.stop, received=time.time())
            self._on_update(ended)

    def _emit(self, uid: str, update: Update) -> None:
        with self._lock:
            run = self._runs[uid]
            if run.ended:
                return
            if run.sealed:
                self._count_and_send(run, update)
            else:
                run.pending.append(update)
        self._end_if_complete(uid)

    def _count_and_send(self, run: _FollowedRun, update: Update) -> None:
        if isinstance(update, SavedEvent):
            run.rows[update.stream] += 1
        self._on_update(update)

    def _new_stream(self, uid: str, update: Any) -> None:
        stream_name = update.key
        self._follow(update.child(), lambda part: self._new_part(uid, stream_name, part))

    def _new_part(self, uid: str, stream_name: str, update: Any) -> None:
        node = update.child()
        family = str(getattr(node.structure_family, "value", node.structure_family))
        if family == "table":
            subscription = node.subscribe()
            subscription.new_data.add_callback(
                self._guarded(lambda rows: self._rows(uid, stream_name, rows))
            )
            self._started(subscription, replay=True)
        elif family == "array":
            key = update.key
            subscription = node.subscribe()
            subscription.new_data.add_callback(
                self._guarded(lambda block: self._frames(uid, stream_name, key, block))
            )
            self._started(subscription, replay=True)

    # --- what reached the store --------------------------------------------------------------

    def _rows(self, uid: str, stream_name: str, update: Any) -> None:
        received = time.time()
        table = update.data()
        columns = [c for c in table.columns if c not in _BOOKKEEPING and not c.startswith("ts_")]
        parents = self._runs[uid].parents
        for values in table.to_dict("records"):
            self._emit(
                uid,
                SavedEvent(
                    uid=uid,
                    parent_uids=parents,
                    stream=stream_name,
                    seq_num=int(values["seq_num"]),
                    time=float(values["time"]),
                    data={column: _plain(values[column]) for column in columns},
                    saved=_seconds(update.timestamp),
                    received=received,
                ),
            )

    def _frames(self, uid: str, stream_name: str, key: str, update: Any) -> None:
        patch = getattr(update, "patch", None)
        offset = tuple(getattr(patch, "offset", ()) or ())
        shape = tuple(getattr(patch, "shape", ()) or getattr(update, "shape", ()) or ())
        if not shape:
            return
        self._emit(
            uid,
            SavedFrames(
                uid=uid,
                stream=stream_name,
                key=key,
                first=int(offset[0]) if offset else 0,
                count=int(shape[0]),
                frame_shape=tuple(int(n) for n in shape[1:]),
                saved=_seconds(update.timestamp),
                received=time.time(),
            ),
        )


def _import_what_updates_need() -> None:
    """Import now what the first rows and frames need (a second or two): imported on the
    first update instead, they would hold up every update behind it."""
    import tiled.client.array  # noqa: F401
    import tiled.client.dataframe  # noqa: F401
    import tiled.serialization.table  # noqa: F401


def _seconds(moment: Any) -> float:
    """A streamed update's timestamp (the server's clock) as seconds since the epoch."""
    return moment.timestamp() if isinstance(moment, datetime.datetime) else time.time()


def _check_streaming(context: Any) -> None:
    """Refuse a store whose server does not stream, at once: tiled's subscription would
    wait for it forever (it retries, and a server without a streaming cache fails each
    connection)."""
    if getattr(context.http_client, "app", None) is not None:
        raise AnalysisStoreError(
            "this store is served inside this process (served=False), which streams nothing: "
            "open it served (the default), or watch a tiled server that streams"
        )
    from websockets.exceptions import WebSocketException
    from websockets.sync.client import connect

    scheme = "wss" if context.api_uri.scheme == "https" else "ws"
    uri = context.api_uri.copy_with(scheme=scheme, path="/api/v1/stream/single/")
    headers = {"Authorization": f"Apikey {context.api_key}"} if context.api_key else {}
    try:
        with connect(
            f"{uri}?envelope_format=msgpack", additional_headers=headers, open_timeout=10
        ) as websocket:
            websocket.recv(timeout=10)  # a streaming server sends the root's schema first
    except (WebSocketException, OSError, TimeoutError) as error:
        raise AnalysisStoreError(
            f"the store's server at {context.api_uri} does not stream updates ({error}); "
            "start it with 'bluesky-analysis-store serve --streaming memory'"
        ) from None


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (for printing and JSON)."""
    item = getattr(value, "item", None)
    return item() if callable(item) and getattr(value, "ndim", 0) == 0 else value
