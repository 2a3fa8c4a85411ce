"""Checking derived values and describing them as event-model data keys."""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ._errors import DataKeyError, DataValueError

__all__ = [
    "RESERVED_KEYS",
    "check_data_key",
    "check_stream_keys",
    "describe_value",
    "merge_data_key",
    "normalise_value",
]

# event-model's schema pattern for data keys: no '.' and no '/'.
_DATA_KEY_PATTERN = re.compile(r"^[^./]+$")
# Keys become SQL column names in the tables tiled stores events in (tiled.adapters.sql):
# a letter first, none of these characters, at most 63 bytes including TiledWriter's "ts_".
_COLUMN_START = re.compile(r"^[A-Za-z]")
_FORBIDDEN_IN_COLUMNS = re.compile(r"""['"`;\\%()=+]|--|/\*|\*/""")
_MAX_KEY_BYTES = 63 - len("ts_")
# Column names of the tables that tiled stores events in.
RESERVED_KEYS = frozenset({"time", "seq_num"})


def check_data_key(key: Any) -> str:
    if not isinstance(key, str) or not _DATA_KEY_PATTERN.match(key):
        raise DataKeyError(
            f"data key {key!r} is not allowed: a data key is a non-empty string without '/' or '.'"
        )
    if key in RESERVED_KEYS:
        raise DataKeyError(f"data key {key!r} is reserved (the store's tables use it); rename it")
    if not _COLUMN_START.match(key) or _FORBIDDEN_IN_COLUMNS.search(key):
        raise DataKeyError(
            f"data key {key!r} cannot name a column of the store's tables: start it with a "
            "letter and leave out quotes, ';', '\\', '%', '(', ')', '=', '+', '--', '/*'"
        )
    if len(key.encode()) > _MAX_KEY_BYTES:
        raise DataKeyError(f"data key {key!r} is longer than {_MAX_KEY_BYTES} bytes")
    return key


def check_stream_keys(stream: str, keys: Iterable[str]) -> None:
    """Refuse keys of one stream whose columns would clash in the store's tables.

    Columns are compared lower-cased, and TiledWriter adds a ``ts_<key>`` column per key.
    """
    keys = list(keys)
    columns: dict[str, str] = {}
    for key in keys:
        for column in (key, f"ts_{key}"):
            taken = columns.setdefault(column.lower(), key)
            if taken != key:
                raise DataKeyError(
                    f"data keys {taken!r} and {key!r} of stream {stream!r} clash in the "
                    "store's tables (column names ignore case, and each key has a ts_ column)"
                )


def normalise_value(key: str, value: Any) -> Any:
    """A plain Python scalar, a string, or a numpy array; anything else is refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.generic):
        value = np.asarray(value)
    try:
        array = np.asarray(value)
    except Exception as error:  # ragged nested lists and the like
        raise DataValueError(f"value of {key!r} cannot be made an array: {error}") from error
    if array.dtype.kind == "O":
        raise DataValueError(
            f"value of {key!r} has dtype object ({type(value).__name__}); give numbers, "
            "strings or numeric arrays"
        )
    if array.ndim == 0:
        return array.item()
    return array


def _dtype_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array"


def describe_value(value: Any, *, source: str = "analysis") -> dict[str, Any]:
    """The event-model data key of an already normalised value."""
    if isinstance(value, np.ndarray):
        shape = list(value.shape)
        dtype_numpy = value.dtype.str
    else:
        shape = []
        dtype_numpy = np.asarray(value).dtype.str
    return {
        "source": source,
        "dtype": _dtype_name(value),
        "shape": shape,
        "dtype_numpy": dtype_numpy,
    }


def merge_data_key(
    key: str, known: Mapping[str, Any], new: Mapping[str, Any], *, to_file: bool
) -> dict[str, Any]:
    """Widen ``known`` to admit ``new``, or refuse when the change cannot be stored.

    Values written to files keep one shape and dtype per stream: each file format stores
    frames of one kind and tiled reads them as one array. Inline values keep one shape too
    (the catalog's tables hold no variable-length arrays), but numbers may widen (int to
    float) and strings may grow.
    """
    if known["shape"] == new["shape"] and known["dtype_numpy"] == new["dtype_numpy"]:
        return dict(known)
    if to_file:
        raise DataValueError(
            f"{key!r} is written to files, so each of its values must have the same shape "
            f"and dtype: first {tuple(known['shape'])} {known['dtype_numpy']}, "
            f"then {tuple(new['shape'])} {new['dtype_numpy']}"
        )
    if known["shape"] != new["shape"]:
        raise DataValueError(
            f"{key!r} changed its shape within a stream: {tuple(known['shape'])} then "
            f"{tuple(new['shape'])}; the store keeps one shape per key and stream (pad the "
            "values, or save them in separate streams)"
        )
    merged = dict(known)
    try:
        dtype = np.result_type(np.dtype(known["dtype_numpy"]), np.dtype(new["dtype_numpy"]))
    except TypeError as error:
        raise DataValueError(f"{key!r} mixes incompatible types: {error}") from error
    merged["dtype_numpy"] = dtype.str
    if known["dtype"] != new["dtype"]:
        kinds = {known["dtype"], new["dtype"]}
        if kinds <= {"integer", "number", "boolean"}:
            merged["dtype"] = "number"
        else:
            raise DataValueError(
                f"{key!r} mixes {known['dtype']} and {new['dtype']} values within a stream"
            )
    return merged
