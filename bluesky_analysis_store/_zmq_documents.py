"""Bluesky documents over 0MQ without pickle: a msgpack encoding with numpy arrays as data.

bluesky's ``Publisher`` and ``RemoteDispatcher`` pickle documents by default, and unpickling
what arrives on a socket runs whatever code the sender chose. :func:`zmq_dumps` and
:func:`zmq_loads` are a pair that carries only data: msgpack's maps, lists, strings, numbers,
booleans and None, plus one extension type for numpy arrays (dtype, shape and the raw bytes,
C order). Arrays of Python objects are refused on both sides, so nothing is ever built but
plain values and numeric (or string, or structured plain-data) arrays.

On the acquisition side::

    from bluesky.callbacks.zmq import Publisher
    from bluesky_analysis_store import zmq_dumps

    RE.subscribe(Publisher("proxy.example:5577", serializer=zmq_dumps))

and ``bluesky-analysis-store worker --zmq proxy.example:5578 ...`` reads it with
:func:`zmq_loads` (``RemoteDispatcher(address, deserializer=zmq_loads)`` for your own).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from ._errors import MessageError

__all__ = ["NDARRAY_EXT_TYPE", "zmq_dumps", "zmq_loads"]

NDARRAY_EXT_TYPE = 42
"""The msgpack extension type code of a numpy array: msgpack ``[dtype.str, shape, bytes]``."""

_MAX_NDIM = 32  # numpy's own limit; a larger header is not an array numpy can make


def _encode(value: Any) -> Any:
    """What msgpack cannot pack itself: numpy arrays and scalars, tuples are lists already."""
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise MessageError(
                f"an array of dtype {value.dtype} holds Python objects and cannot be sent; "
                "send numbers or strings"
            )
        # Not np.ascontiguousarray, which makes a 0-d array 1-d.
        contiguous = value if value.flags.c_contiguous else value.copy(order="C")
        header = [contiguous.dtype.str, list(contiguous.shape), contiguous.tobytes()]
        if contiguous.dtype.names is not None:  # structured: its fields are the dtype
            header[0] = contiguous.dtype.descr
        return msgpack.ExtType(NDARRAY_EXT_TYPE, msgpack.packb(header, use_bin_type=True))
    if isinstance(value, np.generic):  # numpy scalars as the Python values they hold
        return value.item()
    raise MessageError(f"a {type(value).__name__} cannot be sent in a document: {value!r}")


def zmq_dumps(doc: Mapping[str, Any]) -> bytes:
    """A document as bytes for ``Publisher(..., serializer=zmq_dumps)``.

    Raises :class:`MessageError` for a value that is not plain data (an object array, a
    Python object).
    """
    try:
        return msgpack.packb(doc, default=_encode, use_bin_type=True, strict_types=False)
    except MessageError:
        raise
    except (TypeError, ValueError, OverflowError) as error:
        raise MessageError(f"the document cannot be encoded: {error}") from error


def _dtype(spec: Any) -> np.dtype:
    if isinstance(spec, list):  # a structured dtype's descr: [[name, type(, shape)], ...]
        spec = [tuple(field) for field in spec]
    try:
        dtype = np.dtype(spec)
    except (TypeError, ValueError) as error:
        raise MessageError(f"an array's dtype {spec!r} is not a numpy dtype: {error}") from None
    if dtype.hasobject:
        raise MessageError(f"an array of dtype {dtype} (Python objects) is refused")
    return dtype


def _decode_array(code: int, payload: bytes) -> Any:
    if code != NDARRAY_EXT_TYPE:
        raise MessageError(f"unknown msgpack extension type {code}")
    header = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
    if not (isinstance(header, list) and len(header) == 3):
        raise MessageError("an array is not [dtype, shape, bytes]")
    spec, shape, data = header
    dtype = _dtype(spec)
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise MessageError(f"an array's shape {shape!r} is not a list of sizes")
    if not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
        raise MessageError(f"an array of {dtype} and shape {tuple(shape)} has the wrong bytes")
    # A copy: writable, and not tied to the message's buffer.
    return np.frombuffer(data, dtype=dtype).reshape(tuple(shape)).copy()


def zmq_loads(data: bytes) -> dict[str, Any]:
    """The document :func:`zmq_dumps` made; :class:`MessageError` for anything else.

    It never runs code of the sender's: a pickle, or any bytes that are not this encoding
    of a map with string keys, is refused.
    """
    try:
        doc = msgpack.unpackb(
            data, ext_hook=_decode_array, raw=False, use_list=True, strict_map_key=True
        )
    except MessageError:
        raise
    except Exception as error:  # msgpack's own errors are of several builtin types
        raise MessageError(f"not a document in msgpack: {type(error).__name__}: {error}") from None
    if not isinstance(doc, dict):
        raise MessageError(f"a document is a map, not a {type(doc).__name__}")
    return doc
