"""The checks the shipped formats share on the paths they write and read.

A writer makes files only at the place it was given (its path, or frame files named by
its template directly inside its folder) and never where data exists already; a handler
reads only below the root its resource was joined to and, when it is confined to folders
(:func:`confine_handler`), only inside them, symlinks resolved.
"""

from __future__ import annotations

import errno
import functools
import operator
import os
from collections.abc import Iterable
from typing import Any

from .._confinement import check_handler_path
from .._errors import AssetExistsError, AssetLocationError

__all__ = ["confine_handler", "existing", "frame_index", "plain_file_name"]


def existing(path: str, what: str) -> AssetExistsError:
    """The refusal of a place that holds data already."""
    return AssetExistsError(
        errno.EEXIST,
        f"refusing to write into {what} {path!r}: it exists already, and existing data is "
        "never appended to or replaced",
        path,
    )


def plain_file_name(name: object, what: str) -> str:
    """``name`` if it names a file directly inside a folder (no separator, not ``..``)."""
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "\0" in name
        or any(separator in name for separator in separators)
    ):
        raise AssetLocationError(
            f"{what} gives the frame file name {name!r}: a frame must be a plain file name "
            "inside its folder"
        )
    return name


def frame_index(index: object) -> int:
    """A datum's ``index`` as a non-negative int (a string could name another file)."""
    try:
        value = operator.index(index)  # type: ignore[arg-type]
    except TypeError:
        value = -1
    if value < 0:
        raise AssetLocationError(f"a frame index must be a non-negative integer, not {index!r}")
    return value


def confine_handler(handler: Any, roots: Iterable[str | os.PathLike[str]]) -> Any:
    """``handler`` (a class, or any handler factory) confined to read inside ``roots`` only.

    The result takes the same arguments and refuses, with :class:`AssetLocationError`, a
    path whose real location is outside every root. The package's own handlers also check
    each frame file they open against the roots (``roots`` class attribute).
    """
    confined_roots = tuple(os.path.abspath(os.fspath(root)) for root in roots)
    if isinstance(handler, type):

        def __init__(self: Any, path: str, *args: Any, **kwargs: Any) -> None:  # noqa: N807
            check_handler_path(path, confined_roots)
            handler.__init__(self, path, *args, **kwargs)

        return type(
            handler.__name__,
            (handler,),
            {
                "__init__": __init__,
                "__module__": handler.__module__,
                "__qualname__": handler.__qualname__,
                "__doc__": handler.__doc__,
                "roots": confined_roots,
            },
        )

    @functools.wraps(handler)
    def make(path: str, *args: Any, **kwargs: Any) -> Any:
        check_handler_path(path, confined_roots)
        return handler(path, *args, **kwargs)

    return make
