"""The writer/handler contract and the description of one file format.

The contract (DBEP 6): a writer is built with exactly the keyword arguments that the
handler's resource holds, ``writer(full_path, **resource_kwargs)``; calling it with one
value writes that value and returns the datum kwargs with which
``handler(full_path, **resource_kwargs)(**datum_kwargs)`` returns it again, dtype and shape
preserved. ``full_path`` is ``os.path.join(root, resource_path)``, as event-model's Filler
builds it, so the resource path stays relative to a root that can be relocated.

What the package's writers also promise, and a writer of your own should: existing data is
never replaced (a path that already holds data is refused with ``AssetExistsError``); a
call that raises leaves the files as they were before it (a full disk raises
``DiskFullError``, checked before anything is written); a frame whose call returned
survives the writing process being killed, and a reader in another process never sees a
partial frame. A writer may also be able to forget its last frames
(:class:`RewindableWriter`), which lets the composer take back the other keys of an event
whose writing failed half-way.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._errors import AssetExistsError

__all__ = ["FileFormat", "Handler", "RewindableWriter", "Writer"]


@runtime_checkable
class Writer(Protocol):
    """Writes the values of one data key of one stream, frame after frame."""

    def __call__(self, value: np.ndarray) -> dict[str, Any]:
        """Write one value; return the datum kwargs that read it back."""
        ...

    def close(self) -> None:
        """Release open files; further calls are an error."""
        ...


@runtime_checkable
class RewindableWriter(Writer, Protocol):
    """A :class:`Writer` that can also forget its last frames (optional for a writer)."""

    def rewind(self, index: int) -> None:
        """Forget the frames from ``index`` on: the next call writes frame ``index`` again.

        ``index`` is at most the number of frames written; their files or rows are removed.
        """
        ...


@runtime_checkable
class Handler(Protocol):
    """Reads back what the matching writer wrote (databroker/event-model handler API)."""

    def __call__(self, **datum_kwargs: Any) -> np.ndarray: ...


@dataclass(frozen=True)
class FileFormat:
    """Everything needed to write one data key to files and to read it back two ways.

    ``resource_path`` and ``resource_kwargs`` describe the files for a handler; ``mimetype``,
    ``stream_uri`` and ``stream_parameters`` describe the same files to tiled, which reads
    ``stream_resource`` documents without handlers.
    """

    name: str
    """Short name used in ``writers_dict`` (``"TIFF"``)."""
    spec: str
    """The resource spec, the key of the handler in ``databroker.handlers``."""
    writer: type
    """Class following the :class:`Writer` contract."""
    handler: type
    """Class following the :class:`Handler` contract."""
    mimetype: str
    """The mimetype tiled's adapters read these files with."""
    suffix: str
    """Added to the stem ``<run uid>/<stream>/<data key>`` to give the resource path."""
    default_resource_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Resource kwargs the writer and the handler are built with."""

    def resource_path(self, stem: str) -> str:
        return stem + self.suffix

    def stream_uri(self, full_path: str) -> str:
        """The ``file://`` URI tiled resolves ``full_path`` by."""
        uri = "file://localhost" + _posix_absolute(full_path)
        # ``full_path`` of a folder format may already end with "/": add at most one.
        return uri + "/" if self.suffix.endswith("/") and not uri.endswith("/") else uri

    def stream_parameters(
        self, resource_kwargs: Mapping[str, Any], frame_shape: tuple[int, ...]
    ) -> dict[str, Any]:
        """Parameters of the ``stream_resource``: tiled's adapter arguments, one frame a datum."""
        params = dict(resource_kwargs)
        params["chunk_shape"] = [1, *frame_shape]
        return params

    def key_resource_kwargs(self, data_key: str, described: Mapping[str, Any]) -> dict[str, Any]:
        """Resource kwargs that depend on the data key written (its name and its data key
        in the descriptor, ``described``); none for most formats."""
        return {}

    def check_target(self, full_path: str, resource_kwargs: Mapping[str, Any]) -> None:
        """Refuse, before a writer is made, a place that already holds data.

        :class:`AssetExistsError` if a file the writer would make exists already;
        :class:`AssetLocationError` if ``resource_kwargs`` would put files elsewhere than
        ``full_path``. A format whose files are not just ``full_path`` overrides this.
        """
        if os.path.lexists(full_path):
            raise AssetExistsError(
                errno.EEXIST,
                f"refusing to write {self.name} data to {full_path!r}: it exists already",
                full_path,
            )


def _posix_absolute(path: str) -> str:
    from pathlib import Path

    absolute = os.path.abspath(path)
    return Path(absolute).as_posix() + ("/" if path.endswith(("/", os.sep)) else "")
