"""The one line a session prints after each scan: which child run, how the reduction went,
where the derived data is.

The reducing side (the worker process, the worker thread or the foreground router) reports a
:class:`ReductionOutcome` once a raw run's child run is saved, kept in its journal, or could
not be made; the session turns it into a line on the ``bluesky_analysis_store.summary``
logger: INFO when every event was reduced, WARNING when some failed or the store did not take
the run yet, ERROR when all failed or the child run is missing. The words ``FAILED``,
``LOST`` and ``NOT SAVED`` mark a failure at a glance.

A session without any logging set up shows nothing below WARNING, so :func:`show_summaries`
gives that logger a handler that prints to ``sys.stderr`` (where log records go, leaving a
script's output alone) for as long as no other handler would show its records (one
configured later takes over: no line is shown twice).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

__all__ = ["SUMMARY_LOGGER", "ReductionOutcome", "lost_line", "show_summaries", "summary_line"]

SUMMARY_LOGGER = "bluesky_analysis_store.summary"


@dataclass(frozen=True)
class ReductionOutcome:
    """How one raw run's reduction ended, as the reducing side knows it (plain values: it
    crosses the pipe from a worker process)."""

    raw_uid: str
    #: The child run's uid; None if it could not even be started.
    child_uid: str | None
    scan_id: int | None
    events_reduced: int
    events_failed: int
    #: The child stop's exit status; None if the child run has no stop.
    exit_status: str | None
    #: True once the store holds the whole child run; False while only its journal does.
    saved: bool
    #: The store's folder or URI.
    store: str | None
    #: The journal holding a child run the store did not take.
    journal: str | None = None


def summary_line(outcome: ReductionOutcome) -> tuple[int, str]:
    """The log level and the text of ``outcome``'s line."""
    scan = f" of scan {outcome.scan_id}" if outcome.scan_id is not None else ""
    raw = f"(raw {outcome.raw_uid[:8]})"
    if outcome.child_uid is None:
        return logging.ERROR, f"no derived run{scan} {raw}: FAILED, it could not be started"
    counts = f"{outcome.events_reduced} events reduced, {outcome.events_failed} failed"
    head = f"derived run {outcome.child_uid[:8]}{scan} {raw}"
    level = logging.INFO
    verdict = ""
    if outcome.events_failed and not outcome.events_reduced:
        level, verdict = logging.ERROR, " FAILED"
    elif outcome.events_failed:
        level, verdict = logging.WARNING, " PARTLY FAILED"
    if outcome.exit_status is None:
        level, verdict = logging.ERROR, " INCOMPLETE (no stop)"
    elif outcome.exit_status != "success":
        level = max(level, logging.WARNING)
        verdict += f" (exit status {outcome.exit_status})"
    if outcome.saved:
        where = f"saved in {outcome.store or 'the analysis store'}"
    else:
        level = max(level, logging.WARNING)
        where = (
            f"NOT SAVED yet: kept in the journal {outcome.journal} (the store did not take it; "
            "it is delivered again automatically, or with `bluesky-analysis-store recover`)"
        )
    return level, f"{head}{verdict}: {counts}; {where}"


def lost_line(raw_uid: str, scan_id: int | None, why: str) -> str:
    """The line of a raw run whose child run was lost with its worker."""
    scan = f" of scan {scan_id}" if scan_id is not None else ""
    return f"derived run{scan} (raw {raw_uid[:8]}) LOST: {why}"


class _StderrFallback(logging.Handler):
    """Prints a record to the current ``sys.stderr`` (IPython and pytest replace it) unless
    a handler further up the logger tree shows it already."""

    def emit(self, record: logging.LogRecord) -> None:
        if _shown_elsewhere(logging.getLogger(record.name), self):
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _shown_elsewhere(logger: logging.Logger, fallback: logging.Handler) -> bool:
    current: logging.Logger | None = logger
    while current is not None:
        if any(handler is not fallback for handler in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent  # type: ignore[assignment]
    return False


def show_summaries(name: str = SUMMARY_LOGGER) -> None:
    """Make the summary lines visible: their logger at INFO unless a level was set for it,
    and the stderr fallback handler (once)."""
    logger = logging.getLogger(name)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not any(isinstance(handler, _StderrFallback) for handler in logger.handlers):
        handler = _StderrFallback()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
