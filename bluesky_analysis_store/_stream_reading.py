"""One event stream of a saved run, its contents listed once and its columns read together.

Through tiled's composite client (the layout bluesky-tiled-plugins' TiledWriter writes) every
``key in stream`` and ``stream[key]`` asks the server for the stream's whole contents again,
twice, before the key's own request: reading four keys one by one took some sixteen
requests. Here the contents are asked for once, the scalar columns (one table) are read in
one request, and each array key in one more.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["NOT_DATA_KEYS", "StreamReader", "read_table_columns"]

# Columns every stream has that are not data keys of its descriptor.
NOT_DATA_KEYS = frozenset({"seq_num", "time"})


class StreamReader:
    """One stream of a run: its keys, their descriptions and their values, every event."""

    def __init__(self, node: Any, name: str) -> None:
        self.name = name
        self._node = node
        self.described: Mapping[str, Any] = (node.metadata or {}).get("data_keys") or {}
        self._table_of: dict[str, str] = {}  # scalar column -> the table holding it
        self._arrays: dict[str, Mapping[str, Any]] = {}  # array key -> its structure
        self._read: dict[str, np.ndarray] = {}
        get_contents = getattr(node, "get_contents", None)
        self._composite = callable(get_contents)  # a composite stream, as TiledWriter writes
        self._table_items: dict[str, Mapping[str, Any]] = {}
        if self._composite:
            for item_id, item in get_contents().items():
                attributes = item["attributes"]
                if attributes["structure_family"] == "table":
                    self._table_items[item_id] = item
                    for column in attributes["structure"]["columns"]:
                        self._table_of[column] = item_id
                else:
                    self._arrays[item_id] = attributes.get("structure") or {}
        else:  # another layout: each key is read through the node itself
            self._arrays = {key: {} for key in node}

    def keys(self) -> list[str]:
        """The stream's data keys, without its event numbers, times and timestamps."""
        names = [*self._table_of, *self._arrays]
        present = set(names)
        return [
            k
            for k in names
            if k not in NOT_DATA_KEYS and not (k.startswith("ts_") and k[3:] in present)
        ]

    def __contains__(self, key: str) -> bool:
        return key in self._table_of or key in self._arrays

    def has_data_key(self, key: str) -> bool:
        return key in self and key not in NOT_DATA_KEYS

    def data_key(self, key: str) -> Mapping[str, Any]:
        """The descriptor's description of ``key`` (units, shape, dtype), or nothing."""
        return self.described.get(key) or {}

    def label(self, key: str) -> str:
        units = self.data_key(key).get("units")
        return f"{key} ({units})" if units else key

    def event_shape(self, key: str) -> tuple[int, ...]:
        """The shape of one event's value of ``key``."""
        if key in self._table_of:
            return ()
        shape = self._arrays[key].get("shape")
        if shape is None:  # not listed with the contents: ask the array itself
            shape = self._node[key].shape
        return tuple(int(n) for n in shape[1:])

    def array(self, key: str) -> Any:
        """The array client of an array key, for reading one event of it."""
        from tiled.client.container import Container

        if self._composite:  # the key is a part of the composite: no lookup of the contents
            return Container.__getitem__(self._node.base, key)
        return self._node[key]

    def columns(self, *keys: str) -> list[np.ndarray]:
        """The values of each key, every event; the scalar columns of a table in one read.
        A key the stream does not have raises KeyError, naming the keys it has."""
        missing = [k for k in keys if k not in self]
        if missing:
            raise KeyError(
                f"stream {self.name!r} has no key {missing[0]!r}; it has {sorted(self.keys())}"
            )
        wanted = [k for k in dict.fromkeys(keys) if k not in self._read]
        by_table: dict[str, list[str]] = {}
        for key in wanted:
            if key in self._table_of:
                by_table.setdefault(self._table_of[key], []).append(key)
            else:
                self._read[key] = np.asarray(self.array(key).read())
        for table_id, table_keys in by_table.items():
            if self._table_of.get("seq_num") == table_id and "seq_num" not in table_keys:
                table_keys.append("seq_num")  # every plot numbers its events: read it now
            read = read_table_columns(self._node.context, self._table_items[table_id], table_keys)
            self._read.update(read)
        return [self._read[k] for k in keys]

    def seq_nums(self, count: int) -> np.ndarray:
        """The stream's event numbers, as saved (1..N only when the stream has none)."""
        if "seq_num" in self:
            (seq_nums,) = self.columns("seq_num")
            if len(seq_nums) >= count:
                return seq_nums
        return np.arange(1, count + 1)


def read_table_columns(
    context: Any, item: Mapping[str, Any], columns: list[str]
) -> dict[str, np.ndarray]:
    """Columns of a table node, read partition by partition as Arrow, with pyarrow.

    tiled's DataFrameClient does the same through a dask dataframe; importing its module
    (dask.dataframe, pandas) takes a second, most of a plot's time on the command line."""
    import pyarrow as pa
    import pyarrow.ipc

    url = item["links"]["partition"]
    partitions = int(item["attributes"]["structure"].get("npartitions") or 1)
    tables = []
    for partition in range(partitions):
        response = context.http_client.get(
            url,
            headers={"Accept": "application/vnd.apache.arrow.file"},
            params={"partition": partition, "column": columns},
        )
        response.raise_for_status()
        tables.append(pyarrow.ipc.open_file(pa.BufferReader(response.content)).read_all())
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return {column: _column_values(table.column(column)) for column in columns}


def _column_values(column: Any) -> np.ndarray:
    """A table column (Arrow) as numpy values: string columns become numpy strings."""
    values = np.asarray(column.to_numpy(zero_copy_only=False))
    if values.dtype.kind == "O" and len(values) and isinstance(values[0], (str, bytes)):
        return values.astype(str if isinstance(values[0], str) else bytes)
    return values
