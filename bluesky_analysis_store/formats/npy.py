"""NPY series: one ``.npy`` file per frame, named ``<prefix>_<index>.npy``.

The naming is the one ophyd.sim's ``NPY_SEQ`` uses and the one tiled's NPY consolidator
expects, so the same files are readable through a handler and through tiled. Each frame
file appears whole under its final name or not at all (``_safe_writing``). The writer
refuses a prefix that already has frame files; the handler reads only inside the root its
resource was joined to (and inside its ``roots``, when confined to them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from .._confinement import check_handler_path
from ._base import FileFormat
from ._paths import existing, frame_index
from ._safe_writing import remove_frame_files, write_frame_file

__all__ = ["NPY_FORMAT", "NPYSeriesHandler", "NPYSeriesWriter"]


def _frame_path(prefix: str, index: int) -> str:
    return f"{prefix}_{index}.npy"


def _check_target(prefix: str) -> None:
    """Refuse a prefix that is a folder or has frame files already."""
    if os.path.isdir(prefix) or os.path.basename(prefix) in ("", ".", ".."):
        raise existing(prefix, "the NPY prefix (a folder)")
    folder, stem = os.path.split(prefix)
    frame = re.compile(re.escape(stem) + r"_[0-9]+\.npy")
    try:
        names = os.listdir(folder or ".")
    except (FileNotFoundError, NotADirectoryError):
        return
    taken = sorted(name for name in names if frame.fullmatch(name))
    if taken:
        raise existing(os.path.join(folder, taken[0]), "the NPY series")


class NPYSeriesWriter:
    """Writes each value to ``<prefix>_<index>.npy``; never replaces a file."""

    def __init__(self, path: str) -> None:
        _check_target(path)
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

    roots: ClassVar[tuple[str, ...] | None] = None
    """The only folders this handler may read (``None``: any, below its resource's root)."""

    def __init__(self, path: str) -> None:
        self._prefix = check_handler_path(path, self.roots)

    def __call__(self, index: int) -> np.ndarray:
        path = check_handler_path(_frame_path(self._prefix, frame_index(index)), self.roots)
        return np.load(path, allow_pickle=False)


class _NPYFormat(FileFormat):
    def check_target(self, full_path: str, resource_kwargs: Mapping[str, Any]) -> None:
        _check_target(full_path)


NPY_FORMAT = _NPYFormat(
    name="NPY",
    spec="BAS_NPY_SERIES",
    writer=NPYSeriesWriter,
    handler=NPYSeriesHandler,
    mimetype="multipart/related;type=application/x-npy",
    suffix="",
)
