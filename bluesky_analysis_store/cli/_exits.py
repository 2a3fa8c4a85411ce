"""How the command ends: its exit statuses, and a user's mistake reported in one line."""

from __future__ import annotations

import sys
from typing import NoReturn

from .._errors import AnalysisStoreError

PROG = "bluesky-analysis-store"

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran, but a run failed to reprocess or did not reproduce
EXIT_ERROR = 2  # a user's mistake, or an error that stopped the command


class CommandError(Exception):
    """A mistake to report on one line: the message is all the user needs."""


def fail(message: str) -> NoReturn:
    """Write ``bluesky-analysis-store: error: MESSAGE`` on one line of stderr and exit 2."""
    first_line = " ".join(str(message).split())  # one line, whatever the message held
    sys.stderr.write(f"{PROG}: error: {first_line}\n")
    raise SystemExit(EXIT_ERROR)


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user's mistake raises: the package's errors and the builtins they refine, and
    a tiled server's HTTP errors (a wrong URI, a missing API key)."""
    errors: tuple[type[BaseException], ...] = (
        CommandError,
        AnalysisStoreError,
        KeyError,
        ValueError,
        OSError,
    )
    if "httpx" in sys.modules:  # imported by tiled's client; absent, nothing can raise it
        errors += (sys.modules["httpx"].HTTPError,)
    return errors


def error_text(error: BaseException) -> str:
    """The one line that reports ``error``: its message, and its type unless it is ours."""
    if isinstance(error, KeyError) and not isinstance(error, AnalysisStoreError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error)
    if isinstance(error, (CommandError, AnalysisStoreError)):
        return text or type(error).__name__
    return f"{text} ({type(error).__name__})" if text else type(error).__name__
