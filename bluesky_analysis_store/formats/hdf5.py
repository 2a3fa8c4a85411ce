"""HDF5: one file per run and data key, one chunked dataset that grows by a frame a call.

The writer keeps its file open in SWMR mode (single writer, multiple readers): after each
frame the dataset is flushed, and from then on a reader in another process that opens the
file with ``swmr=True`` (the handler, tiled's adapter through the stream resource's
parameters) finds every frame whose call returned, also while the run goes on and also
after the writing process was killed (its file then keeps the "open for writing" flag, which
only a non-SWMR reader minds: ``h5clear -s`` clears it). A row whose call had not returned
when the writer was killed may be there too, incomplete; no datum refers to it.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Mapping
from typing import Any, ClassVar

import h5py
import numpy as np

from .._confinement import check_handler_path
from .._errors import AnalysisStoreError, AssetExistsError, AssetLocationError, FrameWriteError
from ._base import FileFormat
from ._paths import frame_index
from ._safe_writing import ensure_free_space, frame_write_error

__all__ = ["HDF5_FORMAT", "HDF5DatasetHandler", "HDF5DatasetWriter"]

DEFAULT_DATASET = "data"

# What h5py raises for a failed write, flush or resize: OSError or RuntimeError.
_H5_ERRORS = (OSError, RuntimeError)


class HDF5DatasetWriter:
    """Appends each value as one more row of ``dataset``, in a file it creates.

    The file and its chunked, resizable dataset are created at the first frame (their shape
    and dtype come from it), with ``libver="latest"``, under a hidden name that is renamed
    to ``path`` once the file is in SWMR mode; each frame resizes, writes and flushes the
    dataset. A path that exists already is refused: the writer never deletes or appends to
    data it did not write.
    """

    def __init__(self, path: str, dataset: str = DEFAULT_DATASET) -> None:
        self._path = path
        self._dataset_name = dataset
        self._file: h5py.File | None = None
        self._dataset: h5py.Dataset | None = None
        self._index = 0
        self._closed = False
        _refuse_existing(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def __call__(self, value: np.ndarray) -> dict[str, Any]:
        if self._closed:
            raise FrameWriteError(errno.EBADF, f"the writer of {self._path!r} is closed")
        value = np.asarray(value)
        ensure_free_space(self._path, value.nbytes)
        dataset = self._dataset if self._dataset is not None else self._create(value)
        index = self._index
        try:
            dataset.resize(index + 1, axis=0)
            dataset[index] = value
            dataset.flush()
        except BaseException as error:
            self._shrink_back(index)
            if isinstance(error, _H5_ERRORS):
                raise frame_write_error(error, self._path, value.nbytes) from error
            raise
        self._index = index + 1
        return {"index": index}

    def rewind(self, index: int) -> None:
        """Forget the rows from ``index`` on (the dataset is resized back and flushed)."""
        if not 0 <= index <= self._index:
            raise ValueError(f"cannot rewind to frame {index}: {self._index} frames written")
        if self._dataset is None or index == self._index:
            return
        try:
            self._dataset.resize(index, axis=0)
            self._dataset.flush()
        except _H5_ERRORS as error:
            raise frame_write_error(error, self._path, 0) from error
        self._index = index

    def close(self) -> None:
        self._closed = True
        file, self._file, self._dataset = self._file, None, None
        if file is None:
            return
        try:
            file.close()
        except _H5_ERRORS as error:
            raise frame_write_error(error, self._path, 0) from error

    def _create(self, value: np.ndarray) -> h5py.Dataset:
        # Made under a hidden name and renamed once in SWMR mode: until then a reader would
        # find a file open for writing without SWMR, which it cannot open.
        folder, name = os.path.split(self._path)
        temporary = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.part")
        try:
            file = h5py.File(temporary, "x", libver="latest", locking=False)
        except _H5_ERRORS as error:
            raise frame_write_error(error, self._path, value.nbytes) from error
        try:
            dataset = file.create_dataset(
                self._dataset_name,
                shape=(0, *value.shape),
                maxshape=(None, *value.shape),
                chunks=(1, *value.shape) if value.size else None,
                dtype=value.dtype,
            )
            # From here on no object may be added to the file; readers may open it.
            file.swmr_mode = True
            _refuse_existing(self._path)  # appeared since __init__
            os.replace(temporary, self._path)
        except BaseException as error:
            # The file is this writer's own and holds nothing yet: leave no half-made file.
            _close_quietly(file)
            os.remove(temporary)
            if isinstance(error, _H5_ERRORS) and not isinstance(error, AnalysisStoreError):
                raise frame_write_error(error, self._path, value.nbytes) from error
            raise
        self._file, self._dataset = file, dataset
        return dataset

    def _shrink_back(self, index: int) -> None:
        """After a failed frame: the dataset as it was before (best effort, never raises)."""
        assert self._dataset is not None
        try:
            if self._dataset.shape[0] != index:
                self._dataset.resize(index, axis=0)
            self._dataset.flush()
        except _H5_ERRORS:
            # The next frame or close() tries again; the rows up to ``index`` stay valid.
            pass


def _refuse_existing(path: str) -> None:
    if os.path.lexists(path):
        raise _exists(path)


def _exists(path: str) -> AssetExistsError:
    return AssetExistsError(
        errno.EEXIST,
        f"refusing to write into the existing file {path!r}: an HDF5 writer only creates "
        "new files, it never appends to or replaces existing data",
        path,
    )


def _close_quietly(file: h5py.File) -> None:
    try:
        file.close()
    except _H5_ERRORS:
        pass


class HDF5DatasetHandler:
    """Reads row ``index`` of the dataset written by :class:`HDF5DatasetWriter`.

    Only a dataset stored in the file itself is read: one reached through an external or
    soft link, or a virtual dataset (whose rows live in other files), is refused, as the
    writer never makes them and they could lead anywhere on the disk.
    """

    roots: ClassVar[tuple[str, ...] | None] = None
    """The only folders this handler may read (``None``: any, below its resource's root)."""

    def __init__(self, path: str, dataset: str = DEFAULT_DATASET) -> None:
        self._path = check_handler_path(path, self.roots)
        self._dataset = dataset

    def __call__(self, index: int) -> np.ndarray:
        # SWMR: the file may be open for writing, or have been left so by a killed writer.
        with h5py.File(self._path, "r", swmr=True, locking=False) as file:
            return _own_dataset(file, self._dataset, self._path)[frame_index(index)]


def _own_dataset(file: h5py.File, name: str, path: str) -> h5py.Dataset:
    """The dataset ``name``, reached through hard links only and not virtual."""
    if not isinstance(name, str) or not name.strip("/"):
        raise AssetLocationError(f"{path!r}: {name!r} does not name a dataset")
    group: Any = file
    parts = [part for part in name.split("/") if part]
    for number, part in enumerate(parts):
        link = group.get(part, getlink=True)
        if link is None:
            raise KeyError(f"{path!r} has no dataset {name!r}")
        if not isinstance(link, h5py.HardLink):
            raise AssetLocationError(
                f"{path!r}: {'/'.join(parts[: number + 1])!r} is a {type(link).__name__}; "
                "only data stored in the file itself is read"
            )
        group = group[part]
    if not isinstance(group, h5py.Dataset) or group.is_virtual:
        raise AssetLocationError(f"{path!r}: {name!r} is not a dataset stored in the file itself")
    return group


class _HDF5Format(FileFormat):
    def stream_parameters(
        self, resource_kwargs: Mapping[str, Any], frame_shape: tuple[int, ...]
    ) -> dict[str, Any]:
        params = super().stream_parameters(resource_kwargs, frame_shape)
        # Written in SWMR mode and kept open during the run: tiled's adapter must read with
        # swmr=True (a non-SWMR open fails on a file open for writing). No file locks: SWMR
        # needs none, and they fail on some network file systems.
        params.update(swmr=True, locking=False)
        return params


HDF5_FORMAT = _HDF5Format(
    name="HDF5",
    spec="BAS_HDF5",
    writer=HDF5DatasetWriter,
    handler=HDF5DatasetHandler,
    mimetype="application/x-hdf5",
    suffix=".h5",
    default_resource_kwargs={"dataset": DEFAULT_DATASET},
)
