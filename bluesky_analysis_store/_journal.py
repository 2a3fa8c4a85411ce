"""The journal: every child run's documents on local disk before they go to the store.

One append-only file per child run, ``<journal folder>/<child uid>.journal``, one JSON
document a line (numpy arrays and scalars tagged, so that they come back with their dtype
and shape). A run's documents are journaled as they are made, each with one write to the
operating system, and the file is fsync'd at the run's stop; delivery to the store is a
separate stage (``_delivery.py``) that reads from here when it has to deliver again.

While a process writes or delivers a journal it holds an exclusive ``flock`` on it: the
kernel drops the lock when the process ends, however it ends, so a journal that can be
locked belongs to nobody and ``recover`` may take it. Journal files are read as untrusted
input: only file names that are uuids are taken, a line cut short by a crash ends the
journal, and tags decode to numbers, strings and numpy arrays only.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import JournalError

__all__ = [
    "JOURNAL_SUFFIX",
    "JournalContents",
    "JournalError",
    "RunJournal",
    "journal_paths",
    "read_journal",
]

logger = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal"
_UID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_ARRAY_TAG = "__bas_ndarray__"


# --- encoding -----------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)  # tobytes() below is in C order whatever the layout
        if array.dtype.kind == "O":
            raise TypeError("object arrays cannot be journaled")
        return {
            _ARRAY_TAG: {
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "scalar": isinstance(value, np.generic),
                "data": base64.b64encode(array.tobytes()).decode("ascii"),
            }
        }
    raise TypeError(f"{type(value).__name__} cannot be journaled")


def _object_hook(obj: dict[str, Any]) -> Any:
    tagged = obj.get(_ARRAY_TAG)
    if tagged is None or len(obj) != 1:
        return obj
    dtype = np.dtype(tagged["dtype"])
    if dtype.kind not in "biufcSUMm":
        raise ValueError(f"journaled array of dtype {dtype} is not accepted")
    array = np.frombuffer(base64.b64decode(tagged["data"]), dtype=dtype).reshape(tagged["shape"])
    array = array.copy()  # writable, not a view of the decoded bytes
    return array[()] if tagged.get("scalar") else array


def encode_record(name: str, doc: dict[str, Any]) -> bytes:
    # allow_nan: a NaN or inf in derived data is journaled as the store would get it.
    return json.dumps([name, doc], default=_default, separators=(",", ":")).encode() + b"\n"


def decode_record(line: bytes) -> tuple[str, dict[str, Any]]:
    name, doc = json.loads(line, object_hook=_object_hook)
    if not isinstance(name, str) or not isinstance(doc, dict):
        raise ValueError("a journal record is [name, document]")
    return name, doc


# --- writing ------------------------------------------------------------------------------


class RunJournal:
    """The journal of one child run, open for appending and locked by this process."""

    def __init__(self, folder: str | os.PathLike[str], run_uid: str) -> None:
        if not _UID.match(run_uid):
            raise JournalError(f"a journal is named by a run uid, not {run_uid!r}")
        self.run_uid = run_uid
        self.path = Path(folder) / f"{run_uid}{JOURNAL_SUFFIX}"
        self.records = 0
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Unbuffered: each record is one write(2), so what append returned survives the
            # process (SIGKILL included); fsync at the run's stop makes it survive the machine.
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - held for the run
        except OSError as error:
            raise JournalError(f"cannot open the journal {self.path}: {error}") from error
        if not _try_lock(self._file.fileno()):
            self._file.close()
            raise JournalError(f"the journal {self.path} is in use by another process")
        if self._file.tell():  # taken over from a process that ended: count what it holds
            self.records = len(read_journal(self.path).documents)

    @classmethod
    def take_over(cls, path: Path) -> RunJournal | None:
        """The journal at ``path`` if no live process holds it, else None."""
        try:
            return cls(path.parent, path.name[: -len(JOURNAL_SUFFIX)])
        except JournalError:
            return None

    def append(self, name: str, doc: dict[str, Any]) -> int:
        """Write one document; return its index in the journal."""
        return self.append_all([(name, doc)])

    def append_all(self, documents: list[tuple[str, dict[str, Any]]]) -> int:
        """Write documents that belong together (one event's) in one write, all or none;
        return the index of the first."""
        try:
            data = b"".join(encode_record(name, doc) for name, doc in documents)
        except (TypeError, ValueError) as error:
            raise JournalError(f"a document cannot be journaled: {error}") from error
        with self._lock:
            if self._file.closed:
                raise JournalError(f"the journal {self.path} is closed")
            offset = self._file.tell()
            try:
                view = memoryview(data)
                while view.nbytes:
                    view = view[self._file.write(view) :]
            except OSError as error:
                # A disk that filled up mid-write: cut the partial record off again, so
                # that what the journal holds stays whole records.
                try:
                    self._file.truncate(offset)
                    self._file.seek(offset)
                except OSError:
                    logger.exception("the journal %s could not be truncated", self.path)
                raise JournalError(f"cannot write the journal {self.path}: {error}") from error
            index = self.records
            self.records += len(documents)
            return index

    def sync(self) -> None:
        """Wait until what was appended is on the disk."""
        with self._lock:
            if self._file.closed:
                return
            try:
                os.fsync(self._file.fileno())
            except OSError as error:
                raise JournalError(f"cannot write the journal {self.path}: {error}") from error

    def clear(self) -> None:
        """Empty a journal taken over from a process that ended, for a run about to be
        journaled again whole (a retried task making the same child uid)."""
        with self._lock:
            try:
                self._file.truncate(0)
                self._file.seek(0)
            except OSError as error:
                raise JournalError(f"cannot empty the journal {self.path}: {error}") from error
            self.records = 0

    def close(self) -> None:
        """Release the journal (the file stays, for delivery or recovery)."""
        with self._lock:
            self._file.close()  # closing the descriptor releases the lock

    def remove(self) -> None:
        """Delete the journal: its run is in the store, complete and read back."""
        with self._lock:
            if not self._file.closed:
                self._file.close()
            self.path.unlink(missing_ok=True)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


# --- reading ------------------------------------------------------------------------------


@dataclass
class JournalContents:
    """What a journal holds, as far as it could be read."""

    documents: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    truncated: bool = False
    """A last line was cut short (the writing process ended while writing it)."""
    unreadable: str | None = None
    """Why reading stopped before the end, other than a cut-short last line."""

    @property
    def start(self) -> dict[str, Any] | None:
        return self.documents[0][1] if self.documents and self.documents[0][0] == "start" else None

    @property
    def stop(self) -> dict[str, Any] | None:
        for name, doc in reversed(self.documents):
            if name == "stop":
                return doc
        return None


def read_journal(path: str | os.PathLike[str]) -> JournalContents:
    contents = JournalContents()
    with open(path, "rb") as file:
        lines = file.read().split(b"\n")
    # The text after the last newline is a record only if it is complete.
    tail = lines.pop()
    if tail:
        contents.truncated = True
    for number, line in enumerate(lines, start=1):
        try:
            contents.documents.append(decode_record(line))
        except (ValueError, TypeError, KeyError) as error:
            if number == len(lines) and not tail:
                contents.truncated = True  # a last line cut short, then a newline
            else:
                contents.unreadable = f"line {number}: {error}"
            break
    return contents


def journal_paths(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """The journals in ``folder``, oldest first; other files are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return iter(())
    paths = [
        p
        for p in folder.iterdir()
        if p.name.endswith(JOURNAL_SUFFIX)
        and _UID.match(p.name[: -len(JOURNAL_SUFFIX)])
        and p.is_file()
        and not p.is_symlink()
    ]
    return iter(sorted(paths, key=lambda p: p.stat().st_mtime))
