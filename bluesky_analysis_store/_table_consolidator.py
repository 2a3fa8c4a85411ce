"""How tiled is told about the Parquet files of a table key: a TiledWriter consolidator.

bluesky-tiled-plugins turns each ``stream_resource`` into a tiled node through the
consolidator registered for its mimetype (``CONSOLIDATOR_REGISTRY``, its extension point for
formats it does not know); its consolidators all make arrays. This one makes a table:
every ``stream_datum`` adds its events' files as partitions, which tiled's own
``ParquetDatasetAdapter`` reads (the mimetype is tiled's ``application/x-parquet``).
"""

from __future__ import annotations

from typing import Any

from bluesky_tiled_plugins.writing.consolidators import CONSOLIDATOR_REGISTRY, ConsolidatorBase
from tiled.structures.core import StructureFamily
from tiled.structures.data_source import Asset, DataSource, Management
from tiled.structures.table import TableStructure

from .formats.parquet import PARQUET_FORMAT, arrow_schema

__all__ = ["ParquetTableConsolidator", "register"]


class ParquetTableConsolidator(ConsolidatorBase):
    """The partitions of one table key of one stream: one Parquet file per event."""

    supported_mimetypes = {PARQUET_FORMAT.mimetype}

    def __init__(self, stream_resource: dict[str, Any], descriptor: dict[str, Any]) -> None:
        # ConsolidatorBase's own __init__ works out an array's shape and dtype, which a
        # table (a variable number of rows) has not; what it sets and the writer reads is
        # set here.
        self.mimetype = self.get_supported_mimetype(stream_resource)
        self.data_key = stream_resource["data_key"]
        self.uri = stream_resource["uri"]
        parameters = stream_resource["parameters"]
        self._sres_parameters = parameters
        self._schema = arrow_schema(parameters["key"], parameters["columns"])
        self.assets: list[Asset] = []
        self.metadata: dict[str, Any] = {}
        self._seqnums_to_indices_map: dict[int, int] = {}

    def consume_stream_datum(self, doc: dict[str, Any]) -> None:
        folder = self.uri if self.uri.endswith("/") else self.uri + "/"
        indices = range(doc["indices"]["start"], doc["indices"]["stop"])
        seq_nums = range(doc["seq_nums"]["start"], doc["seq_nums"]["stop"])
        self._seqnums_to_indices_map.update(zip(seq_nums, indices, strict=False))
        for index in indices:
            self.assets.append(
                Asset(
                    data_uri=f"{folder}{index:06d}.parquet",
                    is_directory=False,
                    parameter="data_uris",
                    num=len(self.assets),
                )
            )
        return None  # a table has no array shape to patch

    def get_data_source(self) -> DataSource:
        return DataSource(
            mimetype=self.mimetype,
            assets=list(self.assets),
            structure_family=StructureFamily.table,
            # A node is made before its first partition is added (then at once updated).
            structure=TableStructure.from_schema(
                self._schema, npartitions=max(1, len(self.assets))
            ),
            parameters={},
            management=Management.external,
        )


def register() -> None:
    """Make TiledWriter use :class:`ParquetTableConsolidator` for the package's tables."""
    CONSOLIDATOR_REGISTRY[PARQUET_FORMAT.mimetype] = ParquetTableConsolidator
