"""Opening an embedded store quietly: no version banner, no dependency's deprecation notice.

Two things reach a user's terminal when tiled's app is built and served in the process, and
neither is for them: tiled's server logs ``Tiled version X`` at INFO through a handler of its
own (``tiled.server.app`` sets its logger's level and handler when imported), and tiled's
client imports ``starlette.testclient``, which warns that using it with ``httpx`` is
deprecated. :func:`quiet_tiled` silences exactly these two, for as long as it is held; every
other log record and warning passes as before.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["quiet_tiled"]

TILED_APP_LOGGER = "tiled.server.app"
_BANNER_PREFIX = "Tiled version"
# starlette.testclient's notice, given once, when the module is first imported.
_TESTCLIENT_NOTICE = r"Using `httpx` with `starlette\.testclient` is deprecated"


class _NoVersionBanner(logging.Filter):
    """Drops tiled's ``Tiled version X`` record, and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno == logging.INFO
            and isinstance(record.msg, str)
            and record.msg.startswith(_BANNER_PREFIX)
        )


@contextmanager
def quiet_tiled() -> Iterator[None]:
    """Build and start tiled's in-process app inside this: its version banner and
    starlette's ``httpx`` deprecation notice are not shown; nothing else changes."""
    banner = _NoVersionBanner()
    logger = logging.getLogger(TILED_APP_LOGGER)
    logger.addFilter(banner)
    try:
        with warnings.catch_warnings():
            # UserWarning: starlette's StarletteDeprecationWarning subclasses it, and naming
            # it would import starlette here.
            warnings.filterwarnings("ignore", message=_TESTCLIENT_NOTICE, category=UserWarning)
            yield
    finally:
        logger.removeFilter(banner)
