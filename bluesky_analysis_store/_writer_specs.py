"""Which data keys go to files, in which format, under which root (the ``writers_dict``)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._confinement import confined_path
from ._errors import AnalysisStoreError, AssetExistsError, WriterRootError
from .formats import FileFormat, formats

__all__ = [
    "DATA_ROOT_ENV",
    "PlannedFile",
    "WriterSpec",
    "default_data_root",
    "ensure_writable_root",
    "resolve_writers",
]

DATA_ROOT_ENV = "BLUESKY_ANALYSIS_DATA"
"""Environment variable naming the folder derived files go under by default."""


def default_data_root() -> str:
    return os.path.abspath(os.environ.get(DATA_ROOT_ENV) or "analysis-data")


def ensure_writable_root(root: str | os.PathLike[str]) -> str:
    """Create ``root`` if it is missing; refuse it if it is not a writable folder."""
    root = os.path.abspath(os.fspath(root))
    if os.path.exists(root) and not os.path.isdir(root):
        raise WriterRootError(f"writer root {root!r} exists and is not a folder")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as error:
        raise WriterRootError(f"cannot create writer root {root!r}: {error}") from error
    if not os.access(root, os.W_OK | os.X_OK):
        raise WriterRootError(f"writer root {root!r} is not writable")
    return root


@dataclass(frozen=True)
class WriterSpec:
    """How one data key is written: a writer class, its spec and where its files go."""

    writer: type
    spec: str
    root: str
    resource_kwargs: Mapping[str, Any] = field(default_factory=dict)
    resource_func: Callable[..., Mapping[str, Any]] | None = None
    resource_func_kwargs: Mapping[str, Any] = field(default_factory=dict)
    file_format: FileFormat | None = None

    def resource(
        self, docs: Mapping[str, Any], data_key: str, stem: str
    ) -> tuple[str, dict[str, Any]]:
        """``(resource_path, resource_kwargs)`` for ``data_key``; ``stem`` is run/stream/key."""
        if self.resource_func is not None:
            try:
                made = self.resource_func(docs, data_key, **self.resource_func_kwargs)
            except AnalysisStoreError:
                raise
            except Exception as error:
                raise AnalysisStoreError(
                    f"the resource func for {data_key!r} raised {type(error).__name__}: {error}"
                ) from error
            try:
                path, kwargs = made["resource_path"], made.get("resource_kwargs", {})
                if isinstance(path, os.PathLike):
                    path = os.fspath(path)
                if not isinstance(path, str):
                    raise TypeError("resource_path is not a str")
                # The format's defaults (a dataset, a template) unless the func sets them.
                return path, {**self.resource_kwargs, **dict(kwargs)}
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise AnalysisStoreError(
                    f"the resource func for {data_key!r} must return a mapping with a str "
                    f"'resource_path' and optionally 'resource_kwargs', not {made!r}"
                ) from error
        if self.file_format is not None:
            path = self.file_format.resource_path(stem)
        else:
            path = stem
        return path, dict(self.resource_kwargs)

    def plan(self, docs: Mapping[str, Any], data_key: str, stem: str) -> PlannedFile:
        """Where ``data_key``'s files go, checked before any writer is made.

        The resource path (the default ``stem``, or the resource func's) must stay strictly
        inside the root, symlinks resolved (else :class:`AssetLocationError`), and the place
        must hold no data yet (else :class:`AssetExistsError`). Creates nothing.
        """
        resource_path, resource_kwargs = self.resource(docs, data_key, stem)
        full_path = confined_path(
            self.root, resource_path, what=f"the resource path of {data_key!r}"
        )
        if self.file_format is not None:
            self.file_format.check_target(full_path, resource_kwargs)
        elif os.path.lexists(full_path):
            raise AssetExistsError(
                errno.EEXIST,
                f"refusing to write {data_key!r} to {full_path!r}: it exists already",
                full_path,
            )
        return PlannedFile(self.root, resource_path, resource_kwargs, full_path)


@dataclass(frozen=True)
class PlannedFile:
    """The checked place of one data key's files in one run."""

    root: str
    """The writer root, absolute (the resource's ``root``)."""
    resource_path: str
    """Relative to ``root``, strictly inside it."""
    resource_kwargs: Mapping[str, Any]
    """What the writer and the handler are built with."""
    full_path: str
    """``os.path.join(root, resource_path)``, what the writer is given."""


def _from_seed_form(data_key: str, entry: Mapping[str, Any], root: str | None) -> WriterSpec:
    unknown = set(entry) - {"writer", "resource", "root", "spec"}
    if unknown:
        raise AnalysisStoreError(f"writers_dict[{data_key!r}] has unknown fields {sorted(unknown)}")
    spec = entry.get("spec")
    file_format = formats[spec] if spec is not None and spec in formats else None
    writer = entry.get("writer") or (file_format.writer if file_format else None)
    if writer is None or spec is None:
        raise AnalysisStoreError(
            f"writers_dict[{data_key!r}] needs a 'writer' class and the 'spec' of its handler"
        )
    resource = entry.get("resource") or {}
    func = resource.get("func")
    if func is not None and not callable(func):
        raise AnalysisStoreError(f"writers_dict[{data_key!r}]['resource']['func'] is not callable")
    if file_format is not None and writer is not file_format.writer:
        file_format = None  # a custom writer under a known spec: files laid out its own way
    return WriterSpec(
        writer=writer,
        spec=file_format.spec if file_format else spec,
        root=os.path.abspath(entry.get("root") or root or default_data_root()),
        resource_kwargs=dict(file_format.default_resource_kwargs) if file_format else {},
        resource_func=func,
        resource_func_kwargs=dict(resource.get("kwargs") or {}),
        file_format=file_format,
    )


def resolve_writers(
    writers_dict: Mapping[str, Any] | None, root: str | os.PathLike[str] | None = None
) -> dict[str, WriterSpec]:
    """Normalise a ``writers_dict`` in either form.

    ``{key: "TIFF"}`` names a registered format (files under ``root``); the DBEP 6 form
    ``{key: {"writer": cls, "resource": {"func": f, "kwargs": {...}}, "root": path,
    "spec": name}}`` gives the writer class and the handler's spec explicitly.
    """
    root_str = os.fspath(root) if root is not None else None
    specs: dict[str, WriterSpec] = {}
    for data_key, entry in (writers_dict or {}).items():
        if isinstance(entry, str):
            fmt = formats[entry]
            specs[data_key] = WriterSpec(
                writer=fmt.writer,
                spec=fmt.spec,
                root=os.path.abspath(root_str or default_data_root()),
                resource_kwargs=dict(fmt.default_resource_kwargs),
                file_format=fmt,
            )
        elif isinstance(entry, FileFormat):
            specs[data_key] = resolve_writers({data_key: entry.spec}, root)[data_key]
        elif isinstance(entry, Mapping):
            specs[data_key] = _from_seed_form(data_key, entry, root_str)
        else:
            raise AnalysisStoreError(
                f"writers_dict[{data_key!r}] must name a format (e.g. 'TIFF') or be a "
                f"mapping with 'writer' and 'spec', not {entry!r}"
            )
    return specs
