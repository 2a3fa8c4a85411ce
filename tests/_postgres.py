"""A throwaway PostgreSQL 15 cluster for tests: ``initdb`` into a temporary folder, one
server on a free 127.0.0.1 port (``-A trust``, nothing else listening), stopped and removed
afterwards.

PostgreSQL refuses to run as root. When the tests run as root (as here, and perhaps on CI)
the folder is given to the ``postgres`` system user (else ``nobody``) and ``initdb`` /
``pg_ctl`` run through ``runuser -u USER --``; otherwise they run as the current user.
Every cluster started is stopped at interpreter exit too, should a fixture's teardown not
run.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["POSTGRES_BIN", "PostgresCluster"]

POSTGRES_BIN = Path(os.environ.get("BAS_TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "analysis"
DEFAULT_DATABASE = "analysis"
_START_TIMEOUT = 60  # seconds pg_ctl waits for the server, not a measured time
_RUNNING: set[PostgresCluster] = set()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _service_user() -> str | None:
    """Who runs the cluster: None (this process's user) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' user exists")


class PostgresCluster:
    """One PostgreSQL server of its own: :meth:`start`, :meth:`uri`, :meth:`stop`."""

    def __init__(self, database: str = DEFAULT_DATABASE) -> None:
        self.database = database
        self.user = _service_user()
        self.port = _free_port()
        # Not under pytest's tmp_path: its folders are private to root, and the cluster's
        # user must reach its own folder.
        self.folder = Path(tempfile.mkdtemp(prefix="bas-postgres-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self._started = False

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        argv = [str(POSTGRES_BIN / command[0]), *command[1:]]
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
        if result.returncode:
            raise RuntimeError(
                f"{command[0]} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
                f"{self.log_text()}"
            )
        return result

    def start(self) -> PostgresCluster:
        if self.user is not None:
            shutil.chown(self.folder, user=self.user)
        _RUNNING.add(self)
        try:
            self._run(
                "initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust",
                "-E", "UTF8", "--no-sync", "--no-instructions",
            )  # fmt: skip
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                f"-c unix_socket_directories={self.folder} -c fsync=off "
                "-c max_connections=200"
            )
            self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                "-w", "-t", str(_START_TIMEOUT), "start",
            )  # fmt: skip
            self._started = True
            self.createdb(self.database)
        except BaseException:
            self.stop()
            raise
        return self

    def createdb(self, name: str) -> str:
        """Make database ``name``; its URI."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name)
        return self.uri(name)

    def uri(self, database: str | None = None) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database or self.database}"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (fast: connections are cut) and remove its folder."""
        _RUNNING.discard(self)
        if self._started:
            self._started = False
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                self._kill_postmaster()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGQUIT)  # PostgreSQL's immediate shutdown
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                os.kill(pid, 0)  # raises once it is gone
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _stop_every_cluster() -> None:
    for cluster in list(_RUNNING):
        cluster.stop()
