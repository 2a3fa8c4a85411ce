"""Data keys and values: which names are allowed, how values are normalised and described, and
when two descriptions of one key within a stream can be merged."""

from __future__ import annotations

import event_model
import numpy as np
import pytest

from bluesky_analysis_store import AnalysisStoreError, DataKeyError, DataValueError
from bluesky_analysis_store._data_keys import (
    RESERVED_KEYS,
    check_data_key,
    describe_value,
    merge_data_key,
    normalise_value,
)


@pytest.mark.parametrize("key", ["img", "I_q", "sum-x", "détecteur 1", "x" * 60])
def test_allowed_keys(key) -> None:
    assert check_data_key(key) == key
    # ...and event-model agrees: a descriptor may use it.
    event_model.compose_run().compose_descriptor(
        name="primary", data_keys={key: {"source": "x", "dtype": "number", "shape": []}}
    )


@pytest.mark.parametrize("key", ["a/b", "a.b", ".", "..", "/", "", "time", "seq_num", None, 1])
def test_refused_keys(key) -> None:
    with pytest.raises(DataKeyError) as caught:
        check_data_key(key)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, AnalysisStoreError)
    assert repr(key) in str(caught.value)


def test_reserved_keys_are_the_table_columns() -> None:
    assert RESERVED_KEYS == {"time", "seq_num"}
    with pytest.raises(DataKeyError, match="reserved"):
        check_data_key("time")


@pytest.mark.parametrize(
    ("value", "expected", "kind"),
    [(True, True, bool), (3, 3, int), (2.5, 2.5, float), ("text", "text", str)],
)
def test_python_scalars_stay_as_given(value, expected, kind) -> None:
    result = normalise_value("k", value)
    assert type(result) is kind and result == expected


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (np.bool_(False), "bool"), (np.int8(5), "int8"), (np.int16(-4), "int16"),
        (np.uint64(2**63), "uint64"), (np.float32(0.1), "float32"), (np.float16(1), "float16"),
        (np.array(7, dtype="u1"), "uint8"), (np.array(1.5, dtype=">f4"), "float32"),
        (np.complex64(1j), "complex64"),
    ],
)
def test_numpy_scalars_and_0d_arrays_keep_their_dtype(value, dtype) -> None:
    result = normalise_value("k", value)
    assert isinstance(result, np.generic) and result.dtype == np.dtype(dtype)
    assert result == value
    assert describe_value(result)["shape"] == [] and describe_value(result)["dtype_numpy"] == (
        np.dtype(dtype).str
    )


def test_arrays_stay_arrays() -> None:
    frame = np.arange(6, dtype="u2").reshape(2, 3)
    assert normalise_value("k", frame) is frame  # no copy, no change
    listed = normalise_value("k", [[1, 2], [3, 4]])
    assert isinstance(listed, np.ndarray) and listed.shape == (2, 2) and listed.dtype == np.int64


@pytest.mark.parametrize(
    "value",
    [np.array([1, None], dtype=object), None, object(), [[1, 2], [3]], {"a": 1}],
    ids=["object-array", "none", "object", "ragged", "dict"],
)
def test_values_that_cannot_be_stored(value) -> None:
    with pytest.raises(DataValueError, match="'k'"):
        normalise_value("k", value)


def test_describe_value() -> None:
    assert describe_value(3) == {"source": "analysis", "dtype": "integer", "shape": [],
                                 "dtype_numpy": "<i8"}
    assert describe_value(2.0, source="reducer") == {"source": "reducer", "dtype": "number",
                                                     "shape": [], "dtype_numpy": "<f8"}
    assert describe_value(True)["dtype"] == "boolean"
    assert describe_value("abc")["dtype_numpy"] == "<U3"
    assert describe_value(np.zeros((2, 3), dtype=">f4")) == {
        "source": "analysis", "dtype": "array", "shape": [2, 3], "dtype_numpy": ">f4",
    }


def test_merge_identical_descriptions() -> None:
    known = describe_value(np.zeros(3))
    merged = merge_data_key("k", known, describe_value(np.ones(3)), to_file=True)
    assert merged == known and merged is not known


def test_merge_refuses_any_change_of_a_file_key() -> None:
    known = describe_value(np.zeros((4, 4), dtype="u2"))
    with pytest.raises(DataValueError, match="written to files"):
        merge_data_key("k", known, describe_value(np.zeros((4, 5), dtype="u2")), to_file=True)
    with pytest.raises(DataValueError, match="written to files"):
        merge_data_key("k", known, describe_value(np.zeros((4, 4), dtype="u4")), to_file=True)


def test_merge_widens_inline_keys() -> None:
    number = merge_data_key("k", describe_value(1), describe_value(1.5), to_file=False)
    assert number["dtype"] == "number" and number["dtype_numpy"] == "<f8"
    longer = merge_data_key("k", describe_value("ab"), describe_value("abcd"), to_file=False)
    assert longer["dtype"] == "string" and longer["dtype_numpy"] == "<U4"


def test_merge_refuses_what_cannot_be_widened() -> None:
    with pytest.raises(DataValueError, match="changed its shape"):
        merge_data_key("k", describe_value(np.zeros(3)), describe_value(np.zeros((3, 1))),
                       to_file=False)
    with pytest.raises(DataValueError, match="changed its shape"):
        merge_data_key("k", describe_value(np.zeros(3)), describe_value(np.zeros(5)),
                       to_file=False)
    with pytest.raises(DataValueError, match="'k'"):
        merge_data_key("k", describe_value("text"), describe_value(1.5), to_file=False)


@pytest.mark.parametrize(
    "key", ["2theta", "_hidden", "a(b)", "a--b", "a;b", "x" * 61, "intensity%"]
)
def test_keys_that_cannot_name_a_table_column(key) -> None:
    with pytest.raises(DataKeyError):
        check_data_key(key)


@pytest.mark.parametrize("keys", [["I0", "i0"], ["x", "ts_x"]])
def test_keys_whose_columns_clash_in_one_stream(keys) -> None:
    from bluesky_analysis_store._data_keys import check_stream_keys

    with pytest.raises(DataKeyError, match="clash"):
        check_stream_keys("primary", keys)
    check_stream_keys("primary", keys[:1])
