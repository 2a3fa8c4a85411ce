"""TIFF series: one file per frame in a folder per run, stream and data key (tifffile).

Each frame file appears whole under its final name or not at all (``_safe_writing``). The
writer refuses a folder that already holds files, and a template that would name a file
anywhere but directly inside the folder; the handler reads only inside the root its
resource was joined to (and inside its ``roots``, when confined to them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import tifffile

from .._confinement import check_handler_path
from .._errors import AssetExistsError
from ._base import FileFormat
from ._paths import existing, frame_index, plain_file_name
from ._safe_writing import remove_frame_files, write_frame_file

__all__ = ["TIFF_FORMAT", "TIFFSeriesHandler", "TIFFSeriesWriter"]

DEFAULT_TEMPLATE = "{:06d}.tif"


def _frame_name(template: object, index: int) -> str:
    """``template.format(index)``, refused unless it is a plain file name."""
    what = f"the template {template!r}"
    try:
        name = template.format(index) if isinstance(template, str) else None
    except (IndexError, KeyError, ValueError, AttributeError, TypeError):
        name = None
    return plain_file_name(name, what)


def _check_target(folder: str, template: object) -> None:
    """Refuse a template that names no plain, distinct frame files, and a folder that is a
    file or holds files already."""
    if _frame_name(template, 0) == _frame_name(template, 1):
        raise AssetExistsError(
            f"the template {template!r} gives every frame the same file name; it must "
            "contain the frame index, e.g. '{:06d}.tif'"
        )
    if os.path.lexists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise existing(folder, "the TIFF folder")


class TIFFSeriesWriter:
    """Writes each value as ``<folder>/<template.format(index)>``; never replaces a file."""

    def __init__(self, path: str, template: str = DEFAULT_TEMPLATE) -> None:
        _check_target(path, template)
        self._folder = path
        self._template = template
        self._index = 0
        try:
            os.makedirs(path, exist_ok=True)
        except FileExistsError as error:  # appeared since the check, as a file
            raise existing(path, "the TIFF folder") from error

    def __call__(self, value: np.ndarray) -> dict[str, Any]:
        value = np.asarray(value)
        index = self._index
        path = self._frame_path(index)
        write_frame_file(path, value.nbytes, lambda file: tifffile.imwrite(file, value))
        self._index = index + 1
        return {"index": index}

    def rewind(self, index: int) -> None:
        """Forget the frames from ``index`` on: their files are removed."""
        if not 0 <= index <= self._index:
            raise ValueError(f"cannot rewind to frame {index}: {self._index} frames written")
        remove_frame_files([self._frame_path(n) for n in range(index, self._index)])
        self._index = index

    def _frame_path(self, index: int) -> str:
        return os.path.join(self._folder, _frame_name(self._template, index))

    def close(self) -> None:
        pass


class TIFFSeriesHandler:
    """Reads frame ``index`` of a series written by :class:`TIFFSeriesWriter`."""

    roots: ClassVar[tuple[str, ...] | None] = None
    """The only folders this handler may read (``None``: any, below its resource's root)."""

    def __init__(self, path: str, template: str = DEFAULT_TEMPLATE) -> None:
        self._folder = check_handler_path(path, self.roots)
        self._template = template
        _frame_name(template, 0)

    def __call__(self, index: int) -> np.ndarray:
        name = _frame_name(self._template, frame_index(index))
        return tifffile.imread(check_handler_path(os.path.join(self._folder, name), self.roots))


class _TIFFFormat(FileFormat):
    def check_target(self, full_path: str, resource_kwargs: Mapping[str, Any]) -> None:
        _check_target(full_path, resource_kwargs.get("template", DEFAULT_TEMPLATE))


TIFF_FORMAT = _TIFFFormat(
    name="TIFF",
    spec="BAS_TIFF_SERIES",
    writer=TIFFSeriesWriter,
    handler=TIFFSeriesHandler,
    mimetype="multipart/related;type=image/tiff",
    suffix="/",
    default_resource_kwargs={"template": DEFAULT_TEMPLATE},
)
