"""Recovery: deliver the journals that outlived the process that wrote them.

A journal nobody holds (``_journal.py``: its writer's ``flock`` went with the writer) is a
child run that was not delivered: the store was down when its process exited, or the
process was killed. :func:`recover` delivers each such journal whole (``_delivery.py``),
and first closes a run that has no stop with one of ``exit_status: "fail"`` whose reason
names the interruption, appended to the journal, so that running it again is idempotent:
the same stop, and no second copy of anything. Journals held by a live process are left
to it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from event_model import DocumentNames, schema_validators

from ._delivery import deliver_documents, expected_counts
from ._journal import JournalContents, RunJournal, journal_paths, read_journal
from ._replay import failed_stop

__all__ = ["INTERRUPTED_REASON", "RecoveryReport", "recover"]

logger = logging.getLogger(__name__)

INTERRUPTED_REASON = (
    "interrupted: the process reducing this run ended before the run's stop; closed by "
    "recover from its journal"
)


@dataclass
class RecoveryReport:
    """What :func:`recover` did, by child run uid."""

    delivered: list[str] = field(default_factory=list)
    """Runs now complete in the store (including those closed as interrupted)."""
    closed: list[str] = field(default_factory=list)
    """Runs that had no stop and were given one of ``exit_status: "fail"``."""
    live: list[str] = field(default_factory=list)
    """Journals held by a running process, left alone."""
    failed: dict[str, str] = field(default_factory=dict)
    """Runs whose delivery failed (their journals stay), with the error."""

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        parts = [f"{len(self.delivered)} delivered"]
        if self.closed:
            parts.append(f"{len(self.closed)} closed as interrupted")
        if self.live:
            parts.append(f"{len(self.live)} in use by a running process")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        return ", ".join(parts)


def recover(store: Any, journal_folder: str | os.PathLike[str] | None = None) -> RecoveryReport:
    """Deliver every journal in ``journal_folder`` (default: the store's) that no running
    process holds, closing runs without a stop as interrupted."""
    folder = Path(journal_folder if journal_folder is not None else store.journal_folder)
    report = RecoveryReport()
    for path in journal_paths(folder):
        uid = path.name.split(".")[0]
        if path.stat().st_size == 0:  # being opened by its writer this very moment
            continue
        journal = RunJournal.take_over(path)
        if journal is None:
            report.live.append(uid)
            continue
        try:
            _recover_one(store, journal, report)
        except Exception as error:
            report.failed[uid] = f"{type(error).__name__}: {error}"
            logger.error("child run %s not recovered: %s", uid, error)
        finally:
            journal.close()
    if report.delivered or report.failed:
        logger.info("recover %s: %s", folder, report)
    return report


def _recover_one(store: Any, journal: RunJournal, report: RecoveryReport) -> None:
    uid = journal.run_uid
    contents = read_journal(journal.path)
    if contents.unreadable is not None:
        # Not a record cut short by a crash (that one is dropped): the file was changed.
        raise ValueError(f"the journal {journal.path} is damaged ({contents.unreadable})")
    start = contents.start
    if start is None or start.get("uid") != uid:
        raise ValueError(f"the journal {journal.path} does not begin with run {uid}'s start")
    if contents.stop is None:
        stop = interrupted_stop(contents, uid)
        journal.append("stop", stop)
        journal.sync()
        contents.documents.append(("stop", stop))
        report.closed.append(uid)
    deliver_documents(store, contents.documents)
    journal.remove()
    report.delivered.append(uid)


def interrupted_stop(
    contents: JournalContents, uid: str, reason: str = INTERRUPTED_REASON
) -> dict[str, Any]:
    counts = expected_counts(contents.documents)
    events = sum(counts.events.values())
    stop = failed_stop(uid, reason, dict(counts.events))
    stop["reduction"] = {
        "events_reduced": events,
        "events_failed": None,
        "failures": [],
        "raw_exit_status": None,
        "interrupted": True,
    }
    schema_validators[DocumentNames.stop].validate(stop)
    return stop
