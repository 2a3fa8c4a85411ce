"""Property-based tests: every input is either saved exactly or refused cleanly.

Two properties, over data keys, stream names, dtypes, shapes, values and metadata chosen by
hypothesis to break things:

- ``compose_documents`` either yields documents that event-model's schemas accept and whose
  values survive the journal's JSON encoding (how the store's write path carries them) with
  their dtype, shape and value, and whose metadata JSON and the store keep unchanged; or it
  raises an :class:`AnalysisStoreError` having written no file.
- ``AnalysisStore.save`` into a real embedded store either saves a run that reads back equal
  (``store[uid][stream][key].read()``), or raises an :class:`AnalysisStoreError` having
  written nothing under its root, delivered no run and left no journal.

``HYPOTHESIS_PROFILE=full`` runs 10,000 cases per property (``benchmarks/reliability_report.py``
does, and records the counts); the default profile is small enough for ``make test``.
With ``BAS_RELIABILITY_RECORD`` set, each property appends its counts to that file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import string
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _helpers import PROVENANCE
from bluesky_tiled_plugins.utils import truncate_json_overflow
from event_model import DocumentNames, schema_validators
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bluesky_analysis_store import AnalysisStore, AnalysisStoreError, compose_documents
from bluesky_analysis_store._journal import decode_record, encode_record

# --- profiles -----------------------------------------------------------------------------

_COMMON = {
    "deadline": None,
    "derandomize": True,  # the same cases on every run and machine
    "database": None,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
    ],
    "print_blob": True,
}
# benchmarks/reliability_report.py runs the store.save property in several processes at
# once, each drawing its own cases from its own seed: ``BAS_PROPERTY_SEED``.
SHARD_SEED = os.environ.get("BAS_PROPERTY_SEED")
settings.register_profile("small", **_COMMON)
settings.register_profile("full", **{**_COMMON, "derandomize": SHARD_SEED is None})
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "small")
settings.load_profile(PROFILE if PROFILE in ("small", "full") else "small")
CASES = {
    "small": {"compose": 150, "save": 25},
    "full": {"compose": 10_000, "save": int(os.environ.get("BAS_SAVE_CASES", "10000"))},
}[PROFILE if PROFILE == "full" else "small"]
RECORD = os.environ.get("BAS_RELIABILITY_RECORD")

# --- strategies ---------------------------------------------------------------------------

# Every code point, lone surrogates included.
ANY_CHARACTER = st.characters(codec=None, exclude_categories=())
TRICKY_NAMES = [
    "time",
    "Time",
    "SEQ_NUM",
    "seq_num",
    "ts_x",
    ".",
    "..",
    "a.b",
    "a/b",
    "",
    "x" * 61,
    "é",
    "détecteur 1",
    "a\tb",
    "a\nb",
    "a#b",
    "a?b",
    "a{0}b",
    "a}b",
    "_x",
    "2theta",
    "a;b",
    "a'b",
    "a--b",
    "x\x00",
    "\ud800",
    "ümlaut",
    "../../../outside/s",
    "I0",
    "i0",
]
SAFE_NAME = st.from_regex(r"[A-Za-z][A-Za-z0-9_ -]{0,12}", fullmatch=True)
NAMES = st.one_of(
    SAFE_NAME, SAFE_NAME, st.sampled_from(TRICKY_NAMES), st.text(ANY_CHARACTER, max_size=70)
)
STREAMS = st.one_of(
    st.sampled_from(["primary", "baseline", "summary"]),
    SAFE_NAME,
    st.sampled_from(TRICKY_NAMES),
    st.text(ANY_CHARACTER, max_size=20),
)
DTYPES = [
    "?",
    "i1",
    "i2",
    "i4",
    "i8",
    "u1",
    "u2",
    "u4",
    "u8",
    "f2",
    "f4",
    "f8",
    "c8",
    "c16",
    "M8[ns]",
    "M8[s]",
    "m8[ns]",
    "m8[us]",
    "U4",
    "S4",
    ">f4",
    ">i2",
]
SHAPES = [(), (), (3,), (2, 2), (1, 1, 2), (0,), (2, 0)]
FORMATS = ["HDF5", "TIFF", "NPY"]


# What the store keeps (see _data_keys.py): single values of these dtypes inline, arrays of
# any of DTYPES, and frames of CLEAN_FILE_DTYPES in every format.
CLEAN_SCALAR_DTYPES = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "f4", "f8", "U4"]
CLEAN_FILE_DTYPES = ["?", "i1", "i2", "u2", "u8", "f2", "f4", "f8", "c8"]


@st.composite
def kinds_of_value(draw: Any, clean: bool = False) -> tuple[str, Any, Any]:
    """How the values of one key are made: (form, dtype, shape)."""
    if clean:
        form = draw(st.sampled_from(["array", "numpy-scalar", "python", "list"]))
        if form in ("numpy-scalar", "python"):
            return form, draw(st.sampled_from(CLEAN_SCALAR_DTYPES)), ()
        return form, draw(st.sampled_from(CLEAN_FILE_DTYPES)), draw(st.sampled_from([(3,), (2, 2)]))
    form = draw(st.sampled_from(["array", "array", "numpy-scalar", "python", "list", "odd"]))
    return form, draw(st.sampled_from(DTYPES)), draw(st.sampled_from(SHAPES))


ODD_VALUES = st.one_of(
    st.integers(),
    st.floats(),
    st.complex_numbers(),
    st.text(ANY_CHARACTER, max_size=6),
    st.binary(max_size=4),
    st.none(),
    st.just({"a": 1}),
    st.just([[1, 2], [3]]),
    st.just(["a", 1]),
    st.just([2**62 + 1, 0.5]),
    st.just([True, 2]),
    st.just([]),
    st.just(np.array([1, None], dtype=object)),
    st.just(np.ma.masked_array([1, 2], [0, 1])),
    st.builds(lambda: __import__("pandas").DataFrame({"a": [1, 2]})),
    st.just(np.zeros(2, dtype=[("a", "i4")])),
)


@st.composite
def values_of(draw: Any, kind: tuple[str, Any]) -> Any:
    form, dtype, shape = kind
    if form == "odd":
        return draw(ODD_VALUES)
    if form in ("numpy-scalar", "python"):
        shape = ()
    array = draw(
        hnp.arrays(
            np.dtype(dtype),
            shape,
            elements={"allow_subnormal": True} if np.dtype(dtype).kind in "fc" else None,
        )
    )
    if form == "numpy-scalar":
        return array[()]
    if form == "python":
        return array.item() if array.dtype.kind not in "mM" else array[()]
    if form == "list":
        return array.tolist()
    return array


@st.composite
def runs(draw: Any, *, files: bool) -> tuple[list[dict], dict, dict]:
    """``(data_dicts, md, writers_dict)`` of one run: half of them made of what the store
    keeps (so that both outcomes are tried often), half of anything."""
    clean = draw(st.booleans())
    names, streams = (SAFE_NAME, SAFE_NAME) if clean else (NAMES, STREAMS)
    stream_names = draw(st.lists(streams, min_size=1, max_size=2, unique=True))
    keys = {
        s: draw(st.lists(names, min_size=1, max_size=2, unique_by=str.lower))
        if clean
        else draw(st.lists(names, min_size=1, max_size=2, unique=True))
        for s in stream_names
    }
    kinds = {(s, k): draw(kinds_of_value(clean)) for s in stream_names for k in keys[s]}
    data_dicts = []
    for _ in range(draw(st.integers(1, 3))):
        event = {}
        for s in draw(st.lists(st.sampled_from(stream_names), min_size=1, unique=True)):
            event[s] = {}
            for k in keys[s]:
                # Mostly the key's own kind of value; sometimes another (changing dtype/shape).
                kind = kinds[(s, k)] if clean or draw(st.integers(0, 5)) else draw(kinds_of_value())
                event[s][k] = draw(values_of(kind))
        data_dicts.append(event)
    writers = {}
    if files:
        all_keys = sorted({k for ks in keys.values() for k in ks}, key=repr)
        for k in draw(st.lists(st.sampled_from(all_keys), unique=True, max_size=2)):
            if clean and any(kinds[(s, k)][2] != (2, 2) for s in stream_names if k in keys[s]):
                continue  # single values and 1-d arrays are kept inline
            writers[k] = draw(st.sampled_from(FORMATS))
    md = draw(st.dictionaries(SAFE_NAME, CLEAN_JSON, max_size=3)) if clean else draw(metadata())
    return data_dicts, md, writers


CLEAN_JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**53) + 1, 2**53 - 1),
        st.floats(allow_nan=False, allow_infinity=False, min_value=-1e15, max_value=1e15),
        st.text(max_size=8),
    ),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(ANY_CHARACTER, max_size=8),
    st.sampled_from([2**53 - 1, 2**53, -(2**53), 2**70, 1e300, 0.1, float("nan"), float("inf")]),
)
JSON_LIKE = st.recursive(
    JSON_LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), children, max_size=3),
        st.tuples(children),
    ),
    max_leaves=8,
)


@st.composite
def metadata(draw: Any) -> dict:
    md = draw(
        st.dictionaries(st.text(string.ascii_letters + "._ ", max_size=8), JSON_LIKE, max_size=3)
    )
    for key in draw(
        st.lists(
            st.sampled_from(["scan_id", "group", "sample", "uid", "owner", "plan_name", "hints"]),
            max_size=2,
        )
    ):
        md[key] = draw(st.one_of(st.integers(-5, 2**60), st.text(max_size=4), JSON_LIKE))
    if draw(st.integers(0, 20)) == 0:
        md["nested"] = deep = {}
        for _ in range(1200):  # deeper than JSON's recursion limit
            deep["x"] = deep = {}
    if draw(st.integers(0, 20)) == 0:
        md["other"] = {np.int64(3): 1} if draw(st.booleans()) else {"v": np.float32(1.5)}
    return md


# --- what an accepted run must look like --------------------------------------------------


def expected_columns(data_dicts: list[dict]) -> dict[tuple[str, str], list[Any]]:
    columns: dict[tuple[str, str], list[Any]] = {}
    for event in data_dicts:
        for stream, data in event.items():
            for key, value in data.items():
                columns.setdefault((stream, key), []).append(value)
    return columns


def same_value(got: Any, given: Any) -> bool:
    got, given = np.asarray(got), np.asarray(given)
    if got.shape != given.shape:
        return False
    if given.dtype.kind in "fcmM":
        return bool(np.array_equal(got.astype(given.dtype), given, equal_nan=True))
    return bool(np.array_equal(got, given))


def assert_same_dtype(got: np.dtype, given: list[Any], declared: str) -> None:
    """What is read back has the declared dtype; that is the given one when every value of
    the key had the same (a Python int is int64, a float float64; strings may widen)."""
    declared_dtype = np.dtype(declared)
    if got.kind in "US":
        assert got.kind == declared_dtype.kind
        return
    assert got == declared_dtype.newbyteorder("="), (got, declared)
    dtypes = {np.asarray(v).dtype.newbyteorder("=") for v in given}
    if len(dtypes) == 1:
        assert got == dtypes.pop(), (got, given)


def assert_metadata_kept(start: dict, md: dict) -> None:
    for key, value in md.items():
        assert start[key] == value
        # JSON and bluesky-tiled-plugins' overflow clipping keep it as it is.
        assert json.loads(json.dumps(value, allow_nan=False)) == value
        assert truncate_json_overflow(value) == value


def files_in(folder: Path) -> list[Path]:
    return list(folder.rglob("*")) if folder.exists() else []


# --- the properties -----------------------------------------------------------------------

OUTCOMES: dict[str, Counter[str]] = {"compose": Counter(), "save": Counter()}


@pytest.fixture(scope="module", autouse=True)
def record_outcomes() -> Any:
    yield
    if RECORD:
        with open(RECORD, "a") as record:
            for name, counts in OUTCOMES.items():
                if counts:
                    record.write(
                        json.dumps({"property": name, "profile": PROFILE, **counts}) + "\n"
                    )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("property-roots")


@given(run=runs(files=True))
@settings(max_examples=CASES["compose"])
def test_compose_documents_saves_exactly_or_refuses_cleanly(run, scratch: Path) -> None:
    data_dicts, md, writers = run
    root = scratch / uuid.uuid4().hex
    OUTCOMES["compose"]["cases"] += 1
    try:
        try:
            documents = list(compose_documents(data_dicts, md, writers, root=root, **PROVENANCE))
        except AnalysisStoreError:
            OUTCOMES["compose"]["refused"] += 1
            assert [p for p in files_in(root) if p.is_file()] == []
            return
        except Exception:
            OUTCOMES["compose"]["escaped"] += 1
            raise
        OUTCOMES["compose"]["saved"] += 1
        for name, doc in documents:
            schema_validators[DocumentNames(name)].validate(doc)
        # The journal's encoding is how the write path carries documents to the store.
        carried = [decode_record(encode_record(name, doc)) for name, doc in documents]
        assert_metadata_kept(carried[0][1], md)
        descriptors = {d["uid"]: d for n, d in carried if n == "descriptor"}
        got: dict[tuple[str, str], list[Any]] = {}
        for name, doc in carried:
            if name == "event":
                stream = descriptors[doc["descriptor"]]["name"]
                for key, value in doc["data"].items():
                    got.setdefault((stream, key), []).append(value)
        by_stream = {d["name"]: d["data_keys"] for d in descriptors.values()}
        for (stream, key), given in expected_columns(data_dicts).items():
            declared = by_stream[stream][key]
            if key in writers or declared["shape"] == [None]:  # tables, variable lengths
                assert declared["external"] == "STREAM:"
                continue
            assert len(got[(stream, key)]) == len(given)
            for value, original in zip(got[(stream, key)], given, strict=True):
                assert same_value(value, original), (stream, key, value, original)
                assert list(np.shape(value)) == declared["shape"]
            assert_same_dtype(np.asarray(got[(stream, key)]).dtype, given, declared["dtype_numpy"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def property_store(tmp_path_factory: pytest.TempPathFactory) -> AnalysisStore:
    return AnalysisStore.open(tmp_path_factory.mktemp("property-store"))


def _sharded(test: Any) -> Any:
    return test if SHARD_SEED is None else seed(int(SHARD_SEED))(test)


@_sharded
@given(run=runs(files=True))
@settings(max_examples=CASES["save"])
def test_store_save_reads_back_equal_or_refuses_cleanly(run, property_store) -> None:
    store = property_store
    data_dicts, md, writers = run
    assert store.asset_root is not None
    root = Path(store.asset_root) / uuid.uuid4().hex
    runs_before = len(store)
    journals_before = (
        set(os.listdir(store.journal_folder)) if store.journal_folder.exists() else set()
    )
    OUTCOMES["save"]["cases"] += 1
    try:
        uid = store.save(data_dicts, md, writers, root=root, **PROVENANCE)
    except AnalysisStoreError:
        OUTCOMES["save"]["refused"] += 1
        assert [p for p in files_in(root) if p.is_file()] == []
        assert len(store) == runs_before
        journals = set(os.listdir(store.journal_folder)) if store.journal_folder.exists() else set()
        assert journals == journals_before
        return
    except Exception:
        OUTCOMES["save"]["escaped"] += 1
        raise
    OUTCOMES["save"]["saved"] += 1
    run_node = store[uid]
    assert run_node.metadata["stop"]["exit_status"] == "success"
    assert_metadata_kept(run_node.start, md)
    for (stream, key), values in expected_columns(data_dicts).items():
        declared = run_node[stream].metadata["data_keys"][key]
        if declared["shape"] == [None]:  # tables and variable lengths: a table node each
            assert_tables_read_back(store, uid, stream, key, values)
            continue
        got = np.asarray(run_node[stream][key].read())
        assert got.shape[0] == len(values)
        for n, original in enumerate(values):
            assert same_value(got[n], original), (stream, key, got[n], original)
        assert_same_dtype(got.dtype, values, declared["dtype_numpy"])


def assert_tables_read_back(
    store: AnalysisStore, uid: str, stream: str, key: str, values: list[Any]
) -> None:
    """Each event's table (or variable-length array) read back equal, dtypes too."""
    import pandas as pd

    (got,) = store.read_stream(uid, stream, [key]).values()
    if isinstance(got, pd.DataFrame):
        for n, original in enumerate(values):
            rows = got[got["seq_num"] == n + 1].drop(columns="seq_num").reset_index(drop=True)
            pd.testing.assert_frame_equal(rows, pd.DataFrame(original))
        return
    assert len(got) == len(values)
    for event, original in zip(got, values, strict=True):
        assert same_value(event, np.asarray(original)), (stream, key, event, original)


# --- examples the adversary found, each one for the record --------------------------------


def test_a_key_named_alike_in_two_streams_keeps_each_streams_dtype(property_store) -> None:
    flags, counts = np.array([True, False, True]), np.array([1, 2, 3], dtype="i1")
    uid = property_store.save(
        [{"first": {"v": flags}, "second": {"v": counts}}] * 2, {}, **PROVENANCE
    )
    run = property_store[uid]
    np.testing.assert_array_equal(run["first"]["v"].read(), [flags, flags])
    assert run["first"]["v"].read().dtype == np.bool_
    assert run["second"]["v"].read().dtype == np.int8


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (np.int8(5), "int8"),
        (np.float32(0.1), "float32"),
        (np.array(7, dtype="u1"), "uint8"),
        (np.uint32(2**32 - 1), "uint32"),
        (True, "bool"),
        (2**63 - 1, "int64"),
    ],
)
def test_scalar_dtypes_read_back_as_given(value, dtype, property_store) -> None:
    uid = property_store.save([{"primary": {"v": value}}] * 2, {}, **PROVENANCE)
    got = property_store[uid]["primary"]["v"].read()
    assert np.asarray(got).dtype == np.dtype(dtype) and list(got) == [value, value]


@pytest.mark.parametrize(
    "data",
    [
        {"v": np.uint64(2**64 - 1)},
        {"v": np.array([], dtype="f8")},
        {"v": np.float16(1)},
        {"Time": 1.0},
        {"SEQ_NUM": 1},
        {"a\tb": 1.0},
        {"v": 2**70},
        {"v": __import__("pandas").DataFrame({"a": [1.0]}, index=[5])},
        {"v": __import__("pandas").Series([1.0])},
    ],
    ids=["uint64", "empty", "float16", "Time", "SEQ_NUM", "tab", "2**70", "DataFrame", "Series"],
)
def test_refused_values_and_keys(data, property_store) -> None:
    before = len(property_store)
    with pytest.raises(AnalysisStoreError) as caught:
        property_store.save([{"primary": data}], {}, **PROVENANCE)
    if "DataFrame" in repr(type(next(iter(data.values())))):
        assert "reset_index()" in str(caught.value)  # its index would be lost
    assert len(property_store) == before


def test_bool_then_float16_in_one_key_is_refused(property_store) -> None:
    with pytest.raises(AnalysisStoreError):
        property_store.save(
            [{"primary": {"v": True}}, {"primary": {"v": np.float16(2)}}], {}, **PROVENANCE
        )


@pytest.mark.parametrize(
    "md",
    [
        {"group": 80},
        {"scan_id": "x"},
        {"v": float("nan")},
        {"v": float("inf")},
        {"v": 2**70},
        {"v": 1e300},
        {"v": (1, 2)},
        {1: "a"},
        {"v": "\ud800"},
    ],
)
def test_refused_metadata(md, property_store) -> None:
    before = len(property_store)
    with pytest.raises(AnalysisStoreError):
        property_store.save([{"primary": {"v": 1.0}}], md, **PROVENANCE)
    assert len(property_store) == before


def test_metadata_numbers_are_kept_exactly(property_store) -> None:
    md = {"big": 2**53 - 1, "small": -(2**53 - 1), "f": 0.1, "nested": {"a": [1, None, "x"]}}
    uid = property_store.save([{"primary": {"v": 1.0}}], md, **PROVENANCE)
    start = property_store[uid].start
    assert {k: start[k] for k in md} == md


@pytest.mark.parametrize("stream", ["../../../outside/s", "..", ".", "a/b", "a\tb", ""])
def test_bad_stream_names_are_refused_before_any_file(stream, tmp_path: Path) -> None:
    with pytest.raises(AnalysisStoreError):
        list(
            compose_documents(
                [{stream: {"img": np.zeros((2, 2))}}],
                {},
                {"img": "TIFF"},
                root=tmp_path / "root",
                **PROVENANCE,
            )
        )
    assert files_in(tmp_path) == [] or all(p.is_dir() for p in files_in(tmp_path))
    assert not (tmp_path.parent / "outside").exists()


def double(data: dict) -> dict:
    return {"twice": np.full((2, 2), 2.0 * data["motor"])}


def test_a_live_raw_stream_with_a_bad_name_is_refused_and_the_scan_goes_on(
    RE,  # noqa: N803
    property_store,
    tmp_path: Path,
) -> None:
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp
    from ophyd.sim import SynAxis

    from bluesky_analysis_store import AnalysisStoreCallback

    motor = SynAxis(name="motor")
    bad = "../../../outside/s"

    @bpp.run_decorator()
    def scan():
        for stream in ("primary", bad):
            yield from bps.create(name=stream)
            yield from bps.read(motor)
            yield from bps.save()

    callback = AnalysisStoreCallback(
        double,
        property_store,
        streams=("primary", bad),
        background=False,
    )
    try:
        callback.subscribe(RE)
        (raw_uid,) = RE(scan())
    finally:
        callback.close(timeout=60)
    (child_uid,) = property_store.children(raw_uid)
    child = property_store[child_uid]
    assert list(child) == ["primary"]
    reduction = child.metadata["stop"]["reduction"]
    assert reduction["events_reduced"] == 1 and reduction["events_failed"] == 1
    assert any(f["stage"] == "naming the child stream" for f in reduction["failures"])
    assets = Path(property_store.asset_root)
    assert not any((folder / "outside").exists() for folder in assets.parents)
    assert [p for p in files_in(assets) if "outside" in str(p)] == []
    assert math.isclose(float(np.asarray(child["primary"]["twice"].read())[0, 0, 0]), 0.0)
