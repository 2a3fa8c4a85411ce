"""A worker process: where the callback reduces and saves by default (``background=True``).

Reducers, file writers and the store's tiled server are Python code holding the interpreter
lock; on a thread of the RunEngine's process they take turns with the RunEngine and slow the
scan. In a process of their own they run on another core. The RunEngine's thread only queues
each document; a sender thread pickles batches of them (arrays out of band, protocol 5) into
a pipe, and the worker process reduces them and writes the store it reopens from the
callback's (see ``AnalysisStore.__reduce__``). Back come the child runs' completions (with
the reduction's counts, for the session's summary line), flush acknowledgements and the
worker's log records, which are logged here as if made here; and, while the callback has
live subscribers (``_live_view``), the child documents they are shown, a batch at a time.

The worker is forked from the user's fork server (``_forkserver``), which has imported what
it needs, or, while none is up, started from scratch with ``subprocess``; not with
``multiprocessing``: a spawned multiprocessing child imports the user's ``__main__`` again,
which runs a script that has no ``if __name__ == "__main__"`` guard (a scan!) a second
time. The reducers and the store are sent with cloudpickle, so that reducers defined in an
IPython session or a profile's startup file (module ``__main__``) work too. The worker
ignores Ctrl-C (its own session): pausing a scan must not kill it.

A worker that ends unexpectedly (killed, crashed, or unable to open its store) is replaced
in the background, after 1 s, then twice as long after each further death in a row, at most
a minute; the runs it had are lost (their waiters are told at once), runs that start while
no worker is up are lost too. At interpreter exit the callback's queue is sent and the
worker finishes it, within a bounded time (see ``_handover.close_at_exit``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import logging
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

from ._errors import AnalysisStoreError
from ._handover import (
    Abandoned,
    ClosesOnce,
    DocumentQueue,
    RunWaiter,
    array_bytes,
    close_at_exit,
    unfinished_runs,
    wait_while_alive,
)
from ._live_router import LiveRouter
from ._live_view import LiveView, finished_through
from ._reducers import code_as_loaded
from ._reduction import ReductionPlan
from ._run_summary import ReductionOutcome

__all__ = ["ProcessWorker", "main"]

logger = logging.getLogger(__name__)

# How long the worker process waits for documents before flushing buffered rows to the store.
IDLE_FLUSH_SECONDS = 0.1
# When the sender has caught up, it lets documents gather this long and sends them together.
GATHER_SECONDS = 0.02
# Bytes of arrays sent in one message at most: the worker reads the next message while it
# reduces one, so this bounds what it holds beyond the callback's queue.
_BATCH_BYTES = 32 * 2**20
# A bigger pipe than the default 64 KiB: a megapixel frame then takes 2 writes, not 32.
_PIPE_BYTES = 2**20
# A worker that ended is replaced after this long, doubled for each further death in a
# row up to the maximum; one that had been up and ready this long starts the count again.
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 60.0
_HEALTHY_SECONDS = 60.0


# --- messages over a pipe -----------------------------------------------------------------


class MessagePipe:
    """One end of an OS pipe carrying messages made of several byte strings.

    A message is a count, the parts' lengths, then the parts, so that the arrays of a
    pickled batch travel as they are and arrive in writable buffers of their own.
    """

    def __init__(self, fd: int, mode: str) -> None:
        self._file = io.FileIO(fd, mode)
        self._lock = threading.Lock()  # several threads of the worker process log

    def fileno(self) -> int:
        return self._file.fileno()

    def send(self, parts: Sequence[Any]) -> None:
        views = [memoryview(part).cast("B") for part in parts]
        head = struct.pack(f"<I{len(views)}Q", len(views), *(v.nbytes for v in views))
        with self._lock:
            self._write(memoryview(head))
            for view in views:
                self._write(view)

    def recv(self) -> list[bytearray]:
        """The next message's parts; EOFError once the other end is closed."""
        (count,) = struct.unpack("<I", self._read_exactly(4))
        sizes = struct.unpack(f"<{count}Q", self._read_exactly(8 * count))
        return [self._read_exactly(size) for size in sizes]

    def close(self) -> None:
        self._file.close()

    def _write(self, view: memoryview) -> None:
        while view.nbytes:
            written = self._file.write(view)
            view = view[written:]

    def _read_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            n = self._file.readinto(view[got:])
            if not n:
                raise EOFError("the other end of the pipe is closed")
            got += n
        return buffer


def encode(obj: Any, dumps: Any = pickle.dumps) -> list[Any]:
    buffers: list[pickle.PickleBuffer] = []
    header = dumps(obj, protocol=5, buffer_callback=buffers.append)
    return [header, *(buffer.raw() for buffer in buffers)]


def decode(parts: Sequence[Any]) -> Any:
    return pickle.loads(parts[0], buffers=parts[1:])


def _widen(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_BYTES)
    except (ImportError, OSError):  # not Linux, or above the system's limit: keep 64 KiB
        pass


# --- this side: the callback's --------------------------------------------------------------


def setup_message(plan: ReductionPlan, store: Any, memory_limit: int | None = None) -> list[Any]:
    """What a new worker process needs, pickled now: a reducer or a store that cannot be
    sent is refused when the callback is made, not at the first scan."""
    import cloudpickle

    context = {
        "sys_path": list(sys.path),
        "memory_limit": memory_limit,
        # Records below both are dropped here anyway: they need not be sent.
        "log_level": min(
            logging.getLogger("bluesky_analysis_store").getEffectiveLevel(),
            logging.getLogger().getEffectiveLevel(),
        ),
        # The same warnings are shown or hidden there, but none ends the worker.
        "warnings_filters": [
            ("default" if f[0] == "error" else f[0], *f[1:]) for f in warnings.filters
        ],
    }
    try:
        payload = encode((plan, store), dumps=cloudpickle.dumps)
    except Exception as error:
        raise AnalysisStoreError(
            f"the reducers or the store cannot be sent to a worker process ({error}); use "
            "background='thread' to reduce in this process"
        ) from error
    return [pickle.dumps(context), *payload]


class _Process:
    """One worker process and the thread that reads what it says."""

    def __init__(self, worker: ProcessWorker) -> None:
        self.started_at = time.monotonic()
        self.warm = False  # it has imported what runs need, or finished one
        to_child, self_out = os.pipe()
        self_in, from_child = os.pipe()
        _widen(self_out)
        from ._forkserver import fork_worker

        # Forked from a fork server that has imported what it needs (milliseconds), or
        # started from scratch (seconds of imports) while none is up.
        self.popen: Any = fork_worker(to_child, from_child) or subprocess.Popen(
            [sys.executable, "-m", __name__, str(to_child), str(from_child)],
            pass_fds=(to_child, from_child),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(to_child)
        os.close(from_child)
        self.outbox = MessagePipe(self_out, "wb")
        self.inbox = MessagePipe(self_in, "rb")
        self.setup_sent = False
        self.ready_at: float | None = None  # when it had loaded the reducers, opened the store
        self.lost = False
        self.stopped = False  # ended by close(), not by itself
        self.ended = threading.Event()
        # The thread holds the worker, never the callback: a dropped callback is collected.
        self._reader = threading.Thread(
            target=worker._listen, args=(self,), name="analysis-store-listener", daemon=True
        )
        self._reader.start()

    @property
    def ready(self) -> bool:
        return self.ready_at is not None

    def alive(self) -> bool:
        return not self.lost and not self.ended.is_set()


class ProcessWorker(ClosesOnce):
    """Reduces in a worker process, started now and replaced whenever it ends."""

    def __init__(
        self,
        plan: ReductionPlan,
        store: Any,
        *,
        queue_size: int,
        queue_bytes: int,
        memory_limit: int | None = None,
        view: LiveView | None = None,
    ) -> None:
        super().__init__()
        self._setup = setup_message(plan, store, memory_limit)
        self._view = view
        self._forwarding = False  # whether the process sends the child documents back
        self._queue = DocumentQueue(queue_size, queue_bytes)
        self.runs = RunWaiter()
        self._run_finished = finished_through(view, self.runs.finished)
        self._flushes: dict[int, threading.Event] = {}
        self._flushes_failed: dict[int, bool] = {}
        self._flush_ids = itertools.count()
        self._closing = threading.Event()
        self._open_runs: dict[str, None] = {}  # started, not stopped: closing leaves them
        # Held while a run's start is queued and while the process is replaced: the runs
        # begun before a replacement are the ones lost with the old process.
        self._switch = threading.Lock()
        self._deaths = 0  # in a row, for the restart delay
        self._dropped = 0  # documents that found no live process
        self._process = _Process(self)
        self._sender = threading.Thread(
            target=self._send_all, args=(self._process,), name="analysis-store-sender", daemon=True
        )
        self._sender.start()
        close_at_exit(self, "worker process")

    @property
    def queue(self) -> DocumentQueue:
        return self._queue

    @property
    def pid(self) -> int:
        """The worker process's id."""
        return self._process.popen.pid

    def alive(self) -> bool:
        return self._process.alive() and self._sender.is_alive()

    @property
    def starting_for(self) -> float | None:
        """Seconds since the current worker process was started, while it is new (less than
        a minute old) and still loading what reducing and saving need. None otherwise."""
        process = self._process
        age = time.monotonic() - process.started_at
        return None if process.warm or age > _NEW_FOR else age

    # --- the Worker protocol ----------------------------------------------------------------

    def submit(self, name: str, doc: dict[str, Any]) -> None:
        size = array_bytes(doc) if name in ("event", "event_page") else 0
        if name == "stop":
            self._open_runs.pop(doc["run_start"], None)
        if name != "start":
            self._put(("doc", name, doc), size, urgent=name == "stop")
            return
        with self._switch:
            if not self._process.alive() and not self._closing.is_set():
                logger.warning(
                    "run %s starts while the analysis worker process is being replaced; it "
                    "gets no derived data",
                    doc["uid"],
                )
            self.runs.expect(doc["uid"])
            self._open_runs[doc["uid"]] = None
            self._put(("doc", name, doc), size)

    def wait_for_run(self, raw_uid: str, timeout: float | None) -> bool:
        return self.runs.wait(raw_uid, timeout, self.alive)

    def set_forwarding(self, on: bool) -> None:
        # In order with the documents: those queued before it are not sent back.
        self._forwarding = on and self._view is not None
        self._put(("live", self._forwarding))

    def flush(self, timeout: float | None) -> bool:
        token = next(self._flush_ids)
        done = self._flushes[token] = threading.Event()
        try:
            if not self._put(("flush", token), urgent=True):
                return False
            # Set by the worker's answer, which says whether the store took everything.
            return (
                wait_while_alive(done, timeout, self.alive)
                and self._flushes_failed.pop(token, None) is None
            )
        finally:
            self._flushes.pop(token, None)

    def _close(self, timeout: float | None) -> Abandoned:
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        self.flush(timeout)
        dropped_before = self._dropped
        with self._switch:
            self._closing.set()  # no replacement from now on
            process = self._process
        if self._put(("close",), urgent=True):
            self._sender.join(remaining())
        try:
            process.popen.wait(remaining())
        except subprocess.TimeoutExpired:
            logger.warning("the analysis worker did not end within %s s; it is stopped", timeout)
            process.stopped = True
            process.popen.kill()
            process.popen.wait()
            self._sender.join(1.0)  # its writes fail now: it drops the rest and ends
        if self._view is not None:  # the runs it finished are told through the view
            process.ended.wait(remaining())  # its listener has heard every message
            self._view.drain(remaining())
        queued = sum(1 for item, _ in self._queue.snapshot() if item[0] == "doc")
        lost = unfinished_runs(self._open_runs, self.runs.abandon())
        return Abandoned(queued + self._dropped - dropped_before, lost)

    # --- sending --------------------------------------------------------------------------

    def _put(self, item: Any, size: int = 0, *, urgent: bool = False) -> bool:
        if self._queue.put(item, size, urgent=urgent, consumer_alive=self._sender.is_alive):
            return True
        logger.error("the analysis sender is not running; a document was dropped")
        return False

    def _replace(self) -> None:
        process = _Process(self)  # outside the lock: starting a process takes a moment
        with self._switch:
            if self._closing.is_set():
                process.stopped = True
                process.popen.kill()
                return
            self._process = process
            # Documents queued before this point go to the old process (and are lost with
            # it), as do the runs begun before it.
            self._put(("process", process), urgent=True)
            self._tell_lost(self.runs.abandon(), "it started while no analysis worker was up")
        logger.info("a new analysis worker process started (pid %s)", process.popen.pid)

    def _send_all(self, process: _Process) -> None:
        # The reducers and the store go to a new process at once, not with its first
        # documents: it loads them (imports, opens the store) before the first scan needs it.
        with contextlib.suppress(OSError):
            self._send_setup(process)
        while True:
            items: list[Any] = []
            sizes = 0
            for item, size in self._queue.get_batch(None, GATHER_SECONDS, _BATCH_BYTES):
                sizes += size
                if item[0] == "process":
                    self._send(process, items)
                    process, items = item[1], []
                    with contextlib.suppress(OSError):
                        self._send_setup(process)
                else:
                    items.append(item)
            self._send(process, items)
            self._queue.done(sizes)
            if any(item[0] == "close" for item in items):
                return

    def _send(self, process: _Process, items: list[Any]) -> None:
        if not items:
            return
        if process.alive():
            try:
                parts = encode(items)
            except Exception:
                parts = encode([item for item in items if _picklable(item)])
            try:
                self._send_setup(process)
                process.outbox.send(parts)
                return
            except OSError:
                process.lost = True  # the listener says why, once the process has ended
        self._dropped += sum(1 for item in items if item[0] == "doc")

    def _send_setup(self, process: _Process) -> None:
        """The reducers, the store and whether to send child documents back, once per
        process (OSError if the process is gone)."""
        if process.setup_sent:
            return
        try:
            process.outbox.send(self._setup)
            process.outbox.send(encode([("live", self._forwarding)]))
        except OSError:
            process.lost = True  # the listener says why, once the process has ended
            raise
        process.setup_sent = True

    # --- listening ------------------------------------------------------------------------

    def _hear(self, process: _Process, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "log":
            record = logging.makeLogRecord(message[1])
            target = logging.getLogger(record.name)
            if target.isEnabledFor(record.levelno):  # as if it were logged here
                target.handle(record)
        elif kind == "finished":
            process.warm = True
            self._run_finished(message[1])
        elif kind == "child_documents":
            if self._view is not None:
                self._view.child_documents(message[1])
        elif kind == "flushed":
            if len(message) > 2 and not message[2]:
                self._flushes_failed[message[1]] = True
            done = self._flushes.get(message[1])
            if done is not None:
                done.set()
        elif kind == "ready":
            process.ready_at = time.monotonic()
        elif kind == "loaded":
            process.warm = True

    def _listen(self, process: _Process) -> None:
        try:
            while True:
                try:
                    message = decode(process.inbox.recv())
                except EOFError:
                    break
                try:
                    self._hear(process, message)
                except Exception:  # a handler of the user's failed; keep listening
                    logger.exception("a message of the analysis worker could not be handled")
        finally:
            process.inbox.close()
            code = process.popen.wait()
            process.ended.set()
            self._ended(process, code)

    def _ended(self, process: _Process, code: int) -> None:
        """Say once why ``process`` ended and, unless it was closed, replace it later."""
        if process.stopped or (self._closing.is_set() and code == 0):
            return
        lost = self.runs.abandon() if process is self._process else ()
        status = _exit_status(code)
        self._tell_lost(lost, f"the analysis worker it was given to is gone ({status})")
        if self._closing.is_set():
            logger.error("the analysis worker process ended while closing (%s)", status)
            return
        healthy = process.ready_at is not None and (
            time.monotonic() - process.ready_at >= _HEALTHY_SECONDS
        )
        self._deaths = 0 if healthy else self._deaths
        delay = min(RESTART_FIRST_SECONDS * 2**self._deaths, RESTART_MAX_SECONDS)
        self._deaths += 1
        if process.ready:
            what = "the analysis worker process ended"
            runs = f"; derived data of {len(lost)} runs it was reducing is lost" if lost else ""
        else:
            what = "the analysis worker process could not start"
            runs = f"; {len(lost)} runs get no derived data" if lost else ""
        logger.error("%s (%s)%s; starting a new one in %g s", what, status, runs, delay)
        if not self._closing.wait(delay):
            self._replace()

    def _tell_lost(self, raw_uids: Sequence[str], why: str) -> None:
        if self._view is not None:
            self._view.lost(raw_uids, why)


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"exit status {code}, killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit status {code}"


def _picklable(item: Any) -> bool:
    try:
        pickle.dumps(item, protocol=5, buffer_callback=lambda buffer: None)
    except Exception:
        logger.exception("a %s document cannot be sent to the analysis worker", item[1])
        return False
    return True


# --- that side: the worker process --------------------------------------------------------


_PLAIN = (str, int, float, bool, type(None))


class _ForwardingHandler(logging.Handler):
    """Sends the worker's log records to the callback's process, which logs them."""

    def __init__(self, outbox: MessagePipe) -> None:
        super().__init__()
        self._outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # Plain values only: a record's extras and arguments may not pickle.
            fields = {k: v for k, v in record.__dict__.items() if isinstance(v, _PLAIN)}
            fields["msg"] = record.getMessage()
            if record.exc_info and not record.exc_text:
                fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
            fields["processName"] = "analysis-worker"
            self._outbox.send([pickle.dumps(("log", fields))])
        except OSError:
            pass  # the callback's process is gone: nobody is left to show the record to
        except Exception:
            self.handleError(record)


def _only_forward(root: logging.Logger) -> None:
    """Send every record through the root's forwarding handler: the same loggers in the
    callback's process have the handlers (and the filters) that decide what is shown.
    """
    for logger_ in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger_, logging.Logger) and logger_ is not root and logger_.handlers:
            logger_.handlers.clear()
            logger_.propagate = True


# tiled's client retries a failing request for up to 45 s; the journal keeps what a store
# that is down does not take, so a worker gives up sooner and lets delivery retry the run.
WORKER_ENVIRONMENT = {"TILED_RETRY_ATTEMPTS": "2", "TILED_RETRY_TIMEOUT": "5"}
"""Set in a worker process (unless set already) before tiled reads it, at import."""


def main(argv: Sequence[str] | None = None) -> int:
    """The worker process: ``python -m bluesky_analysis_store._worker_process IN OUT``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name, value in WORKER_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    args = list(sys.argv[1:] if argv is None else argv)
    inbox, outbox = MessagePipe(int(args[0]), "rb"), MessagePipe(int(args[1]), "wb")

    def tell(*message: Any) -> None:
        try:
            outbox.send([pickle.dumps(message)])
        except OSError:
            pass  # the callback's process is gone; the journal and the store remain

    forwarder = _ChildDocuments(tell)

    def finished(outcome: ReductionOutcome) -> None:
        forwarder.send()  # its documents first: the session dispatches them, then ends the wait
        tell("finished", outcome)

    root = logging.getLogger()
    root.handlers[:] = [_ForwardingHandler(outbox)]
    try:
        setup = inbox.recv()
    except EOFError:
        return 0
    context = pickle.loads(setup[0])
    root.setLevel(context["log_level"])
    warnings.filters[:] = context["warnings_filters"]
    sys.path[:0] = [path for path in context["sys_path"] if path not in sys.path]
    try:
        # A store served in this process (served=False) imports tiled's server, which adds
        # a handler of its own (its version banner is held back while the store opens, see
        # _quiet); a store talking to its folder's server imports none of it: seconds
        # sooner ready. Either way only the forwarding handler is left after the open.
        _only_forward(root)
        plan, store = decode(setup[1:])
        _only_forward(root)
        # The child runs name the code this process imported, not what the callback saw.
        plan = dataclasses.replace(plan, code=code_as_loaded(plan.reducers, plan.code))
        router = LiveRouter(
            plan,
            store,
            on_run_finished=finished,
            private_documents=True,
        )
    except Exception:
        logger.exception("the analysis worker could not load its reducers or open its store")
        return 1
    _only_forward(root)
    if context.get("memory_limit"):
        threading.Thread(
            target=_watch_memory, args=(context["memory_limit"], router), daemon=True
        ).start()
    tell("ready")
    # What the first run needs (the run writer, the fillers, tiled's array client), imported
    # while no document has come yet, rather than when the first one does: the first scan
    # after the callback is made then waits less for its derived data.
    importer = threading.Thread(
        target=_import_ahead, args=(tell,), name="import-ahead", daemon=True
    )
    importer.start()
    reason = _ORPHANED_REASON
    try:
        if _serve(inbox, router, tell, forwarder, importer):
            reason = _CLOSED_REASON
    finally:
        # Runs still open will get no more documents: close them as failed, deliver what
        # the store takes in a bounded time and leave the rest in the journal.
        router.close(reason=reason, timeout=_DELIVERY_AT_EXIT_SECONDS)
    return 0


# How often the worker compares its resident memory with its limit.
_MEMORY_CHECK_SECONDS = 0.25
# Exit status of a worker stopped by its memory limit (then replaced as after any death).
EXIT_MEMORY_LIMIT = 75


_NEW_FOR = 60.0  # seconds a worker process that has not finished a run counts as starting

_FIRST_RUN_MODULES = (
    "bluesky_analysis_store._tiled_writing",
    "bluesky_analysis_store._delivery",
    "bluesky_analysis_store._stream_filling",
    "tiled.client.array",
    "tiled.client.dataframe",
)


def import_ahead() -> bool:
    """Import what the first run needs; False if some of it cannot be imported (the run
    that needs it will say what is wrong)."""
    import importlib

    for name in _FIRST_RUN_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001
            return False
    from ._filling import handler_registry
    from ._provenance import index_distributions

    handler_registry()  # the handlers' entry points (databroker's import dask, h5py...)
    index_distributions()  # for the first run's code records
    return True


def _import_ahead(tell: Any) -> None:
    if import_ahead():
        tell("loaded")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _watch_memory(limit: int, router: LiveRouter) -> None:
    """Stop the worker once it holds more than ``limit`` bytes (a leaking reducer), its
    open child runs closed as failed with that reason in their journals first."""
    while True:
        time.sleep(_MEMORY_CHECK_SECONDS)
        resident = _resident_bytes()
        if resident <= limit:
            continue
        reason = (
            f"stopped: the analysis worker held {resident / 2**20:.0f} MiB, over its memory "
            f"limit of {limit / 2**20:.0f} MiB (AnalysisStoreCallback(memory_limit=...))"
        )
        logger.error("%s; its open child runs end as failed and a new worker starts", reason)
        router.delivery.end_open_runs(reason)
        logging.shutdown()
        os._exit(EXIT_MEMORY_LIMIT)


_ORPHANED_REASON = (
    "interrupted: the scan's process ended before the raw run's stop (its documents stop here)"
)
_CLOSED_REASON = "interrupted: the analysis callback was closed before the raw run's stop"
# How long a worker whose callback has gone keeps delivering before it leaves the rest to
# the journal (and `recover`): it must not linger as an orphan.
_DELIVERY_AT_EXIT_SECONDS = 30.0


class _ChildDocuments:
    """The child documents to send back to the session's live view, gathered and sent a
    batch at a time (one message, not one per event)."""

    def __init__(self, tell: Any) -> None:
        self._tell = tell
        self._documents: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()  # the delivery thread sends before a run's completion

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        with self._lock:
            self._documents.append((name, doc))

    def send(self) -> None:
        with self._lock:  # held while sending: the batch goes before what follows it
            documents, self._documents = self._documents, []
            if not documents:
                return
            try:
                self._tell("child_documents", documents)
            except Exception:  # for display only: the child run itself is journaled
                logger.exception("child documents could not be sent to the live view")


def _serve(
    inbox: MessagePipe,
    router: LiveRouter,
    tell: Any,
    forwarder: _ChildDocuments,
    importer: threading.Thread | None = None,
) -> bool:
    """Reduce what comes through ``inbox``; True if the callback closed it, False if the
    callback's process went away.

    The first document waits for ``importer`` (``_import_ahead``) to finish: two threads
    importing one package (dask, through tiled's client and through a handler) can each
    get the other's half-made module, and the import fails."""
    # A thread reads the next message from the pipe (without the interpreter lock) while
    # this one reduces the last; one message waits at most, so the pipe still pushes back.
    received: queue.Queue[Any] = queue.Queue(maxsize=1)
    threading.Thread(target=_read_all, args=(inbox, received), daemon=True).start()
    while True:
        items = received.get()
        if items is None:  # the callback's process has gone: what it sent is done
            return False
        for item in items:
            if importer is not None and item[0] in ("doc", "flush"):
                importer.join()
                importer = None
            if item[0] == "doc":
                router(item[1], item[2])
            elif item[0] == "flush":
                tell("flushed", item[1], router.flush_store(_FLUSH_SECONDS))
            elif item[0] == "live":
                router.forward = forwarder if item[1] else None
            elif item[0] == "close":
                forwarder.send()
                return True
        forwarder.send()


# A flush asked for by the callback waits this long at most for the store (the journal
# keeps what it does not take).
_FLUSH_SECONDS = 30.0


def _read_all(inbox: MessagePipe, received: queue.Queue[Any]) -> None:
    try:
        while True:
            received.put(decode(inbox.recv()))
    except EOFError:
        pass
    except Exception:
        logger.exception("the analysis worker could not read what it was sent")
    received.put(None)


if __name__ == "__main__":
    sys.exit(main())
