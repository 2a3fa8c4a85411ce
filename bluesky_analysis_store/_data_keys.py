"""Checking derived values and describing them as event-model data keys.

What is accepted is what the store gives back equal: the same values, dtype and shape.
Anything else is refused here, with :class:`DataKeyError` or :class:`DataValueError`, before a
file is written or a document reaches the store. Which dtypes survive which path was measured
against tiled 0.2.20 and bluesky-tiled-plugins 2.0.12 (inline scalars become columns of the
catalog's SQL tables, inline arrays zarr arrays, file keys frames of the file format's reader).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ._errors import DataKeyError, DataValueError

__all__ = [
    "FILE_DTYPE_KINDS",
    "INLINE_ARRAY_KINDS",
    "RESERVED_KEYS",
    "TABLE_SPEC",
    "check_data_key",
    "check_storable",
    "check_stream_keys",
    "check_stream_name",
    "conform_value",
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
# Keys and stream names are also parts of URLs (httpx refuses control characters; '#' and
# '?' end a path) and of file name templates (braces are str.format fields).
_FORBIDDEN_IN_NAMES = re.compile(r"[\x00-\x1f\x7f-\x9f#?{}]")
# A stream name is a folder name under the writer root and a node of the catalog.
_MAX_STREAM_BYTES = 255
# Column names of the tables that tiled stores events in (compared ignoring case).
RESERVED_KEYS = frozenset({"time", "seq_num"})

# The spec of the Parquet format, which holds tables and variable-length arrays.
TABLE_SPEC = "BAS_PARQUET_TABLE"
# The names tiled gives the tables of a stream's own rows (bluesky-tiled-plugins' TiledWriter
# names them "internal", "internal_0"...): a key naming a node of its own may not take them.
_STREAM_TABLE_NAME = re.compile(r"internal(_[0-9]+)?")
# The largest integers the catalog's SQL columns hold.
_INT64 = np.iinfo(np.int64)
# numpy dtype kinds the store gives back from a zarr array (an inline array).
INLINE_ARRAY_KINDS = "biufcmMSU"
# numpy dtype kinds each file format of the package gives back, and the frame dimensions
# it keeps (tifffile reads a 3-d frame as colour planes).
FILE_DTYPE_KINDS: dict[str, tuple[str, range]] = {
    "BAS_HDF5": ("biufcS", range(0, 33)),
    "BAS_TIFF_SERIES": ("biufc", range(1, 3)),
    "BAS_NPY_SERIES": ("biufcmMSU", range(0, 33)),
}
# A writer of the user's own: only what no file could hold is refused.
_ANY_FILE_KINDS = "biufcmMSU"


def _check_name(what: str, name: Any, *, max_bytes: int) -> str:
    if not isinstance(name, str) or not _DATA_KEY_PATTERN.match(name):
        raise DataKeyError(
            f"{what} {name!r} is not allowed: it must be a non-empty string without '/' or '.'"
        )
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise DataKeyError(f"{what} {name!r} is not valid unicode (a lone surrogate)") from None
    if found := _FORBIDDEN_IN_NAMES.search(name):
        raise DataKeyError(
            f"{what} {name!r} contains {found.group()!r}: control characters, '#', '?', "
            "'{' and '}' are not allowed"
        )
    if _FORBIDDEN_IN_COLUMNS.search(name):
        raise DataKeyError(
            f"{what} {name!r} is not allowed: leave out quotes, ';', '\\', '%', '(', ')', "
            "'=', '+', '--', '/*'"
        )
    if size > max_bytes:
        raise DataKeyError(f"{what} {name!r} is longer than {max_bytes} bytes")
    return name


def check_data_key(key: Any) -> str:
    _check_name("data key", key, max_bytes=_MAX_KEY_BYTES)
    if key.lower() in RESERVED_KEYS:
        raise DataKeyError(
            f"data key {key!r} is reserved (the store's tables have a column of that name, "
            "ignoring case); rename it"
        )
    if _STREAM_TABLE_NAME.fullmatch(key.lower()):
        raise DataKeyError(
            f"data key {key!r} is reserved (the store names the tables of a stream's rows "
            "so); rename it"
        )
    if not _COLUMN_START.match(key):
        raise DataKeyError(
            f"data key {key!r} cannot name a column of the store's tables: start it with an "
            "ASCII letter"
        )
    return key


def check_stream_name(stream: Any) -> str:
    """Refuse a stream name that could not name a folder under the writer root and a node
    of the catalog: the characters of a data key only, and no '.' (so never ``..``)."""
    return _check_name("stream name", stream, max_bytes=_MAX_STREAM_BYTES)


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


# --- values -------------------------------------------------------------------------------


def _refuse_tables(key: str, value: Any) -> None:
    module = type(value).__module__.split(".")[0]
    if module in ("pandas", "xarray", "polars", "pyarrow"):
        raise DataValueError(
            f"value of {key!r} is a {type(value).__name__}, whose labels (an index, "
            "coordinates) would be lost: give a pandas DataFrame (saved as a table) or numpy "
            "arrays"
        )
    if isinstance(value, np.ma.MaskedArray):
        raise DataValueError(f"value of {key!r} is a masked array: the mask would be lost")


def _check_text(key: str, text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise DataValueError(f"value of {key!r} is not valid unicode (a lone surrogate)") from None
    if text.endswith("\x00"):  # numpy's strings, which the store reads back as, drop them
        raise DataValueError(f"value of {key!r} ends with a NUL character, which is not kept")
    return text


def _from_sequence(key: str, value: list | tuple) -> np.ndarray:
    """An array of a (nested) list, refused unless every element survives the conversion."""
    array = np.asarray(value)
    if array.dtype.kind in "OV":
        return array
    if not _same_leaves(value, array.tolist()):
        raise DataValueError(
            f"value of {key!r} mixes elements that numpy would change to make one "
            f"{array.dtype} array (strings and numbers, or integers a float cannot hold)"
        )
    return array


def _same_leaves(given: Any, made: Any) -> bool:
    if isinstance(given, (list, tuple)):
        return (
            isinstance(made, list)
            and len(given) == len(made)
            and all(_same_leaves(g, m) for g, m in zip(given, made, strict=True))
        )
    if isinstance(given, np.ndarray):
        made_array = np.asarray(made)
        return given.dtype.kind not in "OV" and _same_values(made_array.astype(given.dtype), given)
    if isinstance(given, str) != isinstance(made, str) or isinstance(given, bytes) != isinstance(
        made, bytes
    ):
        return False
    if given != given and made != made:  # NaN
        return True
    try:
        return bool(given == made)
    except Exception:
        return False


def normalise_value(key: str, value: Any) -> Any:
    """A Python bool, int, float or str, a numpy scalar (its dtype kept) or a numpy array of
    native byte order; anything the store could not give back equal is refused."""
    kind = type(value)
    if kind is bool or kind is float:
        return value
    if kind is int:
        if not _INT64.min <= value <= _INT64.max:
            raise DataValueError(
                f"value of {key!r} is {value}, outside the 64-bit integers the store holds"
            )
        return value
    if kind is str:
        return _check_text(key, value)
    _refuse_tables(key, value)
    if isinstance(value, np.generic):
        if value.dtype.kind in "OV":
            raise DataValueError(f"value of {key!r} has dtype {value.dtype}, which is not stored")
        if isinstance(value, np.str_):
            _check_text(key, str(value))
        return value
    try:
        if isinstance(value, (list, tuple)):
            array = _from_sequence(key, value)
        else:
            array = np.asarray(value)
    except DataValueError:
        raise
    except Exception as error:  # ragged nested lists, integers too large, and the like
        raise DataValueError(f"value of {key!r} cannot be made an array: {error}") from error
    if array.dtype.kind in "OV":
        raise DataValueError(
            f"value of {key!r} has dtype {array.dtype} ({type(value).__name__}); give numbers, "
            "strings or numeric arrays"
        )
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.ndim == 0:
        return array[()]
    return array


_SCALAR_DTYPE_NAMES = {"b": "boolean", "i": "integer", "u": "integer", "f": "number", "U": "string"}


def _dtype_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, np.generic):
        return _SCALAR_DTYPE_NAMES.get(value.dtype.kind, "array")
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array"


def describe_value(value: Any, *, source: str = "analysis") -> dict[str, Any]:
    """The event-model data key of an already normalised value."""
    if isinstance(value, (np.ndarray, np.generic)):
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


def check_storable(
    key: str, data_key: Mapping[str, Any], *, to_file: bool, spec: str | None = None
) -> None:
    """Refuse a data key whose values the store would not give back equal.

    ``to_file`` keys are frames of the format of ``spec`` (any spec the package does not
    know is a writer of the user's own, trusted with every dtype but objects); the others
    are inline: single values are columns of the catalog's SQL tables (booleans, integers
    up to 64 bits but unsigned 64, 32- and 64-bit floats, strings), arrays zarr arrays.
    """
    shape = tuple(data_key.get("shape") or ())
    if None in shape or isinstance(data_key.get("dtype_numpy"), list):
        if to_file and spec == TABLE_SPEC:
            return
        raise DataValueError(
            f"{key!r} holds tables or variable-length arrays, which are written as Parquet "
            f"files{f', not as {spec}' if spec else ''}: leave it out of writers_dict or give "
            "it 'PARQUET'"
        )
    try:
        dtype = np.dtype(data_key["dtype_numpy"])
    except (KeyError, TypeError) as error:
        raise DataValueError(f"{key!r} has no numpy dtype the store knows: {error}") from None
    if 0 in shape:
        raise DataValueError(
            f"{key!r} has an empty shape {shape}: the store keeps no empty arrays (tables and "
            "files need at least one element a value)"
        )
    if dtype.kind in "mM" and np.datetime_data(dtype)[0] == "generic":
        raise DataValueError(f"{key!r} has dtype {dtype} without a time unit")
    if to_file:
        if spec == TABLE_SPEC:  # tables and variable-length arrays, checked value by value
            return
        kinds, dims = FILE_DTYPE_KINDS.get(spec or "", (_ANY_FILE_KINDS, range(0, 33)))
        if dtype.kind not in kinds:
            raise DataValueError(
                f"{key!r} is written as {spec} frames, which do not hold dtype {dtype}; "
                "choose another format (NPY holds every numeric, time and string dtype)"
            )
        if len(shape) not in dims:
            raise DataValueError(
                f"{key!r} is written as {spec} frames of {dims.start} to {dims.stop - 1} "
                f"dimensions, not of shape {shape}"
            )
        return
    if shape:
        if dtype.kind not in INLINE_ARRAY_KINDS:
            raise DataValueError(f"{key!r} is an array of dtype {dtype}, which is not stored")
        return
    if dtype.kind in "biU" or (dtype.kind == "u" and dtype.itemsize <= 4):
        return
    if dtype.kind == "f" and dtype.itemsize in (4, 8):
        return
    raise DataValueError(
        f"a single {dtype} value of {key!r} cannot be stored inline (the store's tables have "
        f"no {dtype} column): give it as an array of shape (1,), write it to a file, or "
        "convert it to a dtype the tables hold (bool, int8-64, uint8-32, float32/64, str)"
    )


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fcmM" and b.dtype.kind in "fcmM":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def conform_value(key: str, value: Any, data_key: Mapping[str, Any]) -> Any:
    """``value`` with the dtype ``data_key`` declares, refused unless that keeps it exactly
    (an int that a float cannot hold, a string longer than the declared width...)."""
    declared = np.dtype(data_key["dtype_numpy"])
    given = np.asarray(value)
    if given.dtype == declared:
        return value
    with np.errstate(all="ignore"):
        try:
            cast = given.astype(declared)
            back = cast.astype(given.dtype)
        except (TypeError, ValueError, OverflowError):
            cast = back = None
    if back is None or not _same_values(back, given):
        raise DataValueError(
            f"{key!r} was declared {declared} for its stream; this value of dtype "
            f"{given.dtype} would not be kept exactly as {declared}"
        )
    return cast[()] if cast.ndim == 0 else cast


def merge_data_key(
    key: str, known: Mapping[str, Any], new: Mapping[str, Any], *, to_file: bool
) -> dict[str, Any]:
    """Widen ``known`` to admit ``new``, or refuse when the change cannot be stored.

    Values written to files keep one shape and dtype per stream: each file format stores
    frames of one kind and tiled reads them as one array. Inline values keep one shape too
    (the catalog's tables hold no variable-length arrays), but numbers may widen (int to
    float) and strings may grow; each value must then be kept exactly by the wider dtype
    (see :func:`conform_value`).
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
            f"{tuple(new['shape'])}; a key of 1-D arrays of any length is written as "
            "Parquet: give writers_dict={" + repr(key) + ": 'PARQUET'}"
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
            merged["dtype"] = "number" if dtype.kind in "fc" else "integer"
        else:
            raise DataValueError(
                f"{key!r} mixes {known['dtype']} and {new['dtype']} values within a stream"
            )
    return merged
