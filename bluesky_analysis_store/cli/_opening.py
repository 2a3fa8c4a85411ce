"""Opening the analysis store (and the source of raw runs) and finding runs in it by uid."""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any

from .._store import STORE_ENV, default_store_location
from ._exits import CommandError

# The command line's logger, "bluesky_analysis_store.cli", whichever of its modules logs.
logger = logging.getLogger(__package__)

API_KEY_ENV = "TILED_API_KEY"
"""Environment variable holding the API key of a tiled server (as tiled itself reads it)."""

MIN_UID_PREFIX = 8
"""How many leading characters of a uid are enough to name a run (if they are unique)."""

_UID_CHARACTERS = re.compile(r"^[0-9A-Za-z-]+$")


def is_uri(location: str) -> bool:
    """Whether ``location`` names a tiled server rather than a folder."""
    return location.startswith(("http://", "https://"))


def store_location(args: argparse.Namespace) -> str:
    """``--store``, else ``$BLUESKY_ANALYSIS_STORE``, else ``./analysis-store``."""
    return getattr(args, "store", None) or default_store_location()


def _open(
    location: str, args: argparse.Namespace, *, create: bool, served: bool | None = None
) -> Any:
    """The :class:`AnalysisStore` at ``location``; a folder without a catalog is refused
    unless ``create``; ``served`` as for :meth:`AnalysisStore.open`."""
    from .._store import AnalysisStore

    if is_uri(location):
        api_key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV)
        try:
            return AnalysisStore.from_uri(location, api_key=api_key)
        except Exception as error:  # httpx's and tiled's errors: say what failed, in one line
            raise CommandError(
                f"cannot connect to the analysis store at {location}: {error}"
            ) from error
    folder = os.path.abspath(location)
    if not create:
        if not os.path.isdir(folder):
            raise CommandError(
                f"no analysis store at {folder}: the folder does not exist "
                f"(give --store PATH_OR_URI or set {STORE_ENV})"
            )
        if not os.path.isfile(os.path.join(folder, "catalog.db")):
            raise CommandError(
                f"no analysis store at {folder}: the folder has no catalog.db "
                f"(give --store PATH_OR_URI or set {STORE_ENV})"
            )
    elif os.path.exists(folder) and not os.path.isdir(folder):
        raise CommandError(f"cannot make an analysis store at {folder}: it is a file")
    logger.info("opening the analysis store in %s", folder)
    return AnalysisStore.open(folder, served=served)


def open_store(
    args: argparse.Namespace, *, create: bool = False, served: bool | None = None
) -> Any:
    """The analysis store the command works on; only ``create`` may make a new one.
    ``served=True`` opens an embedded store through its local server whatever
    ``$BLUESKY_ANALYSIS_STORE_SERVED`` says (for what only the server does, streaming)."""
    return _open(store_location(args), args, create=create, served=served)


def open_source(args: argparse.Namespace, store: Any) -> Any:
    """The catalog to read raw runs from: ``--source``, else the store itself."""
    source = getattr(args, "source", None)
    if source is None:
        return store
    if source == store.location or (
        not is_uri(source) and store.location == os.path.abspath(source)
    ):
        return store
    return _open(source, args, create=False)


def find_run(client: Any, text: str) -> Any:
    """The run named by a uid, or by its first ``MIN_UID_PREFIX`` or more characters."""
    from tiled.client.container import Container

    text = text.strip()
    if not _UID_CHARACTERS.match(text):
        raise CommandError(f"{text!r} is not a run uid (letters, digits and '-' only)")
    try:  # the exact key first: no search, and no prefix magic
        return Container.__getitem__(client, text)
    except KeyError:
        pass
    if len(text) < MIN_UID_PREFIX:
        raise CommandError(
            f"no run {text!r} in the analysis store (a shortened uid needs at least "
            f"{MIN_UID_PREFIX} characters)"
        )
    from tiled.queries import Like

    # The embedded store and tiled's SQL catalogs take LIKE (as CatalogOfBlueskyRuns' own
    # partial-uid lookup does); the uid's characters were checked above.
    matches = client.search(Like("start.uid", f"{text}%")).values().head(2)
    if len(matches) > 1:
        raise CommandError(f"uid prefix {text!r} matches more than one run; give more characters")
    if not matches:
        raise CommandError(f"no run {text!r} in the analysis store")
    return matches[0]


def run_uid(run: Any) -> str:
    """The full uid of ``run``, from its start document."""
    from .._replay import start_document

    return start_document(run)["uid"]


def find_parent_uid(store: Any, text: str) -> str:
    """The uid of a run that children in ``store`` name as parent; the parent itself may be in
    another catalog (``reprocess --source``), so the children's records are searched too."""
    from tiled.queries import Contains

    from .._replay import start_document

    try:
        return run_uid(find_run(store.catalog, text))
    except CommandError:
        if len(text) < MIN_UID_PREFIX:
            raise
    # Contains is a substring match on the JSON text; the prefix is checked again here.
    results = store.catalog.search(Contains("start.parent_uids", text))
    matches = {
        uid
        for run in results.values()
        for uid in start_document(run).get("parent_uids") or ()
        if uid.startswith(text)
    }
    if len(matches) > 1:
        raise CommandError(f"uid prefix {text!r} matches more than one run; give more characters")
    if not matches:
        raise CommandError(f"no run {text!r} in the analysis store, nor any run derived from it")
    return matches.pop()
