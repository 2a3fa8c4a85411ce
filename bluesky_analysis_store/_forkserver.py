"""Worker processes forked from a fork server that has already imported what they need.

A worker process started from scratch spends seconds importing tiled's client, the run
writer, the handlers (dask, pandas, pyarrow, h5py) before it can reduce anything: the first
scan after a callback is made waited for it. One fork server per user, Python and code
(``python -m bluesky_analysis_store._forkserver SOCKET``, detached) imports them once;
each worker is then a ``fork()`` of it, ready in milliseconds. It imports tiled's server
stack too, and forks the local store servers of ``_local_server`` (seconds of imports
each, otherwise) when a session has started it.

Why not ``multiprocessing``'s forkserver: it belongs to one parent process (each session
would start and warm its own, which is the cost to avoid) and its children import the
parent's ``__main__`` again, which runs a script that has no ``if __name__ ...`` guard.

The protocol, on a Unix socket in a folder only the user may enter: the session sends the
worker's two pipe ends and its own stdout and stderr (``SCM_RIGHTS``) with its environment
and working directory; the server forks, the child takes them on and runs
:func:`bluesky_analysis_store._worker_process.main`, and the server answers with the
child's pid and, when it ends, its exit status (as ``subprocess`` gives it: negative for a
signal). A request for a local store server sends its log instead, and the child runs
:func:`bluesky_analysis_store._local_server.main` with the request's arguments.
:class:`ForkedProcess` is the session's handle, with ``Popen``'s ``pid``, ``wait`` and
``kill``.

The session never waits for a fork server to start: when none answers, it starts one for
later workers and starts this worker from scratch. The socket's name carries a digest of
the package's code, of the Python, of its site-packages folders (a distribution installed
or removed), and of the environment variables that libraries read when imported
(``TILED_*``, ``DASK_*``): other code or settings get a fork server of their own. A fork
server with no child left ends after ``$BLUESKY_ANALYSIS_STORE_FORKSERVER_IDLE`` seconds
(default 600), or when its socket is removed (:func:`stop_fork_server`, which also stops
one that is still starting).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import select
import selectors
import signal
import site
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "DISABLE_ENV",
    "IDLE_ENV",
    "ForkedProcess",
    "fork_local_server",
    "fork_worker",
    "socket_path",
    "start_fork_server",
    "stop_fork_server",
]

IDLE_ENV = "BLUESKY_ANALYSIS_STORE_FORKSERVER_IDLE"
"""Seconds a fork server with no child left waits for a request before it ends."""
DISABLE_ENV = "BLUESKY_ANALYSIS_STORE_FORKSERVER"
"""Set to ``0`` to start every worker process from scratch."""

_DEFAULT_IDLE_SECONDS = 600.0
_CONNECT_TIMEOUT = 2.0
_STATUS = struct.Struct("!q")  # a pid, then an exit status, each as 8 bytes
_LENGTH = struct.Struct("!I")  # of the request that follows it
_LONGEST_SOCKET_PATH = 100  # bytes; sun_path holds 108 with its final NUL
_MARKED = "--marked"  # the starter made the .starting mark (see serve)
_RETRY_FAILED_SECONDS = 300.0  # a fork server that could not start is not retried sooner
# Environment variables read by the libraries a fork server imports, at import time.
_IMPORT_TIME_PREFIXES = ("TILED_", "DASK_", "OMP_", "OPENBLAS_", "MKL_", "HDF5_")


# --- where the fork server of this code is -------------------------------------------------


@functools.cache  # the code of this process does not change while it runs
def _code_digest() -> str:
    digest = hashlib.sha256(sys.executable.encode())
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    from importlib import metadata

    for name in ("tiled", "bluesky-tiled-plugins", "event-model", "numpy", "h5py"):
        try:
            digest.update(f"{name}={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            pass
    # A fork server knows which distribution provides each module from when it started
    # (see _provenance.index_distributions): installing or removing a distribution
    # changes its site-packages folder, and so the fork server.
    for folder in [*site.getsitepackages(), site.getusersitepackages()]:
        with contextlib.suppress(OSError):
            digest.update(f"{folder}={os.stat(folder).st_mtime_ns}".encode())
    return digest.hexdigest()


def socket_path(environ: dict[str, str] | None = None) -> Path:
    """The socket of the fork server for this code, Python and import-time environment."""
    from ._catalog_template import cache_folder

    environ = dict(os.environ if environ is None else environ)
    digest = hashlib.sha256(_code_digest().encode())
    for name in sorted(environ):
        if name.startswith(_IMPORT_TIME_PREFIXES):
            digest.update(f"{name}={environ[name]}".encode())
    folder = cache_folder() / "forkservers"
    path = folder / f"{digest.hexdigest()[:16]}.sock"
    if len(os.fsencode(path)) <= _LONGEST_SOCKET_PATH:
        return path
    # Too long for a Unix socket's address: in the temporary folder, named by both.
    digest.update(os.fsencode(folder))
    return (
        Path(tempfile.gettempdir())
        / f"bluesky-analysis-store-{os.getuid()}"
        / (f"{digest.hexdigest()[:16]}.sock")
    )


# --- the session's side --------------------------------------------------------------------


class ForkedProcess:
    """A worker forked by the fork server: ``subprocess.Popen``'s ``pid``, ``wait``,
    ``kill`` and ``returncode``."""

    def __init__(self, connection: socket.socket, pid: int) -> None:
        self._connection = connection
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = _pidfd(pid)  # says when it ends, should the fork server be gone
        # The listener thread and close() may wait at once: one reads the status.
        self._waiting = threading.Lock()

    def wait(self, timeout: float | None = None) -> int:
        began = time.monotonic()
        if not self._waiting.acquire(timeout=-1 if timeout is None else timeout):
            raise subprocess.TimeoutExpired(["analysis worker", str(self.pid)], timeout)
        try:
            if self.returncode is not None:
                return self.returncode
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - began))
            self._connection.settimeout(left)
            try:
                data = _receive_exactly(self._connection, _STATUS.size)
            except TimeoutError:
                raise subprocess.TimeoutExpired(
                    ["analysis worker", str(self.pid)], timeout
                ) from None
            except OSError:
                data = b""
            if len(data) == _STATUS.size:
                (self.returncode,) = _STATUS.unpack(data)
            else:  # the fork server is gone: no parent of the worker can tell its status
                left = None if timeout is None else max(0.0, timeout - (time.monotonic() - began))
                if not self._ends_within(left):
                    raise subprocess.TimeoutExpired(["analysis worker", str(self.pid)], timeout)
                self.returncode = 1
            self._connection.close()
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            return self.returncode
        finally:
            self._waiting.release()

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.returncode is None:
            try:
                if self._pidfd is not None:  # never another process that took its pid
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                else:
                    os.kill(self.pid, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass

    def release(self) -> None:
        """Stop following the process, which goes on: a detached server."""
        self._connection.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _ends_within(self, timeout: float | None) -> bool:
        """Whether the worker (no child of this process) ends within ``timeout``."""
        if self._pidfd is not None:  # readable once it has ended, reaped or not
            return bool(select.select([self._pidfd], [], [], timeout)[0])
        deadline = None if timeout is None else time.monotonic() + timeout
        while not _ended(self.pid):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


def fork_worker(to_child: int, from_child: int) -> ForkedProcess | None:
    """A worker process forked by this code's fork server, given the two pipe ends; None
    when no fork server answers (one is then started for the next worker) or forking is
    switched off (``BLUESKY_ANALYSIS_STORE_FORKSERVER=0``)."""
    return _fork("worker", [], [to_child, from_child, 1, 2], start_if_none=True)


def fork_local_server(argv: Sequence[str], log: int) -> ForkedProcess | None:
    """A local store server (``_local_server.main(argv)``) forked by this code's fork
    server, writing to ``log``; None when no fork server answers (none is started for it:
    a fork server is the sessions' to start) or forking is switched off."""
    return _fork("local_server", list(argv), [log], start_if_none=False)


def _fork(
    entry: str, argv: list[str], fds: list[int], *, start_if_none: bool
) -> ForkedProcess | None:
    if os.environ.get(DISABLE_ENV, "1") == "0" or not hasattr(socket, "send_fds"):
        return None
    path = socket_path()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(_CONNECT_TIMEOUT)
    try:
        connection.connect(str(path))
        request = json.dumps(
            {"entry": entry, "argv": argv, "environ": dict(os.environ), "cwd": os.getcwd()}
        ).encode()
        socket.send_fds(connection, [_LENGTH.pack(len(request)) + request], fds)
        data = _receive_exactly(connection, _STATUS.size)
    except (OSError, ValueError):
        connection.close()
        if start_if_none:
            _start_fork_server(path)
        return None
    if len(data) != _STATUS.size:
        connection.close()
        return None
    (pid,) = _STATUS.unpack(data)
    return ForkedProcess(connection, pid)


def start_fork_server(timeout: float | None = 60.0) -> Path:
    """Start this code's fork server unless it is up, and wait (at most ``timeout``
    seconds; None: not at all) until it answers; its socket's path."""
    path = socket_path()
    if not _answers(path):
        _start_fork_server(path)
    if timeout is None:
        return path
    deadline = time.monotonic() + timeout
    while not _answers(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no fork server answers on {path} after {timeout} s")
        time.sleep(0.1)
    return path


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _start_fork_server(path: Path) -> None:
    """Start the fork server of ``path`` in the background, unless one is starting."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    if time.time() - _mtime(path.with_suffix(".failed")) < _RETRY_FAILED_SECONDS:
        return  # the last one could not start: workers start from scratch meanwhile
    starting = path.with_suffix(".starting")
    try:  # one starter at a time; a stale mark (a starter that died) is taken over
        fd = os.open(starting, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        if time.time() - _mtime(starting) < 60:
            return
        starting.unlink(missing_ok=True)
        return
    os.close(fd)
    subprocess.Popen(
        [sys.executable, "-m", __name__, str(path), _MARKED],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def stop_fork_server(path: Path) -> None:
    """Ask the fork server of ``path`` to end (its workers go on): its socket is removed,
    and so is the mark of one still starting, which then ends instead of serving."""
    Path(path).unlink(missing_ok=True)
    Path(path).with_suffix(".starting").unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux 5.3 or later, or it has ended already
        return None


def _ended(pid: int) -> bool:
    """Whether ``pid`` has ended (gone, or a zombie that its new parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


# --- the fork server -----------------------------------------------------------------------


def _preload() -> None:
    """Import what a worker needs before its first document, as its import-ahead does."""
    from . import _worker_process

    # As the worker's main() sets them, before tiled reads them at import.
    for name, value in _worker_process.WORKER_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    import cloudpickle  # noqa: F401 - the setup message is unpickled with it

    _worker_process.import_ahead()
    from . import _local_server

    _local_server.import_ahead()


def serve(path: Path, *, marked: bool = False) -> int:
    """Run the fork server on the socket ``path`` until it has been idle long enough;
    ``marked``: started after making its ``.starting`` mark, whose removal before it serves
    (:func:`stop_fork_server`) means it is not wanted any more."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    starting = path.with_suffix(".starting")
    try:
        _preload()
        if marked and not starting.exists():
            return 0  # stopped while it imported: stop_fork_server removed the mark
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staged = path.with_suffix(f".{os.getpid()}")
        staged.unlink(missing_ok=True)
        listener.bind(str(staged))
        os.chmod(staged, 0o600)
        listener.listen(16)
        os.replace(staged, path)  # whole: a client never finds a socket that is not ready
    except Exception as error:
        # Said where the next starter looks, which then waits before trying again.
        path.with_suffix(".failed").write_text(f"{type(error).__name__}: {error}\n")
        raise
    finally:
        starting.unlink(missing_ok=True)
    path.with_suffix(".failed").unlink(missing_ok=True)
    identity = path.stat().st_ino
    idle = float(os.environ.get(IDLE_ENV, _DEFAULT_IDLE_SECONDS))
    children: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    last_active = time.monotonic()
    while True:
        for _ in selector.select(timeout=0.2):
            child = _fork_one(listener, selector, children)
            if child is not None:
                children[child[0]] = child[1]
        _reap(children)
        if children:
            last_active = time.monotonic()
        gone = not path.exists() or path.stat().st_ino != identity
        if not children and (gone or time.monotonic() - last_active > idle):
            break
    listener.close()
    if not gone:
        path.unlink(missing_ok=True)
    return 0


def _fork_one(
    listener: socket.socket, selector: selectors.BaseSelector, children: dict[int, socket.socket]
) -> tuple[int, socket.socket] | None:
    connection, _ = listener.accept()
    fds: list[int] = []
    try:
        connection.settimeout(_CONNECT_TIMEOUT)
        message, fds, _, _ = socket.recv_fds(connection, 2**16, 4)
        (length,) = _LENGTH.unpack(message[: _LENGTH.size])
        message = message[_LENGTH.size :]
        while len(message) < length:
            chunk = connection.recv(length - len(message))
            if not chunk:
                raise ValueError("the request ended early")
            message += chunk
        request = json.loads(message)
    except (OSError, ValueError, struct.error):
        for fd in fds:
            os.close(fd)
        connection.close()
        return None
    entry = request.get("entry", "worker") if isinstance(request, dict) else None
    if not isinstance(entry, str) or len(fds) != _FDS_OF_ENTRY.get(entry):
        for fd in fds:
            os.close(fd)
        connection.close()
        return None
    pid = os.fork()
    if pid == 0:  # the worker
        code = 1
        try:
            selector.close()
            listener.close()
            connection.close()
            for other in children.values():  # other sessions' connections
                other.close()
            os.setsid()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.environ.clear()
            os.environ.update(request["environ"])
            os.chdir(request["cwd"])
            code = _run_entry(entry, request.get("argv", []), fds)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - said on the session's stderr, then exit
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    for fd in fds:
        os.close(fd)
    try:
        connection.sendall(_STATUS.pack(pid))
    except OSError:
        pass  # the session is gone; the worker sees its pipes close and ends
    return pid, connection


# What a request may ask to run, and the file descriptors it sends with it.
_FDS_OF_ENTRY = {"worker": 4, "local_server": 1}


def _run_entry(entry: str, argv: list[str], fds: list[int]) -> int:
    """In the forked child: take on the request's descriptors and run what it asks."""
    if entry == "worker":
        to_child, from_child, stdout, stderr = fds
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        os.close(stdout)
        os.close(stderr)
        from ._worker_process import main

        return main([str(to_child), str(from_child)])
    (log,) = fds  # a local store server: detached, its output in its folder's log
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    from ._local_server import main as serve_folder

    return serve_folder(argv)


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = children.pop(pid, None)
        if connection is None:
            continue
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        try:
            connection.sendall(_STATUS.pack(code))
        except OSError:
            pass
        connection.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return serve(Path(args[0]), marked=_MARKED in args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
