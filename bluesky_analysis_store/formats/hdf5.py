"""HDF5: one file per run and data key, one chunked dataset that grows by a frame a call."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

from ._base import FileFormat

__all__ = ["HDF5_FORMAT", "HDF5DatasetHandler", "HDF5DatasetWriter"]

DEFAULT_DATASET = "data"


class HDF5DatasetWriter:
    """Appends each value as one more row of ``dataset``.

    The file is opened for each frame and closed again, so that a reader in another process
    (tiled, a handler) always finds a complete file while the run is still going.
    """

    def __init__(self, path: str, dataset: str = DEFAULT_DATASET) -> None:
        self._path = path
        self._dataset = dataset
        self._index = 0
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def __call__(self, value: np.ndarray) -> dict[str, Any]:
        value = np.asarray(value)
        index = self._index
        with h5py.File(self._path, "a", locking=False) as file:
            if index == 0:
                if self._dataset in file:
                    del file[self._dataset]
                file.create_dataset(
                    self._dataset,
                    shape=(0, *value.shape),
                    maxshape=(None, *value.shape),
                    chunks=(1, *value.shape) if value.size else None,
                    dtype=value.dtype,
                )
            dataset = file[self._dataset]
            dataset.resize(index + 1, axis=0)
            dataset[index] = value
        self._index += 1
        return {"index": index}

    def close(self) -> None:
        pass


class HDF5DatasetHandler:
    """Reads row ``index`` of the dataset written by :class:`HDF5DatasetWriter`."""

    def __init__(self, path: str, dataset: str = DEFAULT_DATASET) -> None:
        self._path = path
        self._dataset = dataset

    def __call__(self, index: int) -> np.ndarray:
        with h5py.File(self._path, "r", locking=False) as file:
            return file[self._dataset][index]


class _HDF5Format(FileFormat):
    def stream_parameters(
        self, resource_kwargs: Mapping[str, Any], frame_shape: tuple[int, ...]
    ) -> dict[str, Any]:
        params = super().stream_parameters(resource_kwargs, frame_shape)
        # Files are closed between frames and written without SWMR.
        params.update(swmr=False, locking=False)
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
