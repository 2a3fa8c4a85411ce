"""Parquet tables: one file per event in a folder per run, stream and data key.

The values are tables (DataFrames) or variable-length 1-D arrays (``_table_values``). Each
event's value is one Parquet file, ``<folder>/<index:06d>.parquet``, written whole or not
at all (``_safe_writing``): Parquet files cannot be appended to, and a file per event keeps
each event durable as soon as its call returns. tiled reads the folder as one table whose
partitions are the files (its ``ParquetDatasetAdapter``); a handler reads one file.

In the files, every column is named ``<data key>.<column>`` and one more,
``<data key>.seq_num``, holds the event's ``seq_num`` on each of its rows (a
variable-length array is the column ``<data key>.value``). tiled joins the tables of a
stream into one namespace of columns (its composite nodes), where the plain names of two
tables, or of a table and the stream's own keys, would clash; data keys hold no ``.``. The
handler gives the columns back under their own names, without ``seq_num``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from .._confinement import check_handler_path
from .._errors import DataValueError
from ._base import FileFormat
from ._paths import existing, frame_index
from ._safe_writing import remove_frame_files, write_frame_file

__all__ = [
    "PARQUET_FORMAT",
    "ParquetTableHandler",
    "ParquetTableWriter",
    "arrow_schema",
    "to_dataframe",
]

RAGGED_COLUMN = "value"
SEQ_NUM_COLUMN = "seq_num"
# The dtype a string column is described with: numpy has none for strings of any length,
# and event-model's pattern wants an item size.
STRING_DTYPE = "|O8"


def _frame_name(index: int) -> str:
    return f"{index:06d}.parquet"


def arrow_schema(key: str, columns: Sequence[Sequence[str]]) -> Any:
    """The arrow schema of the files of ``key`` (the one tiled is told too)."""
    import pyarrow as pa

    fields = [pa.field(f"{key}.{SEQ_NUM_COLUMN}", pa.int64(), nullable=False)]
    for name, dtype in columns:
        if dtype == STRING_DTYPE:
            kind = pa.string()
        else:
            kind = pa.from_numpy_dtype(np.dtype(dtype))
        fields.append(pa.field(f"{key}.{name}", kind))
    return pa.schema(fields)


def _check_target(folder: str) -> None:
    if os.path.lexists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise existing(folder, "the Parquet folder")


class ParquetTableWriter:
    """Writes each event's table (or variable-length array) as the next Parquet file.

    ``key`` and ``columns`` (``[[name, dtype], ...]``) come from the data key; ``ragged``
    says the values are 1-D arrays, stored as the one column ``value``.
    """

    def __init__(
        self, path: str, key: str, columns: Sequence[Sequence[str]], ragged: bool = False
    ) -> None:
        _check_target(path)
        self._folder = path
        self._key = key
        self._columns = [list(c) for c in columns]
        self._ragged = ragged
        self._schema = arrow_schema(key, self._columns)
        self._index = 0
        try:
            os.makedirs(path, exist_ok=True)
        except FileExistsError as error:
            raise existing(path, "the Parquet folder") from error

    def __call__(self, value: Any) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        index = self._index
        arrays = self._arrays(value)
        rows = len(arrays[0]) if arrays else 0
        # The event's seq_num: the composer writes a table key once per event, in order.
        seq_nums = np.full(rows, index + 1, dtype=np.int64)
        try:
            table = pa.Table.from_arrays(
                [pa.array(seq_nums), *(pa.array(a) for a in arrays)], schema=self._schema
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise DataValueError(
                f"{self._key!r} does not fit the columns it was declared with "
                f"{self._columns}: {error}"
            ) from error
        path = os.path.join(self._folder, _frame_name(index))
        write_frame_file(path, table.nbytes, lambda file: pq.write_table(table, file))
        self._index = index + 1
        return {"index": index}

    def _arrays(self, value: Any) -> list[Any]:
        if self._ragged:
            return [np.asarray(value)]
        names = [name for name, _ in self._columns]
        if list(value.columns) != names:
            raise DataValueError(
                f"table {self._key!r} has columns {list(value.columns)}, declared {names}"
            )
        return [_column_values(value[name], dtype) for name, dtype in self._columns]

    def rewind(self, index: int) -> None:
        """Forget the frames from ``index`` on: their files are removed."""
        if not 0 <= index <= self._index:
            raise ValueError(f"cannot rewind to frame {index}: {self._index} frames written")
        remove_frame_files(
            [os.path.join(self._folder, _frame_name(n)) for n in range(index, self._index)]
        )
        self._index = index

    def close(self) -> None:
        pass


def _column_values(column: Any, dtype: str) -> Any:
    if dtype == STRING_DTYPE:
        return column.tolist()
    return column.to_numpy(dtype=np.dtype(dtype))


def to_dataframe(table: Any) -> Any:
    """An Arrow table as pandas makes its own: strings in pandas' default string dtype
    (Arrow's conversion makes another, with a different missing value)."""
    import pyarrow as pa

    frame = table.to_pandas()
    for field in table.schema:
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            frame[field.name] = frame[field.name].astype("str")
    return frame


class ParquetTableHandler:
    """Reads the table (or variable-length array) of event frame ``index``."""

    roots: ClassVar[tuple[str, ...] | None] = None
    """The only folders this handler may read (``None``: any, below its resource's root)."""

    def __init__(
        self, path: str, key: str, columns: Sequence[Sequence[str]], ragged: bool = False
    ) -> None:
        self._folder = check_handler_path(path, self.roots)
        self._key = key
        self._names = [name for name, _ in columns]
        self._ragged = ragged

    def __call__(self, index: int) -> Any:
        import pyarrow.parquet as pq

        path = check_handler_path(
            os.path.join(self._folder, _frame_name(frame_index(index))), self.roots
        )
        table = to_dataframe(pq.read_table(path))
        if self._ragged:
            return table[f"{self._key}.{RAGGED_COLUMN}"].to_numpy()
        table = table[[f"{self._key}.{name}" for name in self._names]]
        table.columns = self._names
        return table


class _ParquetFormat(FileFormat):
    def check_target(self, full_path: str, resource_kwargs: Mapping[str, Any]) -> None:
        _check_target(full_path)

    def key_resource_kwargs(self, data_key: str, described: Mapping[str, Any]) -> dict[str, Any]:
        dtype = described.get("dtype_numpy")
        if isinstance(dtype, list):
            return {"key": data_key, "columns": [list(c) for c in dtype], "ragged": False}
        return {"key": data_key, "columns": [[RAGGED_COLUMN, dtype]], "ragged": True}

    def stream_parameters(
        self, resource_kwargs: Mapping[str, Any], frame_shape: tuple[Any, ...]
    ) -> dict[str, Any]:
        return dict(resource_kwargs)


PARQUET_FORMAT = _ParquetFormat(
    name="PARQUET",
    spec="BAS_PARQUET_TABLE",
    writer=ParquetTableWriter,
    handler=ParquetTableHandler,
    mimetype="application/x-parquet",
    suffix="/",
)
"""Tables and variable-length arrays; every table key and variable-length key uses it."""
