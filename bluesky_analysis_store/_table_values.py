"""Tables and variable-length arrays as derived values, and their event-model data keys.

A **table** is a pandas ``DataFrame``, or a mapping of equal-length 1-D columns (made a
DataFrame here), as DBEP 6's first prototype saved interpolated spectra (``energy``,
``i0``, ``it``, ``mu``). A **variable-length** value (a ragged one) is a 1-D array whose
length changes from event to event: a peak list, an ROI list.

Both are written to files, one file per event (``formats.parquet``), and described by one
data key per stream: ``shape`` is ``[None]`` (rows vary), ``dtype_numpy`` the numpy dtype of
a row (a list of ``[column, dtype]`` for a table, one dtype for a variable-length array).
String columns are ``"|O8"``: numpy has no dtype for strings of any length.

The store keeps one tiled table per stream and key, the events' rows one after the other
with the event's ``seq_num`` beside them (see ``formats.parquet`` for the column names).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._data_keys import check_data_key, conform_value, describe_value, normalise_value
from ._errors import DataKeyError, DataValueError
from .formats.parquet import SEQ_NUM_COLUMN, STRING_DTYPE

__all__ = [
    "STRING_DTYPE",
    "TABLE_INDEX_COLUMN",
    "column_dtypes",
    "conform_ragged",
    "conform_table",
    "describe_event_value",
    "describe_ragged",
    "describe_table",
    "is_ragged_key",
    "is_table_key",
    "is_table_like",
    "normalise_event_value",
    "normalise_ragged",
    "normalise_table",
]

# The column the store adds to a table, giving each row its event.
TABLE_INDEX_COLUMN = SEQ_NUM_COLUMN
# numpy dtype kinds a table column or a variable-length array may have: Parquet keeps them.
_COLUMN_KINDS = "biufM"


def is_table_like(value: Any) -> bool:
    """A DataFrame, or a mapping (of columns): what :func:`normalise_table` takes."""
    return _is_dataframe(value) or isinstance(value, Mapping)


def _is_dataframe(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "pandas" and hasattr(value, "columns")


def normalise_table(key: str, value: Any) -> Any:
    """``value`` as a DataFrame the store gives back equal, or :class:`DataValueError`.

    Columns must be named like data keys (``seq_num`` is the store's), hold booleans,
    integers, floats, times or strings, and a DataFrame's index must be the default one
    (``reset_index()`` keeps another as a column).
    """
    import pandas as pd

    if isinstance(value, Mapping) and not _is_dataframe(value):
        columns = {}
        for name, column in value.items():
            array = np.asarray(column)
            if array.ndim != 1:
                raise DataValueError(
                    f"column {name!r} of table {key!r} has shape {array.shape}: the columns "
                    "of a table are 1-D"
                )
            columns[name] = array
        lengths = {len(c) for c in columns.values()}
        if len(lengths) > 1:
            raise DataValueError(
                f"the columns of table {key!r} have different lengths {sorted(lengths)}"
            )
        value = pd.DataFrame(columns)
    if not isinstance(value.index, pd.RangeIndex) or value.index.start != 0:
        raise DataValueError(
            f"table {key!r} has an index of its own ({type(value.index).__name__}), which "
            "would be lost: call reset_index() to keep it as a column"
        )
    if isinstance(value.columns, pd.MultiIndex):
        raise DataValueError(f"table {key!r} has hierarchical columns; flatten their names")
    if len(value.columns) == 0:
        raise DataValueError(f"table {key!r} has no columns")
    names = list(value.columns)
    if len(set(names)) != len(names):
        raise DataValueError(f"table {key!r} has two columns of one name")
    for name in names:
        try:
            check_data_key(name)
        except DataKeyError as error:
            raise DataValueError(f"table {key!r}: column {error}") from None
        if name == TABLE_INDEX_COLUMN:
            raise DataValueError(
                f"table {key!r} has a column {name!r}, which the store adds to give each row "
                "its event; rename it"
            )
        _column_dtype(key, name, value[name])
    return value.reset_index(drop=True)


def _column_dtype(key: str, name: str, column: Any) -> str:
    import pandas as pd

    dtype = column.dtype
    if pd.api.types.is_string_dtype(dtype):
        strings = column.dropna()
        if len(strings) != len(column) or not all(isinstance(s, str) for s in strings):
            raise DataValueError(
                f"column {name!r} of table {key!r} mixes strings with other values or "
                "missing ones; give one type per column"
            )
        return STRING_DTYPE
    if not isinstance(dtype, np.dtype) or dtype.kind not in _COLUMN_KINDS:
        raise DataValueError(
            f"column {name!r} of table {key!r} has dtype {dtype}; give booleans, integers, "
            "floats, numpy times or strings"
        )
    if dtype.kind == "f" and dtype.itemsize < 4:
        raise DataValueError(f"column {name!r} of table {key!r} is {dtype}, which is not kept")
    if dtype.kind == "M" and np.datetime_data(dtype)[0] == "generic":
        raise DataValueError(f"column {name!r} of table {key!r} has no time unit")
    return np.dtype(dtype).newbyteorder("=").str


def column_dtypes(key: str, table: Any) -> list[list[str]]:
    """``[[column, dtype], ...]`` of a normalised table, in column order."""
    return [[name, _column_dtype(key, name, table[name])] for name in table.columns]


def describe_table(key: str, table: Any, *, source: str = "analysis") -> dict[str, Any]:
    """The data key of a normalised table: a row dtype, a variable number of rows."""
    return {
        "source": source,
        "dtype": "array",
        "shape": [None],
        "dtype_numpy": column_dtypes(key, table),
    }


def normalise_ragged(key: str, value: Any) -> np.ndarray:
    """A 1-D array of any length (even none), of a dtype Parquet keeps."""
    array = np.asarray(value)
    if array.ndim != 1:
        raise DataValueError(
            f"{key!r} is a variable-length array, so each value must be 1-D, not of shape "
            f"{array.shape}; give a table for rows of several values"
        )
    if array.dtype.kind not in _COLUMN_KINDS or (
        array.dtype.kind == "f" and array.dtype.itemsize < 4
    ):
        raise DataValueError(
            f"{key!r} is a variable-length array of dtype {array.dtype}; give booleans, "
            "integers, float32/64 or numpy times"
        )
    if array.dtype.kind == "M" and np.datetime_data(array.dtype)[0] == "generic":
        raise DataValueError(f"{key!r} has dtype {array.dtype} without a time unit")
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def describe_ragged(value: np.ndarray, *, source: str = "analysis") -> dict[str, Any]:
    return {"source": source, "dtype": "array", "shape": [None], "dtype_numpy": value.dtype.str}


def is_table_key(data_key: Mapping[str, Any]) -> bool:
    """Whether a data key describes a table (a row dtype of named columns)."""
    return isinstance(data_key.get("dtype_numpy"), list)


def is_ragged_key(data_key: Mapping[str, Any]) -> bool:
    """Whether a data key describes variable-length arrays (not a table)."""
    return list(data_key.get("shape") or ()) == [None] and not is_table_key(data_key)


def normalise_event_value(key: str, value: Any) -> Any:
    """A derived value as the composer keeps it: a table as a DataFrame
    (:func:`normalise_table`), anything else through :func:`normalise_value`."""
    if is_table_like(value):
        return normalise_table(key, value)
    return normalise_value(key, value)


def describe_event_value(key: str, value: Any) -> dict[str, Any]:
    """The data key of a normalised value (a table's, or :func:`describe_value`'s)."""
    if _is_dataframe(value):
        return describe_table(key, value)
    return describe_value(value)


def conform_table(key: str, table: Any, declared: Mapping[str, Any]) -> Any:
    """``table`` with the columns and dtypes its stream declared, or refused if it has other
    columns, or a dtype that the declared one would not keep exactly."""
    declared_columns = [list(c) for c in declared["dtype_numpy"]]
    names = [name for name, _ in declared_columns]
    if list(table.columns) != names:
        raise DataValueError(
            f"table {key!r} was declared with the columns {names} for its stream; this one "
            f"has {list(table.columns)}"
        )
    given = column_dtypes(key, table)
    if given == declared_columns:
        return table
    table = table.copy()
    for (name, dtype), (_, given_dtype) in zip(declared_columns, given, strict=True):
        if dtype == given_dtype:
            continue
        if STRING_DTYPE in (dtype, given_dtype):
            raise DataValueError(
                f"column {name!r} of table {key!r} was declared {dtype}, this one is {given_dtype}"
            )
        table[name] = conform_value(f"{key}.{name}", table[name].to_numpy(), {"dtype_numpy": dtype})
    return table


def conform_ragged(key: str, value: np.ndarray, declared: Mapping[str, Any]) -> np.ndarray:
    """A variable-length value in its stream's dtype (refused unless kept exactly)."""
    value = normalise_ragged(key, value)
    return np.asarray(conform_value(key, value, declared))


def widen_table_key(key: str, known: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The data key of a table key admitting ``known``'s tables and ``new``'s: the same
    columns, each numeric column in a dtype holding both (as inline numbers widen; each
    value must then be kept exactly, see :func:`conform_table`)."""
    columns = []
    for (name, old), (_, given) in zip(known["dtype_numpy"], new["dtype_numpy"], strict=True):
        if old == given:
            columns.append([name, old])
        elif STRING_DTYPE in (old, given) or "M" in (np.dtype(old).kind, np.dtype(given).kind):
            raise DataValueError(
                f"column {name!r} of table {key!r} changes its type within a stream: "
                f"{old} then {given}"
            )
        else:
            columns.append([name, np.result_type(np.dtype(old), np.dtype(given)).str])
    return {**known, "dtype_numpy": columns}
