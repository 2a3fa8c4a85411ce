"""A ``bluesky-analysis-store serve`` subprocess for tests: started on a free port, waited
for until it answers, stopped (SIGTERM, SIGKILL after a while) in teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from _faults import free_port, wait_until_serving

API_KEY = "servetestkey0123"


class ServeProcess:
    """``bluesky-analysis-store serve --store FOLDER *options`` on 127.0.0.1."""

    def __init__(self, folder: Path, *options: str | os.PathLike[str]) -> None:
        self.folder = folder
        self.assets = folder / "assets"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.options = [str(option) for option in options]
        self.log_path = folder.parent / f"{folder.name}-serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeProcess:
        command = [
            sys.executable, "-m", "bluesky_analysis_store", "serve", "--store", str(self.folder),
            "--port", str(self.port), *self.options,
        ]  # fmt: skip
        environment = {**os.environ, "TILED_API_KEY": API_KEY}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=environment
            )
        try:
            wait_until_serving(self.process, self.uri, self.log)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the server with ``sig``; its exit status (None if it had to be killed)."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                return process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                return None
        return process.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
