"""Reduction on another machine: an :class:`AnalysisStoreCallback` behind a 0MQ subscriber.

The acquisition side publishes its documents with bluesky's own transport,
``Publisher(proxy_in, serializer=zmq_dumps)``, into a ``bluesky-0MQ-proxy``; the worker
subscribes to the proxy's output side with bluesky's ``RemoteDispatcher`` and hands every
document to the callback, which journals and delivers child runs as it does live
(decision 6): a store outage is survived, nothing is lost while the worker lives.

What arrives over the socket is untrusted. It is decoded with :func:`zmq_loads` (never
pickle) and checked against event-model's schema; a message that fails either is logged and
skipped. Documents of a run whose start the worker did not see (the worker joined it
midway) are dropped, with one warning, rather than half-reduced. A publisher that exits and
a new one publishing to the same proxy need nothing of the worker: the proxy stays, and so
does the worker's subscription. A run whose publisher died before its stop is closed as
failed after ``run_timeout`` seconds of silence, if one is given, else when the worker stops.

0MQ's PUB/SUB sockets drop messages for a subscriber more than their high-water mark (1000
messages by default, on the proxy and here) behind, and while a link is down, silently; the
worker therefore only decodes, checks and queues on the socket's loop, reduces on a worker
thread behind a deep queue, and warns of a gap in a stream's ``seq_num``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterable, Mapping
from typing import Any

from event_model import DocumentNames, schema_validators

from ._callback import AnalysisStoreCallback
from ._confinement import is_inside
from ._errors import AssetLocationError, MessageError
from ._handover import Abandoned
from ._replay import failed_stop
from ._zmq_documents import zmq_loads

__all__ = ["DocumentGate", "RemoteWorker", "SafeRemoteDispatcher", "check_root_map"]

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT = 60.0
"""Seconds the worker gives its callback, once told to stop, to deliver what it holds."""

# Deep enough that the socket's loop never waits for the reducers in a burst (while it
# waits, 0MQ queues up to its high-water mark and then drops).
_QUEUE_DOCUMENTS = 100_000
_QUEUE_BYTES = 1024 * 2**20

# Malformed messages are logged one by one up to this many, then one in a thousand.
_MALFORMED_LOGGED_IN_FULL = 20
_SHOWN_BYTES = 80

# The documents the gate knows how to tie to their run.
_ROUTED = frozenset(
    {
        "start",
        "descriptor",
        "event",
        "event_page",
        "resource",
        "datum",
        "datum_page",
        "stream_resource",
        "stream_datum",
        "stop",
    }
)


def check_root_map(root_map: Mapping[str, str], store: Any) -> None:
    """Refuse a ``root_map`` target outside the folders the store may read, where the store
    knows them (an embedded store; a server store opened with ``readable_roots``): a
    relocation must not open files the store's own server would refuse to serve."""
    readable = getattr(store, "readable_roots", None)
    if readable is None:
        return
    for old, new in root_map.items():
        if not is_inside(new, readable):
            raise AssetLocationError(
                f"{old}={new}: {new} is outside the folders the analysis store may read "
                f"({', '.join(readable)}); allow it once from Python, "
                f"AnalysisStore.open(STORE, readable=[{new!r}]) (the store remembers it)"
            )


class DocumentGate:
    """Validates each document and passes on those of runs whose start it saw.

    ``sink(name, doc)`` is given the documents let through; what it raises is logged. A
    document of a run joined midway is dropped; the first of such a run is warned about,
    the rest (to its stop) are dropped quietly.

    ``run_timeout`` (seconds, None for never): :meth:`expire` ends a run that has sent
    nothing for that long (its RunEngine's process died, or the link did, before its stop):
    the sink is given a stop of ``exit_status: "fail"`` whose ``reason`` says so, so that
    its child run is closed and delivered, not left open while the worker lives. Documents
    of it that come later are dropped as those of a run joined midway.
    """

    def __init__(self, sink: Any, *, run_timeout: float | None = None) -> None:
        self._sink = sink
        self.run_timeout = run_timeout
        self._last_seen: dict[str, float] = {}  # open run start uid -> time.monotonic()
        self._runs: set[str] = set()
        self._descriptors: dict[str, str] = {}  # descriptor uid -> run start uid
        self._next_seq_num: dict[str, int] = {}  # descriptor uid -> the seq_num expected
        self._resources: dict[str, str | None] = {}  # (stream) resource uid -> run start uid
        self._warned_orphans = False
        self.ignored = 0  # documents dropped, malformed or of runs joined midway

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name not in _ROUTED:
            self._skip(f"a {name!r} document is not handled by the worker; skipped")
            return
        try:
            schema_validators[DocumentNames[name]].validate(doc)
        except Exception as error:  # jsonschema's ValidationError, or worse
            reason = getattr(error, "message", None) or str(error)
            self._skip(f"a malformed {name} document was skipped: {reason}"[:300])
            return
        if not self._admit(name, doc):
            self.ignored += 1
            self._orphan(name, doc)
            return
        if name in ("event", "event_page"):
            self._check_sequence(doc)
        run = self._run_of(name, doc)
        if run is not None:
            self._last_seen[run] = time.monotonic()
        self._give(name, doc)

    def _give(self, name: str, doc: dict[str, Any]) -> None:
        try:
            self._sink(name, doc)
        except Exception:  # one bad document must not end the worker
            logger.exception("the analysis callback failed on a %s document", name)
        if name == "stop":
            self._forget(doc["run_start"])

    def _run_of(self, name: str, doc: Mapping[str, Any]) -> str | None:
        if name == "start":
            return doc["uid"]
        if name in ("descriptor", "stop"):
            return doc["run_start"]
        if name in ("resource", "stream_resource"):
            return doc.get("run_start")
        if name in ("datum", "datum_page"):
            return self._resources.get(doc["resource"])
        return self._descriptors.get(doc["descriptor"])

    def expire(self, now: float | None = None) -> list[str]:
        """End the open runs silent for ``run_timeout`` seconds (see the class); their
        uids."""
        if self.run_timeout is None:
            return []
        now = time.monotonic() if now is None else now
        silent = [run for run, seen in self._last_seen.items() if now - seen >= self.run_timeout]
        for run in silent:
            reason = (
                f"no stop document came: the raw run sent nothing for {self.run_timeout:g} s "
                "(its RunEngine's process or the link to it ended first); closed by the "
                "remote worker"
            )
            logger.warning("run %s: %s", run, reason)
            self._give("stop", failed_stop(run, reason, {}))
        return silent

    def _skip(self, message: str) -> None:
        self.ignored += 1
        logger.warning("%s", message)

    def _admit(self, name: str, doc: Mapping[str, Any]) -> bool:
        """Whether the document belongs to a run whose start was seen (and note what it
        declares)."""
        if name == "start":
            self._runs.add(doc["uid"])
            return True
        if name in ("descriptor", "stop"):
            known = doc["run_start"] in self._runs
            if known and name == "descriptor":
                self._descriptors[doc["uid"]] = doc["run_start"]
            return known
        if name in ("resource", "stream_resource"):
            run_start = doc.get("run_start")  # optional in the schema
            if run_start and run_start not in self._runs:
                return False
            self._resources[doc["uid"]] = run_start or None
            return True
        if name in ("datum", "datum_page"):
            return doc["resource"] in self._resources
        # event, event_page, stream_datum
        return doc["descriptor"] in self._descriptors

    def _check_sequence(self, doc: Mapping[str, Any]) -> None:
        """Warn of events lost in transit: 0MQ drops messages while a connection is down or
        a subscriber lags more than its high-water mark, and says nothing."""
        seq_nums = doc["seq_num"] if isinstance(doc["seq_num"], list) else [doc["seq_num"]]
        if not seq_nums:
            return
        descriptor = doc["descriptor"]
        expected = self._next_seq_num.get(descriptor, 1)
        if seq_nums[0] > expected:
            logger.warning(
                "events %d to %d of stream %s of run %s never arrived (lost in transit); "
                "its child run lacks them",
                expected,
                seq_nums[0] - 1,
                descriptor,
                self._descriptors.get(descriptor),
            )
        self._next_seq_num[descriptor] = max(expected, seq_nums[-1] + 1)

    def _orphan(self, name: str, doc: Mapping[str, Any]) -> None:
        if not self._warned_orphans:
            self._warned_orphans = True
            logger.warning(
                "a %s document of a run whose start this worker did not see (the run began "
                "before the worker was listening) is ignored, with the rest of that run",
                name,
            )
        if name == "stop":
            logger.info("run %s, joined midway, was not reduced", doc["run_start"])
            self._warned_orphans = False  # the next such run is warned about again

    def _forget(self, run_start: str) -> None:
        self._runs.discard(run_start)
        self._last_seen.pop(run_start, None)
        for descriptor in [d for d, run in self._descriptors.items() if run == run_start]:
            self._next_seq_num.pop(descriptor, None)
        for table in (self._descriptors, self._resources):
            for uid in [uid for uid, run in table.items() if run == run_start]:
                del table[uid]


class SafeRemoteDispatcher:
    """What bluesky's ``RemoteDispatcher`` does (a 0MQ SUB socket on a Proxy's output side,
    messages ``PREFIX NAME DOCUMENT`` handed to subscribers), decoding with
    :func:`zmq_loads` only, and logging and skipping a message it cannot take.

    Written here rather than as a subclass: bluesky's receive loop is a private method,
    prints what it drops, and ends on an unknown document name. The wire format is
    bluesky's Publisher's and Proxy's, which stay in use on the acquisition side.
    """

    def __init__(self, address: str, *, prefix: bytes = b"") -> None:
        if b" " in prefix:
            raise ValueError(f"prefix {prefix!r} may not contain b' '")
        self.address = _normalized_address(address)
        self.loop = asyncio.new_event_loop()
        self.closed = False
        self.malformed = 0
        self.on_listening: Any = None
        self._prefix = prefix
        self._subscribers: list[Any] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Listen until :meth:`stop` (or the task's cancellation); blocks."""
        if self.closed:
            raise RuntimeError("this dispatcher has been stopped: make a new one")
        import zmq
        import zmq.asyncio

        asyncio.set_event_loop(self.loop)
        context = zmq.asyncio.Context()
        socket = context.socket(zmq.SUB)
        try:
            socket.connect(self.address)
            socket.setsockopt_string(zmq.SUBSCRIBE, "")
            self._task = self.loop.create_task(self._poll(socket))
            self.loop.run_until_complete(self._task)
        finally:
            socket.close(linger=0)
            context.term()
            self.stop()

    def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if not self.closed and not self.loop.is_running():
            self.loop.close()
            self.closed = True

    async def _poll(self, socket: Any) -> None:
        if self.on_listening is not None:
            self.on_listening()
        while True:
            self.receive(await socket.recv())

    def receive(self, message: bytes) -> None:
        """Decode one message and dispatch its document, or log why it is skipped."""
        try:
            prefix, name_bytes, payload = message.split(b" ", 2)
        except ValueError:
            self._malformed("a message is not 'PREFIX NAME DOCUMENT'", message)
            return
        if self._prefix and prefix != self._prefix:
            return  # another publisher's, by choice
        try:
            name = DocumentNames[name_bytes.decode("ascii")]
        except (UnicodeDecodeError, KeyError):
            self._malformed(f"unknown document name {name_bytes[:_SHOWN_BYTES]!r}", message)
            return
        try:
            doc = zmq_loads(payload)
        except MessageError as error:
            self._malformed(f"the {name.value} document cannot be decoded: {error}", message)
            return
        self.process(name, doc)

    def process(self, name: DocumentNames, doc: dict[str, Any]) -> None:
        # Straight to the subscribers: bluesky's registry would turn their errors into
        # warnings; the gate logs them itself.
        for callback in self._subscribers:
            callback(name.value, doc)

    def subscribe(self, func: Any, name: str = "all") -> int:
        """Give ``func(name, doc)`` every document (``name`` is accepted for bluesky's
        signature; only ``"all"`` is supported)."""
        if name != "all":
            raise ValueError("the worker's dispatcher hands on every document (name='all')")
        self._subscribers.append(func)
        return len(self._subscribers)

    def _malformed(self, reason: str, message: bytes) -> None:
        self.malformed += 1
        if self.malformed <= _MALFORMED_LOGGED_IN_FULL or self.malformed % 1000 == 0:
            shown = message[:_SHOWN_BYTES] + (b"..." if len(message) > _SHOWN_BYTES else b"")
            logger.warning(
                "skipped a malformed message (%d so far): %s; it began %r",
                self.malformed,
                reason,
                shown,
            )


def _normalized_address(address: str) -> str:
    """``host:port`` as 0MQ's ``tcp://host:port`` (as bluesky's dispatcher takes it)."""
    return address if "://" in address else f"tcp://{address}"


class RemoteWorker:
    """Reduce the runs published to a 0MQ proxy into ``store``, until :meth:`stop`.

    ``address`` is the proxy's output side (``tcp://host:port``); ``run_timeout`` is
    :class:`DocumentGate`'s. The other arguments are :class:`AnalysisStoreCallback`'s.
    """

    def __init__(
        self,
        address: str,
        reducers: Iterable[Any],
        store: Any,
        *,
        streams: Iterable[str] = ("primary",),
        writers: Mapping[str, str | None] | None = None,
        root_map: Mapping[str, str] | None = None,
        run_timeout: float | None = None,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        self.address = address
        self.store = store
        self.close_timeout = close_timeout
        check_root_map(root_map or {}, store)
        # A worker thread, not the worker process: this process is already off the
        # acquisition machine, and its loop only decodes and queues, so the process mode's
        # benefit (reduction off the RunEngine's interpreter lock) is not needed here; it
        # would add a pickled copy of every document through a pipe. A crash of this
        # process is the service manager's to restart; the next start delivers the
        # journals it left (decision 6).
        self.callback = AnalysisStoreCallback(
            list(reducers),
            store,
            streams=streams,
            writers=writers,
            root_map=root_map,
            background="thread",
            queue_size=_QUEUE_DOCUMENTS,
            queue_bytes=_QUEUE_BYTES,
        )
        self.gate = DocumentGate(self.callback, run_timeout=run_timeout)
        self.dispatcher = SafeRemoteDispatcher(address)
        self.dispatcher.subscribe(self.gate)
        self.dispatcher.on_listening = self._listening
        self._stopping = False

    def _listening(self) -> None:
        self._say_listening()
        if self.gate.run_timeout is not None:
            self._expire_every(min(self.gate.run_timeout / 4, 5.0))

    def _expire_every(self, interval: float) -> None:
        try:
            self.gate.expire()
        except Exception:  # the check runs again; the worker goes on
            logger.exception("ending silent runs failed")
        self.dispatcher.loop.call_later(interval, self._expire_every, interval)

    def _say_listening(self) -> None:
        logger.info(
            "listening on %s; reducing into %s (journal: %s)",
            self.address,
            getattr(self.store, "location", self.store),
            getattr(self.store, "journal_folder", "?"),
        )

    def stop(self) -> None:
        """Stop listening (from a signal handler or another thread); :meth:`run` then
        closes the callback and returns."""
        self._stopping = True
        loop = self.dispatcher.loop
        if loop.is_closed():
            return
        loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        self.dispatcher.stop()

    def stop_on_signals(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        """Stop on these signals (call from the main thread, before :meth:`run`)."""
        for signum in signals:
            self.dispatcher.loop.add_signal_handler(signum, self.stop)

    def run(self) -> Abandoned:
        """Listen until stopped, then close the callback (within ``close_timeout``); what
        closing left undone."""
        try:
            if not self._stopping:
                self.dispatcher.start()
        except asyncio.CancelledError:
            pass  # stop() was called: the way out
        finally:
            if not self.dispatcher.closed:
                self.dispatcher.stop()
            abandoned = self.callback.close(self.close_timeout)
        logger.info(
            "stopped listening on %s; %s",
            self.address,
            f"left {abandoned}" if abandoned else "every child run finished was delivered",
        )
        return abandoned
