"""NPY series: one ``.npy`` file per frame, named ``<prefix>_<index>.npy``.

The naming is the one ophyd.sim's ``NPY_SEQ`` uses and the one tiled's NPY consolidator
expects, so the same files are readable through a handler and through tiled. Each frame
file appears whole under its final name or not at all (``_safe_writing``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._base import FileFormat
from ._safe_writing import remove_frame_files, write_frame_file

__all__ = ["NPY_FORMAT", "NPYSeriesHandler", "NPYSeriesWriter"]


def _frame_path(prefix: str, index: int) -> str:
    return f"{prefix}_{index}.npy"


class NPYSeriesWriter:
    """Writes each value to ``<prefix>_<index>.npy``; never replaces a file."""

    def __init__(self, path: str) -> None:
        self._prefix = path
        self._index = 0
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def __call__(self, value: np.ndarray) -> dict[str, Any]:
        value = np.asarray(value)
        index = self._index
        write_frame_file(
            _frame_path(self._prefix, index),
            value.nbytes,
            lambda f: np.save(f, value, allow_pickle=False),
        )
        self._index = index + 1
        return {"index": index}

    def rewind(self, index: int) -> None:
        """Forget the frames from ``index`` on: their files are removed."""
        if not 0 <= index <= self._index:
            raise ValueError(f"cannot rewind to frame {index}: {self._index} frames written")
        remove_frame_files([_frame_path(self._prefix, n) for n in range(index, self._index)])
        self._index = index

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
