"""Reading an array of the store from its files, in this process, when they are local.

Through the catalog an array travels from its file into the server, is encoded, sent and
decoded: several copies of every byte. When the store's files are on this machine and
inside the folders the store may read, tiled's own adapter for the file's mimetype reads
them here instead, as the server would (same adapter, same parameters, same values), at
the speed of reading the file. Anything else (data kept inside the catalog, files on
another machine, a mimetype without an adapter) is read through the catalog.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlparse

from ._confinement import check_readable

__all__ = ["read_array"]

# What ``from_catalog`` reads of the catalog node: its metadata and specs (as tiled's
# consolidators pass it too).
_Node = collections.namedtuple("_Node", ["metadata_", "specs"])


def read_array(node: Any, readable_roots: Sequence[str] | None, slice: Any = ...) -> Any:
    """The values of the tiled array ``node`` (``node[slice]``), read from its local files
    through tiled's adapter when possible, else through the catalog.

    A file outside ``readable_roots`` is refused (:class:`AssetLocationError`), as the
    server refuses it: the catalog's records are not trusted to name only the store's files.
    """
    source = _local_source(node, readable_roots)
    if source is None:
        return node.read() if slice is ... else node[slice]
    import numpy as np

    direct = _read_hdf5_dataset(source, slice)
    if direct is not None:
        return direct
    adapter = _adapter(node, source)
    if adapter is None:
        return node.read() if slice is ... else node[slice]
    from tiled.ndslice import NDSlice

    if slice is ...:
        return np.asarray(adapter.read())
    return np.asarray(adapter.read(NDSlice(*(slice if isinstance(slice, tuple) else (slice,)))))


def _local_source(node: Any, readable_roots: Sequence[str] | None) -> Any:
    """The data source of ``node`` if all its files are local and readable, else None."""
    if readable_roots is None or getattr(node, "structure_family", None) != "array":
        return None
    sources = node.data_sources() or []  # fetched now unless they came with the node
    if len(sources) != 1:
        return None
    (source,) = sources
    if getattr(source, "management", None) != "external" or not source.assets:
        return None
    for asset in source.assets:
        path = _local_path(asset.data_uri)
        if path is None or not os.path.exists(path):
            return None  # on the server's machine, not this one
        check_readable(path, readable_roots, what=f"array {node.item['id']!r}")
    from tiled.structures.array import ArrayStructure

    if isinstance(source.structure, dict):
        source.structure = ArrayStructure.from_json(source.structure)
    return source


def _local_path(uri: str) -> str | None:
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        return None
    return unquote(parsed.path)


def _read_hdf5_dataset(source: Any, slice: Any) -> Any:
    """One HDF5 file's dataset read with h5py, when that is all the array is.

    tiled's HDF5 adapter builds a dask graph of a task per chunk and computes it: several
    times slower than one h5py read of the dataset (a frame per chunk, as written here)."""
    parameters = dict(source.parameters or {})
    dataset = parameters.pop("dataset", None)
    parameters.pop("swmr", None)
    parameters.pop("locking", None)
    parameters.pop("libver", None)
    files = [asset for asset in source.assets if asset.parameter == "data_uris"]
    if source.mimetype != "application/x-hdf5" or not dataset or parameters or len(files) != 1:
        return None
    import h5py
    import numpy as np

    structure = source.structure
    with h5py.File(_local_path(files[0].data_uri), "r", swmr=True, locking=False) as file:
        node = file.get(dataset)
        if not isinstance(node, h5py.Dataset) or node.is_virtual or node.external:
            return None  # the adapter (and the server) decide what such a dataset means
        if list(node.shape) != list(structure.shape) or node.dtype != (
            structure.data_type.to_numpy_dtype()
        ):
            return None  # the file holds more (or other) than the catalog declares
        return np.asarray(node[()] if slice is ... else node[slice])


def _adapter(node: Any, source: Any) -> Any:
    from tiled.mimetypes import DEFAULT_ADAPTERS_BY_MIMETYPE

    adapter_class = DEFAULT_ADAPTERS_BY_MIMETYPE.get(source.mimetype)
    if adapter_class is None:
        return None
    metadata = getattr(node, "metadata", {}) or {}
    specs = getattr(node, "specs", []) or []
    return adapter_class.from_catalog(
        source, _Node(dict(metadata), list(specs)), **(source.parameters or {})
    )
