"""TIFF series: one file per frame in a folder per run, stream and data key (tifffile)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tifffile

from ._base import FileFormat

__all__ = ["TIFF_FORMAT", "TIFFSeriesHandler", "TIFFSeriesWriter"]

DEFAULT_TEMPLATE = "{:06d}.tif"


class TIFFSeriesWriter:
    """Writes each value as ``<folder>/<template.format(index)>``."""

    def __init__(self, path: str, template: str = DEFAULT_TEMPLATE) -> None:
        self._folder = path
        self._template = template
        self._index = 0
        os.makedirs(path, exist_ok=True)

    def __call__(self, value: np.ndarray) -> dict[str, Any]:
        index = self._index
        tifffile.imwrite(os.path.join(self._folder, self._template.format(index)), value)
        self._index += 1
        return {"index": index}

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
