"""Which file formats exist: found through the ``bluesky_analysis_store.formats`` entry points."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from importlib.metadata import entry_points

from .._errors import FormatRegistryError
from ._base import FileFormat
from ._paths import confine_handler

__all__ = ["ENTRY_POINT_GROUP", "FormatRegistry", "formats"]

ENTRY_POINT_GROUP = "bluesky_analysis_store.formats"


class FormatRegistry:
    """Formats by spec, also reachable by their short name (``"TIFF"``).

    Entry points are read on first use, so importing the package stays cheap. Registering a
    different format under a taken spec or name is refused: a silent replacement would make
    old resources read with the wrong handler.
    """

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self._by_spec: dict[str, FileFormat] = {}
        self._by_name: dict[str, FileFormat] = {}
        self._load_entry_points = load_entry_points
        self._lock = threading.RLock()
        self._loading = False

    def register(self, fmt: FileFormat, *, overwrite: bool = False) -> None:
        """Add ``fmt``; refuse a different format under a spec or name already taken."""
        self._ensure_loaded()
        self._register(fmt, overwrite=overwrite)

    def _register(self, fmt: FileFormat, *, overwrite: bool) -> None:
        if not isinstance(fmt, FileFormat):
            raise FormatRegistryError(f"{fmt!r} is not a FileFormat")
        for table, key in ((self._by_spec, fmt.spec), (self._by_name, fmt.name)):
            taken = table.get(key)
            if taken is not None and taken != fmt and not overwrite:
                raise FormatRegistryError(
                    f"format {key!r} is already registered with writer "
                    f"{taken.writer.__qualname__} and handler {taken.handler.__qualname__}; "
                    "pass overwrite=True to replace it"
                )
        self._by_spec[fmt.spec] = fmt
        self._by_name[fmt.name] = fmt

    def __getitem__(self, spec_or_name: str) -> FileFormat:
        self._ensure_loaded()
        fmt = self._by_spec.get(spec_or_name) or self._by_name.get(spec_or_name)
        if fmt is None:
            known = ", ".join(sorted(self._by_name))
            raise FormatRegistryError(f"unknown format {spec_or_name!r}; known formats: {known}")
        return fmt

    def __contains__(self, spec_or_name: object) -> bool:
        self._ensure_loaded()
        return spec_or_name in self._by_spec or spec_or_name in self._by_name

    def __iter__(self) -> Iterator[FileFormat]:
        self._ensure_loaded()
        return iter(list(self._by_spec.values()))

    def handler_registry(
        self, roots: Iterable[str | os.PathLike[str]] | None = None
    ) -> dict[str, type]:
        """``{spec: handler class}``, as event-model's ``Filler`` takes it.

        With ``roots``, each handler reads only inside those folders, symlinks resolved
        (:func:`confine_handler`): give the folders the data may be in, so that a resource
        with an absolute ``resource_path`` or a link out of its root is refused.
        """
        if roots is None:
            return {fmt.spec: fmt.handler for fmt in self}
        roots = list(roots)
        return {fmt.spec: confine_handler(fmt.handler, roots) for fmt in self}

    def _ensure_loaded(self) -> None:
        if not self._load_entry_points:
            return
        with self._lock:
            if not self._load_entry_points or self._loading:
                return  # loaded, or this thread is loading (a format registering itself)
            self._loading = True
            try:
                for entry_point in entry_points(group=ENTRY_POINT_GROUP):
                    fmt = entry_point.load()
                    if fmt.spec != entry_point.name:
                        raise FormatRegistryError(
                            f"entry point {entry_point.name!r} names format spec {fmt.spec!r}"
                        )
                    self._register(fmt, overwrite=False)
            finally:
                self._loading = False
            # Only now: another thread must not find the registry empty while it loads.
            self._load_entry_points = False


formats = FormatRegistry()
"""The registry the package uses; add formats of your own with ``formats.register``."""
