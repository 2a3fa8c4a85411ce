"""NPY series: one ``.npy`` file per frame, named ``<prefix>_<index>.npy``.

The naming is the one ophyd.sim's ``NPY_SEQ`` uses and the one tiled's NPY consolidator
expects, so the same files are readable through a handler and through tiled.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._base import FileFormat

__all__ = ["NPY_FORMAT", "NPYSeriesHandler", "NPYSeriesWriter"]


def _frame_path(prefix: str, index: int) -> str:
    return f"{prefix}_{index}.npy"


class NPYSeriesWriter:
    """Writes each value to ``<prefix>_<index>.npy``."""

    def __init__(self, path: str) -> None:
        self._prefix = path
        self._index = 0
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def __call__(self, value: np.ndarray) -> dict[str, Any]:
        index = self._index
        np.save(_frame_path(self._prefix, index), np.asarray(value), allow_pickle=False)
        self._index += 1
        return {"index": index}

    def close(self) -> None:
        pass


class NPYSeriesHandler:
    """Reads frame ``index`` of a series written by :class:`NPYSeriesWriter`."""

    def __init__(self, path: str) -> None:
        self._prefix = path

    def __call__(self, index: int) -> np.ndarray:
        return np.load(_frame_path(self._prefix, index), allow_pickle=False)


NPY_FORMAT = FileFormat(
    name="NPY",
    spec="BAS_NPY_SERIES",
    writer=NPYSeriesWriter,
    handler=NPYSeriesHandler,
    mimetype="multipart/related;type=application/x-npy",
    suffix="",
)
