"""Real faults for the durability tests: a ``tiled serve`` process that can be killed and
started again on the same port and catalog, and a TCP proxy in front of it whose link can
be cut and restored at an exact point of a test (as a network failure would)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

API_KEY = "secret"
STARTUP_DEADLINE = 120.0  # seconds to wait for the server to answer, not a measured time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(
    process: subprocess.Popen[bytes], uri: str, log: Callable[[], str],
    timeout: float = STARTUP_DEADLINE,
) -> None:
    """Wait for the tiled server ``process`` to answer at ``uri``; its ``log()`` in the
    error if it exits or does not answer in time."""
    deadline = time.monotonic() + timeout
    # One client for every try: each new one loads the CA bundle (tens of ms of CPU).
    with httpx.Client(trust_env=False, verify=False, timeout=2) as http:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"tiled server exited with {process.returncode}:\n{log()}")
            try:
                if http.get(f"{uri}/api/v1/").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tiled server did not answer:\n{log()}")
            time.sleep(0.2)


class TiledServer:
    """``tiled serve catalog`` over a SQLite catalog in ``folder``, on a fixed port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.assets = folder / "assets"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._initialised = False
        for name in ("data", "assets"):
            (folder / name).mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        from bluesky_analysis_store._catalog_template import copy_empty_catalog

        if not self._initialised and copy_empty_catalog(self.folder / "catalog.db"):
            self._initialised = True  # tiled's own initialisation is a subprocess of seconds
        tiled = Path(sys.executable).with_name("tiled")
        command = [
            str(tiled), "serve", "catalog", str(self.folder / "catalog.db"),
            *([] if self._initialised else ["--init"]),
            "--write", str(self.folder / "data"),
            "--write", f"sqlite:///{self.folder / 'tables.db'}",
            "--read", str(self.assets),
            "--host", "127.0.0.1", "--port", str(self.port), "--api-key", API_KEY,
        ]  # fmt: skip
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 - the server's stdout
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._initialised = True
        wait_until_serving(self.process, self.uri, self.log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")


class CuttableProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``; :meth:`cut` drops every connection
    and refuses new ones until :meth:`restore`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, []
        if listener is not None:
            listener.close()
        for connection in connections:
            _close(connection)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:
                    _close(client)
                    _close(upstream)
                    return
                self._connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


RECORD_ENV = "BAS_RELIABILITY_RECORD"
"""When set, a file the fault tests append their outcomes to (see
benchmarks/reliability_report.py, which writes docs/reliability.md from them)."""


def record_outcome(scenario: str, fault: str, computed: int, delivered: int) -> None:
    """Note what a fault test saw: events computed (journaled) and delivered to the store."""
    import json

    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    with open(path, "a") as file:
        record = {"scenario": scenario, "fault": fault, "computed": computed,
                  "delivered": delivered}  # fmt: skip
        file.write(json.dumps(record) + "\n")
