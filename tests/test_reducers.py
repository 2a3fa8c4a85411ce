"""Reducers: wrapping plain functions, and the parameters recorded in the provenance."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from _reducers_for_tests import (  # noqa: E402
    DarkSubtractedSum,
    PlainParams,
    WithArrayParameter,
    passthrough_total,
    scaled,
)
from bluesky_analysis_store import Reducer  # noqa: E402
from bluesky_analysis_store._reducers import (  # noqa: E402
    FunctionReducer,
    as_reducer,
    reducer_provenance,
)

EVENT = {"uid": "event-1", "seq_num": 1, "descriptor": "descriptor-1"}


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# --- as_reducer ---------------------------------------------------------------------------


def test_as_reducer_wraps_a_function_for_the_given_streams():
    reducer = as_reducer(scaled, ["primary", "baseline"])

    assert isinstance(reducer, FunctionReducer)
    assert reducer.code is scaled
    assert reducer.streams == frozenset({"primary", "baseline"})
    assert reducer.event("primary", {"det": 2.0}, EVENT) == {"total": 20.0, "shifted": 2.0}
    assert reducer.event("baseline", {"det": 1.0}, EVENT) == {"total": 10.0, "shifted": 1.0}
    assert reducer.event("dark", {"det": 2.0}, EVENT) is None


def test_as_reducer_keeps_instances_and_instantiates_classes():
    instance = DarkSubtractedSum(scale=3.0)
    assert as_reducer(instance, ["primary"]) is instance

    made = as_reducer(DarkSubtractedSum, ["primary"])
    assert type(made) is DarkSubtractedSum
    assert made.params == {"key": "img", "scale": 1.0}


@pytest.mark.parametrize("not_a_reducer", [42, "scaled", None, [scaled]])
def test_as_reducer_refuses_what_is_not_callable(not_a_reducer):
    with pytest.raises(TypeError, match="a reducer must be a function or a Reducer"):
        as_reducer(not_a_reducer, ["primary"])


def test_the_base_reducer_hooks_do_nothing_by_default():
    reducer = Reducer()
    assert reducer.start({"uid": "x"}) is None
    assert reducer.descriptor({"uid": "d", "name": "primary"}) is None
    assert reducer.event("primary", {"det": 1.0}, EVENT) is None
    assert reducer.stop({"exit_status": "success"}) is None
    assert reducer.code is Reducer
    assert reducer.params == {}


# --- FunctionReducer.params ---------------------------------------------------------------


def test_a_plain_function_has_no_params():
    assert FunctionReducer(scaled, ["primary"]).params == {}


def test_partial_keywords_are_the_params():
    reducer = FunctionReducer(functools.partial(scaled, threshold=3), ["primary"])
    assert reducer.params == {"threshold": 3}
    assert reducer.event("primary", {"det": 1.0}, EVENT) == {"total": 13.0, "shifted": -2.0}


def test_nested_partials_merge_their_params_outer_ones_winning():
    inner = functools.partial(passthrough_total, 1, threshold=1, key="det")
    outer = functools.partial(inner, 2, threshold=3)
    reducer = FunctionReducer(outer, ["primary"])

    assert reducer.params == {"threshold": 3, "key": "det", "args": [1, 2]}
    assert reducer.code is outer


def test_array_and_object_params_of_a_partial_are_summarised():
    mask = np.arange(12, dtype=np.uint8).reshape(3, 4)
    reducer = FunctionReducer(
        functools.partial(passthrough_total, mask=mask, where=pathlib.PurePosixPath("/a/b")),
        ["primary"],
    )

    params = reducer.params
    assert params["mask"] == {"shape": [3, 4], "dtype": "uint8", "sha256": sha256(mask)}
    assert params["where"] == repr(pathlib.PurePosixPath("/a/b"))
    json.dumps(params)  # the record can go into a start document


def test_numpy_scalar_params_are_recorded_by_value():
    reducer = FunctionReducer(
        functools.partial(
            passthrough_total,
            threshold=np.int64(3),
            scale=np.float32(0.5),
            flag=np.bool_(True),
            level=np.array(2.25),
        ),
        ["primary"],
    )

    params = reducer.params

    assert params == {"threshold": 3, "scale": 0.5, "flag": True, "level": 2.25}
    assert [type(params[k]) for k in ("threshold", "scale", "flag", "level")] == [
        int,
        float,
        bool,
        float,
    ]


def test_reducer_provenance_names_the_function_behind_a_partial():
    reducer = FunctionReducer(functools.partial(scaled, threshold=3), ["primary"])

    record = reducer_provenance(reducer)

    assert record["name"] == "_reducers_for_tests:scaled"
    assert record["importable"] is True
    assert record["params"] == {"threshold": 3}
    assert record["streams"] == ["primary"]
    assert record["file"] == str(pathlib.Path(__file__).with_name("_reducers_for_tests.py"))
    json.dumps(record)


def test_a_function_reducer_is_shared_not_copied():
    reducer = FunctionReducer(scaled, ["primary"])
    assert copy.deepcopy(reducer) is reducer


# --- Reducer.params -----------------------------------------------------------------------


def test_dataclass_params_summarise_an_array_field_by_shape_dtype_and_hash():
    mask = np.eye(4, dtype=np.float32)
    reducer = WithArrayParameter(mask=mask, label="diag")

    params = reducer.params

    assert params == {
        "mask": {"shape": [4, 4], "dtype": "float32", "sha256": sha256(mask)},
        "label": "diag",
    }
    json.dumps(params)


def test_the_array_hash_follows_the_values_not_the_memory_layout():
    values = np.arange(24, dtype=np.int32).reshape(4, 6)
    strided = values[:, ::2]  # not contiguous
    assert not strided.flags.c_contiguous
    fortran = np.asfortranarray(values)

    same_as_strided = WithArrayParameter(mask=np.ascontiguousarray(strided)).params["mask"]
    assert WithArrayParameter(mask=strided).params["mask"] == same_as_strided
    same_as_values = WithArrayParameter(mask=values).params["mask"]
    assert WithArrayParameter(mask=fortran).params["mask"] == same_as_values

    changed = values.copy()
    changed[0, 0] += 1
    assert (
        WithArrayParameter(mask=changed).params["mask"]["sha256"]
        != WithArrayParameter(mask=values).params["mask"]["sha256"]
    )
    assert (
        WithArrayParameter(mask=values.astype(np.int64)).params["mask"]["dtype"] == "int64"
    )


def test_dataclass_state_set_after_init_is_not_a_param():
    reducer = WithArrayParameter(mask=np.ones(2))
    reducer.event("primary", {"img": np.ones(2)}, EVENT)
    assert set(reducer.params) == {"mask", "label"}


def test_plain_subclass_params_are_its_public_attributes():
    reducer = PlainParams(factor=2.5, name="gain")
    reducer.event("primary", {"det": 1.0}, EVENT)
    assert reducer.params == {"factor": 2.5, "name": "gain"}


def test_reducer_provenance_of_a_subclass_records_the_class_and_its_params():
    record = reducer_provenance(DarkSubtractedSum(scale=2.0))
    assert record["name"] == "_reducers_for_tests:DarkSubtractedSum"
    assert record["importable"] is True
    assert record["params"] == {"key": "img", "scale": 2.0}
    assert "streams" not in record


def test_a_deep_copy_of_a_stateful_reducer_does_not_share_state():
    prototype = DarkSubtractedSum()
    first, second = copy.deepcopy(prototype), copy.deepcopy(prototype)
    dark, light = np.zeros((2, 2)), np.full((2, 2), 3.0)

    first.event("dark", {"img": dark}, EVENT)
    assert first.event("primary", {"img": light}, EVENT) == {"corrected_total": 12.0}

    with pytest.raises(RuntimeError, match="before any dark frame"):
        second.event("primary", {"img": light}, EVENT)
    assert prototype.stop({}) is None
    assert first.stop({})["frames"] == 1
