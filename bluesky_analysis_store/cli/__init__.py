"""The command line, ``bluesky-analysis-store``: look at, plot, make and check derived runs.

Every subcommand works on one analysis store: ``--store PATH_OR_URI`` (before or after the
subcommand), else ``$BLUESKY_ANALYSIS_STORE``, else ``./analysis-store``. Only ``demo``,
``ingest`` and ``reprocess --source`` may create a store; the others refuse a folder without
a catalog. A user's mistake prints one line, ``bluesky-analysis-store: error: ...``, on
stderr and exits with status 2; stdout carries only the result (pure JSON with ``--json``).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence

from ._exits import EXIT_OK, PROG, error_text, fail, user_errors
from ._opening import API_KEY_ENV
from ._parser import build_parser

__all__ = ["API_KEY_ENV", "build_parser", "main"]

logger = logging.getLogger(__name__)


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def _configure_logging(verbosity: int) -> None:
    """Warnings on stderr; with ``-v`` this package's INFO too, with ``-vv`` everyone's."""
    logging.basicConfig(
        level=logging.INFO if verbosity > 1 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if verbosity:
        # The whole package, not only its command line.
        logging.getLogger("bluesky_analysis_store").setLevel(logging.INFO)
        return
    # tiled's server logs "Tiled version ..." at INFO through a handler of its own, and sets
    # its level when imported; a filter on the logger outlives that.
    logging.getLogger("tiled.server.app").addFilter(_BelowWarning())
    # Dependencies' deprecation notices are for developers, not for the command's user.
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("ignore", message=r".*starlette\.testclient.*")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bluesky-analysis-store`` with ``argv`` (default: the process's) and return the
    exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(getattr(args, "verbose", 0))
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `ls | head`: the reader left; nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as error:
        if not isinstance(error, user_errors()):
            raise  # a bug: its traceback is what the report needs
        logger.info("the command failed:", exc_info=True)  # the traceback, with --verbose
        fail(error_text(error))
