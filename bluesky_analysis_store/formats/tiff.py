"""TIFF series: one file per frame in a folder per run, stream and data key (tifffile).

Each frame file appears whole under its final name or not at all (``_safe_writing``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tifffile

from ._base import FileFormat
from ._safe_writing import remove_frame_files, write_frame_file

__all__ = ["TIFF_FORMAT", "TIFFSeriesHandler", "TIFFSeriesWriter"]

DEFAULT_TEMPLATE = "{:06d}.tif"


class TIFFSeriesWriter:
    """Writes each value as ``<folder>/<template.format(index)>``; never replaces a file."""

    def __init__(self, path: str, template: str = DEFAULT_TEMPLATE) -> None:
        self._folder = path
        self._template = template
        self._index = 0
        os.makedirs(path, exist_ok=True)

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
        return os.path.join(self._folder, self._template.format(index))

    def close(self) -> None:
        pass


class TIFFSeriesHandler:
    """Reads frame ``index`` of a series written by :class:`TIFFSeriesWriter`."""

    def __init__(self, path: str, template: str = DEFAULT_TEMPLATE) -> None:
        self._folder = path
        self._template = template

    def __call__(self, index: int) -> np.ndarray:
        return tifffile.imread(os.path.join(self._folder, self._template.format(index)))


TIFF_FORMAT = FileFormat(
    name="TIFF",
    spec="BAS_TIFF_SERIES",
    writer=TIFFSeriesWriter,
    handler=TIFFSeriesHandler,
    mimetype="multipart/related;type=image/tiff",
    suffix="/",
    default_resource_kwargs={"template": DEFAULT_TEMPLATE},
)
