"""Loading ``stream_resource``/``stream_datum`` data live, exactly as tiled reads it offline.

bluesky-tiled-plugins' ``TiledWriter`` normalizes each ``stream_resource``, hands all the
resources of one data key of one stream to a single consolidator
(``bluesky_tiled_plugins.writing.consolidators``), feeds it every ``stream_datum``, and
registers the consolidator's ``DataSource``; tiled's adapter for the mimetype then reads that
array. Offline reduction reads the array's rows from tiled (``_replay``). Live reduction does
the same here, in-process: the same normalization, the same consolidator fed the same
documents, the same adapter (``consolidator.init_adapter()``), and row ``n`` of the array for
the ``n``-th index the consolidator was given. So several frames per index, ``chunk_shape``,
filename templates, file-index offsets across resources, several stream_datums and resources
per data key are all interpreted by the ecosystem's code, once, for both paths.

``root_map`` relocates stream resource URIs (see ``_resource_paths``), and every file a
consolidator derives is checked against its root before its array is read. A refusal or an
unreadable resource fails only the events that need it (the reduction records them).

The normalization TiledWriter applies before its consolidators see a stream_resource is a
private member of the plugin: it is reached through ``_tiled_writing.py``, the one module that
uses any.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import AnalysisStoreError, AssetLocationError
from ._resource_paths import check_stream_paths, map_stream_uri, stream_uri_root

__all__ = ["StreamFiller", "event_value"]

logger = logging.getLogger(__name__)


def event_value(array: Any) -> Any:
    """One row of an array as an event carries it: a 0-d row becomes a Python scalar (as
    offline replay gives it), anything else a numpy array."""
    value = np.asarray(array)
    return value.item() if value.ndim == 0 else value


@dataclass
class _Array:
    """One data key of one stream, as tiled will hold it: a consolidator and its reader."""

    consolidator: Any
    roots: list[str]
    """The roots of its resources: every file it reads must stay inside one of them (a
    multipart consolidator names the files of later resources from the first one's URI)."""
    checked_assets: int = 0
    adapter: Any = None
    broken: Exception | None = None
    """Set once a file of this array is refused: tiled would not read the array either."""

    def check_new_assets(self, what: str) -> None:
        assets = self.consolidator.assets
        check_stream_paths(
            [asset.data_uri for asset in assets[self.checked_assets :]], self.roots, what=what
        )
        self.checked_assets = len(assets)

    def read_row(self, row: int) -> Any:
        from tiled.adapters.utils import IncompatibleShapeError
        from tiled.ndslice import NDSlice

        if self.broken is not None:
            raise self.broken
        if self.adapter is None:
            self.adapter = self.consolidator.init_adapter()
        try:
            return event_value(self.adapter.read(NDSlice(row)))
        except IncompatibleShapeError:
            self.adapter = self._adapter_over_declared_frames()
            return event_value(self.adapter.read(NDSlice(row)))

    def _adapter_over_declared_frames(self) -> Any:
        """An adapter over the frames the documents declared so far, for an HDF5 file that
        already holds more (the detector wrote on while this reduction lagged behind).

        Tiled reshapes the whole file to the declared rows, which fails once the file holds
        more frames than rows times frames a row; with the file cut to the declared frames
        (the adapter's ``slice``) every row reads as it will once all rows are declared.
        """
        import collections
        import math

        from tiled.mimetypes import DEFAULT_ADAPTERS_BY_MIMETYPE
        from tiled.ndslice import NDSlice

        consolidator = self.consolidator
        parameters = consolidator.adapter_parameters()
        if consolidator.mimetype != "application/x-hdf5" or parameters.get("slice"):
            raise
        adapter_class = DEFAULT_ADAPTERS_BY_MIMETYPE[consolidator.mimetype]
        source = consolidator.get_data_source()
        uris = [asset.data_uri for asset in source.assets if asset.parameter == "data_uris"]
        stored = adapter_class.from_uris(*uris, **parameters).structure().shape
        per_frame = math.prod(stored[1:])
        declared = math.prod(source.structure.shape)
        if not per_frame or declared % per_frame:
            raise
        parameters["slice"] = NDSlice(slice(0, declared // per_frame))
        # What ``consolidator.init_adapter`` passes for the catalog node, too.
        node = collections.namedtuple("Node", ["metadata_", "specs"])({}, [])
        return adapter_class.from_catalog(source, node, **parameters)


@dataclass
class _Resource:
    data_key: str
    doc: dict[str, Any] | None
    """Normalized and mapped; None when refused."""
    root: str = ""
    error: Exception | None = None


@dataclass
class _Pending:
    """Where one event's value of one data key is: a row of an array, or why it cannot be."""

    array: _Array | None
    row: int = -1
    error: Exception | None = None


class StreamFiller:
    """Feed it a run's descriptors, stream resources and stream datums; :meth:`pop_values`
    loads an event's external values."""

    def __init__(self, root_map: Mapping[str, str] | None = None) -> None:
        self.root_map = dict(root_map or {})
        self._descriptors: dict[str, dict[str, Any]] = {}
        self._first_descriptor: dict[str, dict[str, Any]] = {}
        self._resources: dict[str, _Resource] = {}
        # One array per (stream name, data key), as TiledWriter makes one node of each.
        self._arrays: dict[tuple[str, str], _Array] = {}
        self._array_of_resource: dict[str, _Array] = {}
        # (descriptor uid, seq_num) -> {data key: where its value is}
        self._pending: dict[tuple[str, int], dict[str, _Pending]] = {}

    def descriptor(self, doc: Mapping[str, Any]) -> None:
        self._descriptors[doc["uid"]] = dict(doc)
        # TiledWriter describes a stream's arrays by the stream's first descriptor.
        self._first_descriptor.setdefault(doc["name"], dict(doc))

    def stream_resource(self, doc: Mapping[str, Any]) -> None:
        # Imported here: the writing side imports the filling side at its top.
        from ._tiled_writing import normalized_stream_resource

        what = f"stream_resource {doc.get('uid')!r}"
        try:
            resource = normalized_stream_resource(doc)
            resource["uri"], mapped_root = map_stream_uri(resource["uri"], self.root_map)
            root = stream_uri_root(resource["uri"], mapped_root)
            check_stream_paths([resource["uri"]], [root], what=what)
        except Exception as error:
            logger.warning("%s cannot be read: %s", what, error)
            self._resources[doc["uid"]] = _Resource(
                str(doc.get("data_key", "")), None, error=_as_store_error(error, what)
            )
            return
        self._resources[doc["uid"]] = _Resource(resource["data_key"], resource, root)

    def stream_datum(self, doc: Mapping[str, Any]) -> None:
        seq_nums = range(doc["seq_nums"]["start"], doc["seq_nums"]["stop"])
        try:
            array, first_row = self._consume(doc)
        except Exception as error:
            failed = _Pending(
                None, error=_as_store_error(error, f"stream_datum {doc.get('uid')!r}")
            )
            for seq_num in seq_nums:
                self._expect(doc["descriptor"], seq_num, self._data_key(doc), failed)
            return
        indices = doc["indices"]["stop"] - doc["indices"]["start"]
        if len(seq_nums) not in (0, indices):
            logger.warning(
                "stream_datum %s spans %d indices but %d events; its rows are not filled",
                doc["uid"],
                indices,
                len(seq_nums),
            )
            return
        for offset, seq_num in enumerate(seq_nums):
            where = _Pending(array, first_row + offset)
            self._expect(doc["descriptor"], seq_num, array.consolidator.data_key, where)

    def _expect(self, descriptor: str, seq_num: int, data_key: str, where: _Pending) -> None:
        self._pending.setdefault((descriptor, seq_num), {})[data_key] = where

    def pop_values(self, descriptor: str, seq_num: int) -> dict[str, Any]:
        """The event's external values, by data key (raises for a value that cannot be read)."""
        pending = self._pending.pop((descriptor, seq_num), {})
        values = {}
        for data_key, where in pending.items():
            if where.error is not None:
                raise where.error
            assert where.array is not None
            values[data_key] = where.array.read_row(where.row)
        return values

    # --- the consolidators --------------------------------------------------------------

    def _data_key(self, doc: Mapping[str, Any]) -> str:
        resource = self._resources.get(doc["stream_resource"])
        return resource.data_key if resource is not None else "?"

    def _consume(self, doc: Mapping[str, Any]) -> tuple[_Array, int]:
        """Give the stream datum to its data key's consolidator; its first row."""
        resource = self._resources.get(doc["stream_resource"])
        if resource is None:
            raise AnalysisStoreError(
                f"stream_datum {doc['uid']} refers to stream_resource "
                f"{doc['stream_resource']}, which came before it in no document"
            )
        if resource.error is not None:
            raise resource.error
        assert resource.doc is not None
        array = self._array_for(doc["stream_resource"], resource, doc["descriptor"])
        if array.broken is not None:
            raise array.broken
        patch = array.consolidator.consume_stream_datum(copy.deepcopy(dict(doc)))
        array.adapter = None  # its structure grew
        try:
            array.check_new_assets(f"stream_resource {doc['stream_resource']!r}")
        except AssetLocationError as error:
            array.broken = error
            raise
        return array, int(patch.offset[0])

    def _array_for(self, resource_uid: str, resource: _Resource, descriptor_uid: str) -> _Array:
        known = self._array_of_resource.get(resource_uid)
        if known is not None:
            return known
        from bluesky_tiled_plugins.writing.consolidators import (
            ConsolidatorBase,
            consolidator_factory,
        )

        assert resource.doc is not None
        descriptor = self._descriptors.get(descriptor_uid)
        if descriptor is None:
            raise AnalysisStoreError(f"stream_datum refers to unknown descriptor {descriptor_uid}")
        key = (descriptor["name"], resource.doc["data_key"])
        array = self._arrays.get(key)
        if array is None:
            consolidator = consolidator_factory(
                copy.deepcopy(resource.doc), self._first_descriptor[descriptor["name"]]
            )
            if not isinstance(consolidator, ConsolidatorBase):
                raise AnalysisStoreError(
                    f"stream_resource {resource_uid} ({resource.doc['mimetype']}) holds "
                    "opaque bytes, which tiled does not read as an array"
                )
            if consolidator.join_method != "stack":
                raise AnalysisStoreError(
                    f"stream_resource {resource_uid} joins its datums by "
                    f"{consolidator.join_method!r}; only 'stack' gives one row per event"
                )
            array = _Array(consolidator, [resource.root])
            self._arrays[key] = array
        else:
            # Another resource of the same data key (a new file): tiled appends its rows.
            array.consolidator.update_from_stream_resource(copy.deepcopy(resource.doc))
            array.roots.append(resource.root)
            array.adapter = None
        self._array_of_resource[resource_uid] = array
        try:
            array.check_new_assets(f"stream_resource {resource_uid!r}")
        except AssetLocationError as error:
            array.broken = error
            raise
        return array


def _as_store_error(error: Exception, what: str) -> Exception:
    if isinstance(error, AnalysisStoreError):
        return error
    wrapped = AnalysisStoreError(f"{what} cannot be read: {type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped
