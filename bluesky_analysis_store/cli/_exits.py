"""How the command ends: its exit statuses, and a user's mistake reported in one line."""

from __future__ import annotations

import re
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


# The library tells a Python caller which argument to pass; a user of the command is told
# which option to type instead, or, where the command has none, that it has none.
_PYTHON_TO_COMMAND_LINE = [
    (re.compile(r"reprocess\(\.\.\., derived=True\) \(--derived\)"), "--derived"),
    (
        re.compile(r"(?:pass )?trust_recorded_code=True \(--trust-recorded-code\)"),
        "give --trust-recorded-code",
    ),
    (
        re.compile(r"Pass strict=False to save it anyway \(the gaps are recorded\)\."),
        "The command line saves only runs whose provenance is complete.",
    ),
    (
        re.compile(r"open the store with readable=\[\.\.\.\]"),
        "allow the folder once from Python, AnalysisStore.open(STORE, readable=[FOLDER]) "
        "(the store remembers it)",
    ),
    (
        re.compile(r"pass reducers=\[\.\.\.\]( built with the same values)?"),
        "make it importable here (the command line runs only the recorded code)",
    ),
    (re.compile(r"choose them with streams=\[\.\.\.\]"), "choose them with --stream NAME"),
    (re.compile(r"\b(rtol|atol) must\b"), r"--\1 must"),
    (re.compile(r"\(rtol=(\S+), atol=(\S+)\)"), r"(--rtol \1, --atol \2)"),
]


def command_line_text(text: str) -> str:
    """A library message with its Python arguments replaced by what to type at the command
    line."""
    for pattern, replacement in _PYTHON_TO_COMMAND_LINE:
        text = pattern.sub(replacement, text)
    return text


def error_text(error: BaseException) -> str:
    """The one line that reports ``error``: its message, in the command line's words, and
    its type unless it is ours."""
    if isinstance(error, KeyError) and not isinstance(error, AnalysisStoreError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error)
    text = command_line_text(text)
    if isinstance(error, (CommandError, AnalysisStoreError)):
        return text or type(error).__name__
    return f"{text} ({type(error).__name__})" if text else type(error).__name__
