"""One event stream of a saved run, its contents listed once and its columns read together.

Through tiled's composite client (the layout bluesky-tiled-plugins' TiledWriter writes) every
``key in stream`` and ``stream[key]`` asks the server for the stream's whole contents again,
twice, before the key's own request: reading four keys one by one took some sixteen
requests. Here the contents are asked for once, the scalar columns (one table) are read in
one request, and each array key in one more.

A table-valued key (a table node of its own, ``_table_values``) is read as one DataFrame of
every event's rows, with their ``seq_num``; a variable-length key as a list of arrays, one
per event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._errors import AnalysisStoreError

__all__ = [
    "NOT_DATA_KEYS",
    "StreamReader",
    "read_arrow_table",
    "read_table_columns",
    "read_value_table",
]

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
        # Table-valued and variable-length keys: a table node each, named by the key.
        self._value_tables: dict[str, Mapping[str, Any]] = {}
        if self._composite:
            from ._replay import is_stream_table

            for item_id, item in get_contents().items():
                attributes = item["attributes"]
                if attributes["structure_family"] == "table" and not is_stream_table(item_id):
                    self._value_tables[item_id] = item
                elif attributes["structure_family"] == "table":
                    self._table_items[item_id] = item
                    for column in attributes["structure"]["columns"]:
                        self._table_of[column] = item_id
                else:
                    self._arrays[item_id] = attributes.get("structure") or {}
        else:  # another layout: each key is read through the node itself
            self._arrays = {key: {} for key in node}

    def keys(self) -> list[str]:
        """The stream's data keys, without its event numbers, times and timestamps."""
        names = [*self._table_of, *self._arrays, *self._value_tables]
        present = set(names)
        return [
            k
            for k in names
            if k not in NOT_DATA_KEYS and not (k.startswith("ts_") and k[3:] in present)
        ]

    def __contains__(self, key: str) -> bool:
        return key in self._table_of or key in self._arrays or key in self._value_tables

    def is_value_table(self, key: str) -> bool:
        """Whether ``key`` holds tables or variable-length arrays (not one value a row)."""
        return key in self._value_tables

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
        if key in self._value_tables:
            raise ValueError(f"{key!r} holds tables or variable-length arrays, of no one shape")
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
            elif key in self._value_tables:
                self._read[key] = self._read_value_table(key)
            else:
                self._read[key] = np.asarray(self.array(key).read())
        for table_id, table_keys in by_table.items():
            if self._table_of.get("seq_num") == table_id and "seq_num" not in table_keys:
                table_keys.append("seq_num")  # every plot numbers its events: read it now
            read = read_table_columns(self._node.context, self._table_items[table_id], table_keys)
            self._read.update(read)
        return [self._read[k] for k in keys]

    def _read_value_table(self, key: str) -> Any:
        from .formats.parquet import RAGGED_COLUMN, SEQ_NUM_COLUMN

        table = read_value_table(self._node.context, self._value_tables[key], key)
        if isinstance(self.data_key(key).get("dtype_numpy"), list):
            return table
        # Variable-length: the rows of each event, in event order (none for an empty one).
        order = np.argsort(table[SEQ_NUM_COLUMN].to_numpy(), kind="stable")  # as written
        seq_nums = table[SEQ_NUM_COLUMN].to_numpy()[order]
        values = table[RAGGED_COLUMN].to_numpy()[order]
        events = self.seq_nums(0) if "seq_num" in self._table_of else np.unique(seq_nums)
        starts = np.searchsorted(seq_nums, events, side="left")
        stops = np.searchsorted(seq_nums, events, side="right")
        return [values[a:b] for a, b in zip(starts, stops, strict=True)]

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
    table = read_arrow_table(context, item, columns)
    return {column: _column_values(table.column(column)) for column in columns}


def read_value_table(context: Any, item: Mapping[str, Any], key: str) -> Any:
    """The table node of a table-valued or variable-length ``key``, every event's rows, as
    a DataFrame with the plain column names (``KEY.`` dropped) and ``seq_num``; refused if
    it has no ``seq_num`` column (the catalog's word is not taken for what it holds)."""
    from .formats.parquet import SEQ_NUM_COLUMN, to_dataframe

    table = to_dataframe(read_arrow_table(context, item, None))
    prefix = f"{key}."
    table.columns = [c[len(prefix) :] if c.startswith(prefix) else c for c in table.columns]
    if SEQ_NUM_COLUMN not in table.columns:
        raise AnalysisStoreError(
            f"the table of {key!r} has no {key}.{SEQ_NUM_COLUMN} column giving its rows their "
            "events: it was not written by this package"
        )
    return table.reset_index(drop=True)


def read_arrow_table(context: Any, item: Mapping[str, Any], columns: list[str] | None) -> Any:
    """A table node's ``columns`` (all of them for None), every partition, as Arrow."""
    import pyarrow as pa
    import pyarrow.ipc

    params = {} if columns is None else {"column": columns}
    partitions = int(item["attributes"]["structure"].get("npartitions") or 1)
    if partitions > 1 and "full" in item["links"]:  # a table of many files: one request
        response = context.http_client.get(
            item["links"]["full"],
            headers={"Accept": "application/vnd.apache.arrow.file"},
            params=params,
        )
        response.raise_for_status()
        return pyarrow.ipc.open_file(pa.BufferReader(response.content)).read_all()
    url = item["links"]["partition"]
    tables = []
    for partition in range(partitions):
        response = context.http_client.get(
            url,
            headers={"Accept": "application/vnd.apache.arrow.file"},
            params={"partition": partition, **params},
        )
        response.raise_for_status()
        tables.append(pyarrow.ipc.open_file(pa.BufferReader(response.content)).read_all())
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _column_values(column: Any) -> np.ndarray:
    """A table column (Arrow) as numpy values: string columns become numpy strings."""
    values = np.asarray(column.to_numpy(zero_copy_only=False))
    if values.dtype.kind == "O" and len(values) and isinstance(values[0], (str, bytes)):
        return values.astype(str if isinstance(values[0], str) else bytes)
    return values
