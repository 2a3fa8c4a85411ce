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
import errno
import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlparse

from ._confinement import check_readable

__all__ = [
    "LocalFirstStructureClients",
    "local_first_array_client",
    "read_array",
    "read_locally",
]

# What ``from_catalog`` reads of the catalog node: its metadata and specs (as tiled's
# consolidators pass it too).
_Node = collections.namedtuple("_Node", ["metadata_", "specs"])


def read_array(
    node: Any, readable_roots: Sequence[str] | None, slice: Any = ..., *, files_here: bool = False
) -> Any:
    """The values of the tiled array ``node`` (``node[slice]``), read from its local files
    through tiled's adapter when possible, else through the catalog.

    A file outside ``readable_roots`` is refused (:class:`AssetLocationError`), as the
    server refuses it: the catalog's records are not trusted to name only the store's files.
    ``files_here`` says the server is on this machine (an embedded store's): a file it does
    not find is missing (FileNotFoundError, naming it), not one on another machine.
    """
    values = read_locally(node, readable_roots, slice, files_here=files_here)
    if values is not None:
        return values
    return node.read() if slice is ... else node[slice]


def read_locally(
    node: Any, readable_roots: Sequence[str] | None, slice: Any = ..., *, files_here: bool = False
) -> Any:
    """``node[slice]`` read from its local files in this process, or None where that cannot
    be done (the caller then reads through the catalog); ``files_here`` as for
    :func:`read_array`."""
    source = _local_source(node, readable_roots, files_here)
    if source is None:
        return None
    import numpy as np

    direct = _read_hdf5_dataset(source, slice)
    if direct is not None:
        return direct
    adapter = _adapter(node, source)
    if adapter is None:
        return None
    from tiled.ndslice import NDSlice

    if slice is ...:
        return np.asarray(adapter.read())
    return np.asarray(adapter.read(NDSlice(*(slice if isinstance(slice, tuple) else (slice,)))))


@functools.cache
def local_first_array_client(readable_roots: tuple[str, ...], files_here: bool) -> type:
    """tiled's array client, reading the arrays whose files are local and inside
    ``readable_roots`` in this process (``array.read()``, ``array[...]``,
    ``numpy.asarray(array)``), and every other one through the catalog, as it does;
    ``files_here`` as for :func:`read_array`."""
    from tiled.client.array import ArrayClient

    from ._dask_reads import local_dask_reads

    class LocalFirstArrayClient(ArrayClient):
        def read(self, slice: Any = None) -> Any:
            part = ... if slice is None else slice
            with local_dask_reads():  # also with a distributed.Client open in this process
                values = read_locally(self, readable_roots, part, files_here=files_here)
                return super().read(slice) if values is None else values

    return LocalFirstArrayClient


class LocalFirstStructureClients(Mapping[str, Any]):
    """tiled's client classes (those of bluesky-tiled-plugins' specs included), with
    :func:`local_first_array_client` for arrays."""

    def __init__(self, readable_roots: Sequence[str], *, files_here: bool = False) -> None:
        from tiled.client.container import DEFAULT_STRUCTURE_CLIENT_DISPATCH

        self._classes = DEFAULT_STRUCTURE_CLIENT_DISPATCH["numpy"]
        self._array_client = local_first_array_client(tuple(readable_roots), files_here)

    def __getitem__(self, name: str) -> Any:
        if name == "array":
            return self._array_client
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)


def _local_source(node: Any, readable_roots: Sequence[str] | None, files_here: bool) -> Any:
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
        if path is None:
            return None
        if not os.path.exists(path):
            if not files_here:
                return None  # on the server's machine, not this one
            check_readable(path, readable_roots, what=f"array {node.item['id']!r}")
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
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
