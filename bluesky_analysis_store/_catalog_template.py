"""New embedded catalogs copied from an empty one made once per tiled version.

tiled creates a catalog by running ``tiled catalog init`` in a subprocess: about 3 s of
imports and migrations, every time a store folder is made. What it makes, an empty SQLite
catalog (its schema, the root node, the "public" access tag), names no path, so it is made
once into the user's cache folder and copied for each new store: a new store then opens as
fast as an existing one. Anything unusual (no cache folder, a copy failing) falls back to
tiled's own way.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_folder", "copy_empty_catalog"]

logger = logging.getLogger(__name__)

CACHE_ENV = "BLUESKY_ANALYSIS_STORE_CACHE"
"""Where the empty catalog is kept (default ``$XDG_CACHE_HOME/bluesky-analysis-store``)."""


def cache_folder() -> Path:
    """This user's cache of the package (``$BLUESKY_ANALYSIS_STORE_CACHE``, by default
    ``$XDG_CACHE_HOME/bluesky-analysis-store``)."""
    if folder := os.environ.get(CACHE_ENV):
        return Path(folder)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bluesky-analysis-store"


def _template() -> Path:
    """The empty catalog of this tiled version, made now if it is not there yet."""
    from importlib import metadata

    version = metadata.version("tiled")
    template = cache_folder() / f"empty-catalog-tiled-{version}.db"
    if template.is_file():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    # Made under a name of its own, then renamed: processes making it at once do not meet.
    with tempfile.TemporaryDirectory(dir=template.parent) as scratch:
        made = Path(scratch) / "catalog.db"
        subprocess.run(
            [sys.executable, "-m", "tiled", "catalog", "init", f"sqlite:///{made}"],
            check=True,
            capture_output=True,
        )
        os.replace(made, template)
    return template


def copy_empty_catalog(path: Path) -> bool:
    """Make ``path`` an empty catalog by copying the template; False if that could not be
    done (the caller then lets tiled create it)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        shutil.copyfile(_template(), partial)
        os.replace(partial, path)
    except (OSError, subprocess.CalledProcessError) as error:
        logger.debug("no empty catalog to copy (%s): tiled creates %s", error, path)
        partial.unlink(missing_ok=True)
        return False
    return True
