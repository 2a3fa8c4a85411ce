"""compose_documents and RunComposer: the documents of one complete run, the writers_dict in
both forms, where files go by default, what is refused before anything is written, and that
nothing the caller passes in is changed."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import event_model
import numpy as np
import pytest
from _helpers import (
    PARENT_UID,
    PROVENANCE,
    assert_empty_or_missing,
    assert_same_array,
    assert_unchanged,
    count_names,
    docs_named,
    files_under,
    make_frames,
    names,
    snapshot,
    validate,
)

from bluesky_analysis_store import (
    DATA_ROOT_ENV,
    AnalysisStore,
    AnalysisStoreError,
    DataKeyError,
    DataValueError,
    MetadataError,
    RunComposer,
    WriterRootError,
    compose_documents,
    formats,
)
from bluesky_analysis_store._writer_specs import resolve_writers
from bluesky_analysis_store.formats import TIFFSeriesWriter

pytestmark = pytest.mark.usefixtures("isolated_env")


def stream_events(documents, stream: str) -> list[dict]:
    descriptors = {d["uid"] for d in docs_named(documents, "descriptor") if d["name"] == stream}
    return [e for e in docs_named(documents, "event") if e["descriptor"] in descriptors]


def descriptor_of(documents, stream: str) -> dict:
    (descriptor,) = [d for d in docs_named(documents, "descriptor") if d["name"] == stream]
    return descriptor


# --- the documents of a run ---------------------------------------------------------------------


def test_document_order_and_counts(tmp_path: Path) -> None:
    frames = make_frames("uint16", (4, 4), count=3)
    data = [
        {"primary": {"img": frames[0], "x": 0.5}, "baseline": {"temperature": 290.0}},
        {"primary": {"img": frames[1], "x": 1.5}},
        {"primary": {"img": frames[2], "x": 2.5}, "baseline": {"temperature": 291.0}},
    ]
    documents = validate(
        compose_documents(data, {"sample": "Si"}, {"img": "TIFF"}, root=tmp_path, **PROVENANCE)
    )

    assert names(documents)[0] == "start" and names(documents)[-1] == "stop"
    assert count_names(documents) == {
        "start": 1, "descriptor": 2, "stream_resource": 1, "stream_datum": 3, "event": 5,
        "stop": 1,
    }
    start, stop = documents[0][1], documents[-1][1]
    assert start["sample"] == "Si"
    assert stop["run_start"] == start["uid"]
    assert stop["exit_status"] == "success"
    assert stop["num_events"] == {"primary": 3, "baseline": 2}
    # Each stream's descriptor comes before its first event; seq_num counts per stream.
    seen = set()
    for name, doc in documents:
        if name == "descriptor":
            assert doc["run_start"] == start["uid"]
            seen.add(doc["uid"])
        if name == "event":
            assert doc["descriptor"] in seen
    assert [e["seq_num"] for e in stream_events(documents, "primary")] == [1, 2, 3]
    assert [e["seq_num"] for e in stream_events(documents, "baseline")] == [1, 2]
    assert [e["data"]["temperature"] for e in stream_events(documents, "baseline")] == [
        290.0, 291.0,
    ]
    # The stream datum of each primary event comes just before it and carries its seq_num.
    primary = descriptor_of(documents, "primary")["uid"]
    for (name, doc), (next_name, next_doc) in zip(documents, documents[1:], strict=False):
        if name == "stream_datum":
            assert next_name == "event" and next_doc["descriptor"] == primary
            seq_num = next_doc["seq_num"]
            assert doc["seq_nums"] == {"start": seq_num, "stop": seq_num + 1}
            assert doc["descriptor"] == primary


def test_inline_values_are_kept_as_given(tmp_path: Path) -> None:
    data = [
        {"primary": {"i": 3, "f": 1.25, "b": True, "s": "spot", "a": np.arange(4, dtype="i2"),
                     "g": np.float32(0.5), "z": np.array(7)}},
        {"primary": {"i": 4, "f": 2.5, "b": False, "s": "spots", "a": np.arange(4, dtype="i2") * 2,
                     "g": np.float32(1.5), "z": np.array(8)}},
    ]
    documents = validate(compose_documents(data, {}, None, root=tmp_path, **PROVENANCE))

    events = stream_events(documents, "primary")
    assert [e["data"]["i"] for e in events] == [3, 4]
    assert [e["data"]["f"] for e in events] == [1.25, 2.5]
    assert [e["data"]["b"] for e in events] == [True, False]
    assert [e["data"]["s"] for e in events] == ["spot", "spots"]
    assert [e["data"]["g"] for e in events] == [0.5, 1.5]
    assert [e["data"]["z"] for e in events] == [7, 8]
    assert_same_array(events[1]["data"]["a"], np.arange(4, dtype="i2") * 2)
    assert all(isinstance(e["data"]["i"], int) and isinstance(e["data"]["b"], bool) for e in events)
    assert all(set(e["timestamps"]) == set(e["data"]) for e in events)
    assert count_names(documents).keys() == {"start", "descriptor", "event", "stop"}
    assert files_under(tmp_path) == []

    keys = descriptor_of(documents, "primary")["data_keys"]
    assert {k: (v["dtype"], v["shape"], v["dtype_numpy"]) for k, v in keys.items()} == {
        "i": ("integer", [], "<i8"),
        "f": ("number", [], "<f8"),
        "b": ("boolean", [], "|b1"),
        "s": ("string", [], "<U5"),
        "a": ("array", [4], "<i2"),
        "g": ("number", [], "<f4"),  # a numpy scalar keeps its dtype
        "z": ("integer", [], "<i8"),
    }
    assert not any("external" in v for v in keys.values())


@pytest.mark.parametrize(("style", "external"), [("stream", "STREAM:"), ("resource", "FILESTORE:")])
def test_descriptor_describes_every_key_and_marks_only_file_keys(
    style, external, tmp_path: Path
) -> None:
    images = make_frames("float32", (3, 5), count=2)
    patterns = make_frames("int64", (11,), count=2)
    data = [{"primary": {"img": images[n], "pat": patterns[n], "x": n}} for n in range(2)]
    documents = validate(
        compose_documents(data, {}, {"img": "HDF5", "pat": "NPY"}, root=tmp_path,
                          asset_documents=style, **PROVENANCE)
    )
    keys = descriptor_of(documents, "primary")["data_keys"]
    assert keys["img"] == {"source": "analysis", "dtype": "array", "shape": [3, 5],
                           "dtype_numpy": "<f4", "external": external}
    assert keys["pat"] == {"source": "analysis", "dtype": "array", "shape": [11],
                           "dtype_numpy": "<i8", "external": external}
    assert keys["x"] == {"source": "analysis", "dtype": "integer", "shape": [],
                         "dtype_numpy": "<i8"}
    for event in stream_events(documents, "primary"):
        assert "x" in event["data"]
        if style == "stream":  # the values live in the files, referenced by stream_datum
            assert set(event["data"]) == {"x"}
        else:  # datum ids in place of the values
            assert set(event["data"]) == {"img", "pat", "x"}
            assert event["filled"] == {"img": False, "pat": False}


def test_multiple_streams_keep_their_own_keys(tmp_path: Path) -> None:
    data = [{"a": {"x": n}, "b": {"y": str(n), "z": float(n)}} for n in range(3)]
    data.append({"c": {"w": np.ones(2)}})
    documents = validate(compose_documents(data, {}, root=tmp_path, **PROVENANCE))
    assert {d["name"]: sorted(d["data_keys"]) for d in docs_named(documents, "descriptor")} == {
        "a": ["x"], "b": ["y", "z"], "c": ["w"],
    }
    assert documents[-1][1]["num_events"] == {"a": 3, "b": 3, "c": 1}


def test_an_inline_number_may_widen_but_an_array_keeps_its_shape(tmp_path: Path) -> None:
    data = [{"primary": {"v": np.arange(3, dtype="f8"), "n": 1 if n < 2 else 2.5}}
            for n in range(3)]
    documents = validate(compose_documents(data, {}, None, root=tmp_path, **PROVENANCE))
    keys = descriptor_of(documents, "primary")["data_keys"]
    assert keys["v"]["shape"] == [3]
    assert keys["n"]["dtype"] == "number" and keys["n"]["dtype_numpy"] == "<f8"
    # A 1-d array whose length changes is a variable-length key (written as Parquet); an
    # array of more dimensions keeps its shape: refused before anything is made.
    data[1]["primary"]["v"] = np.arange(5, dtype="f8")
    documents = validate(compose_documents(data, {}, None, root=tmp_path / "v", **PROVENANCE))
    declared = descriptor_of(documents, "primary")["data_keys"]["v"]
    assert declared["shape"] == [None] and declared["external"] == "STREAM:"
    shutil.rmtree(tmp_path / "v")
    for event in data:
        event["primary"]["v"] = event["primary"]["v"].reshape(1, -1)
    refuse(tmp_path, DataValueError, "changed its shape", data)


def test_run_composer_builds_a_run_event_by_event(tmp_path: Path) -> None:
    writers = resolve_writers({"img": "NPY"}, tmp_path)
    composer = RunComposer({"purpose": "live"}, writers)
    frames = make_frames("uint16", (2, 3), count=3)
    documents = composer.start()
    for n, frame in enumerate(frames):
        documents += composer.event("primary", {"img": frame, "n": n}, time=100.0 + n)
    with pytest.raises(DataKeyError, match=r"declared with keys \['img', 'n'\]"):
        composer.event("primary", {"img": frames[0]})
    with pytest.raises(DataValueError, match="written to files"):
        composer.event("primary", {"img": frames[0].astype("f4"), "n": 9})
    documents += composer.stop()
    validate(documents)
    assert names(documents)[:4] == ["start", "descriptor", "stream_resource", "stream_datum"]
    assert documents[-1][1]["num_events"] == {"primary": 3}
    assert [e["time"] for e in docs_named(documents, "event")] == [100.0, 101.0, 102.0]
    assert len(files_under(tmp_path)) == 3
    with pytest.raises(AnalysisStoreError, match="already stopped"):
        composer.event("primary", {"img": frames[0], "n": 3})


def test_asset_documents_must_be_stream_or_resource(tmp_path: Path) -> None:
    with pytest.raises(AnalysisStoreError, match="asset_documents"):
        compose_documents([{"primary": {"x": 1}}], {}, asset_documents="datum", **PROVENANCE)


# --- the writers_dict ---------------------------------------------------------------------------


class ResourceFunc:
    """The seed's resource func, recording how it is called."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, dict]] = []

    def __call__(self, docs, data_key, **kwargs):
        self.calls.append((docs["start"]["uid"], docs["descriptor"]["name"], data_key, kwargs))
        return {
            "resource_path": f"{kwargs['prefix']}/{docs['start']['uid'][:8]}/{data_key}",
            "resource_kwargs": {"template": "frame_{:03d}.tif"},
        }


def long_form(func: ResourceFunc, root: Path) -> dict:
    return {
        "img": {
            "writer": TIFFSeriesWriter,
            "resource": {"func": func, "kwargs": {"prefix": "custom"}},
            "root": str(root),
            "spec": "BAS_TIFF_SERIES",
        }
    }


def test_long_writers_dict_with_a_resource_func(tmp_path: Path) -> None:
    func = ResourceFunc()
    entry_root = tmp_path / "entry-root"
    other_root = tmp_path / "run-root"
    frames = make_frames("uint16", (4, 6), count=3)
    documents = validate(
        compose_documents(
            [{"primary": {"img": f, "x": n}} for n, f in enumerate(frames)], {},
            long_form(func, entry_root), root=other_root, asset_documents="resource",
            **PROVENANCE,
        )
    )
    start = documents[0][1]
    assert func.calls == [(start["uid"], "primary", "img", {"prefix": "custom"})]
    (resource,) = docs_named(documents, "resource")
    assert resource["spec"] == "BAS_TIFF_SERIES"
    assert resource["root"] == str(entry_root)  # the entry's root wins over the run's
    assert resource["resource_path"] == f"custom/{start['uid'][:8]}/img"
    assert resource["resource_kwargs"] == {"template": "frame_{:03d}.tif"}
    folder = entry_root / "custom" / start["uid"][:8] / "img"
    assert [p.name for p in files_under(entry_root)] == [
        "frame_000.tif", "frame_001.tif", "frame_002.tif",
    ]
    assert all(p.parent == folder for p in files_under(entry_root))
    assert_empty_or_missing(other_root)

    filler = event_model.Filler(formats.handler_registry(), inplace=False)
    filled = [filler(name, doc)[1] for name, doc in documents]
    filler.close()
    events = [doc for doc, (name, _) in zip(filled, documents, strict=True) if name == "event"]
    for event, frame in zip(events, frames, strict=True):
        assert_same_array(event["data"]["img"], frame)


def test_long_writers_dict_through_the_store(
    shared_store: AnalysisStore, reader: AnalysisStore
) -> None:
    func = ResourceFunc()
    frames = make_frames("float32", (5, 4), count=2)
    uid = shared_store.save(
        [{"primary": {"img": f}} for f in frames], {},
        long_form(func, Path(shared_store.asset_root) / "long-form"), **PROVENANCE,
    )
    assert func.calls[0][0] == uid
    assert_same_array(reader[uid]["primary"]["img"].read(), np.stack(frames))


def test_writers_dict_entries_are_checked() -> None:
    data = [{"primary": {"img": np.zeros(3)}}]
    with pytest.raises(AnalysisStoreError, match="unknown fields"):
        compose_documents(data, {}, {"img": {"spec": "BAS_HDF5", "colour": "red"}}, **PROVENANCE)
    with pytest.raises(AnalysisStoreError, match="needs a 'writer'"):
        compose_documents(data, {}, {"img": {"spec": "NOT_A_FORMAT"}}, **PROVENANCE)
    with pytest.raises(AnalysisStoreError, match="not callable"):
        compose_documents(data, {}, {"img": {"spec": "BAS_HDF5", "resource": {"func": 3}}},
                          **PROVENANCE)
    with pytest.raises(AnalysisStoreError, match="must name a format"):
        compose_documents(data, {}, {"img": 42}, **PROVENANCE)


def test_default_root_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_root = tmp_path / "from-env"
    monkeypatch.setenv(DATA_ROOT_ENV, str(env_root))
    monkeypatch.chdir(tmp_path)
    documents = validate(
        compose_documents([{"primary": {"img": np.ones((2, 2))}}], {}, {"img": "NPY"},
                          asset_documents="resource", **PROVENANCE)
    )
    (resource,) = docs_named(documents, "resource")
    assert resource["root"] == str(env_root)
    assert len(files_under(env_root)) == 1
    assert not (tmp_path / "analysis-data").exists()


def test_default_root_without_the_environment_is_analysis_data_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    documents = validate(
        compose_documents([{"primary": {"img": np.ones((2, 2))}}], {}, {"img": "HDF5"},
                          asset_documents="resource", **PROVENANCE)
    )
    (resource,) = docs_named(documents, "resource")
    assert resource["root"] == str(tmp_path / "analysis-data")
    assert [p.suffix for p in files_under(tmp_path / "analysis-data")] == [".h5"]


# --- nothing the caller passes is changed -------------------------------------------------------


def caller_inputs() -> tuple[list, dict]:
    frozen = np.arange(12, dtype="u2").reshape(3, 4)
    frozen.flags.writeable = False
    data = [
        {"primary": {"img": np.arange(12, dtype="u2").reshape(3, 4), "x": 1.0,
                     "v": np.linspace(0, 1, 5), "tag": "a"}},
        {"primary": {"img": frozen, "x": 2, "v": np.linspace(0, 2, 5), "tag": "b"}},
    ]
    md = {"sample": {"name": "Si", "temperatures": [290, 300]}, "plan_name": "reduce"}
    return data, md


@pytest.mark.parametrize("style", ["stream", "resource"])
def test_caller_data_and_metadata_are_not_mutated(style, tmp_path: Path) -> None:
    data, md = caller_inputs()
    data_before, md_before = snapshot(data), snapshot(md)
    arrays = [data[0]["primary"]["img"], data[1]["primary"]["img"], data[0]["primary"]["v"]]
    parents = [{"uid": PARENT_UID, "streams": ["primary"]}]
    parents_before = copy.deepcopy(parents)

    documents = validate(
        compose_documents(data, md, {"img": "TIFF"}, root=tmp_path, asset_documents=style,
                          parents=parents, code=np.mean)
    )
    # Changing the emitted documents must not reach back into the caller's objects either.
    start = documents[0][1]
    start["sample"]["name"] = "changed"
    start["sample"]["temperatures"].append(1)

    assert_unchanged(data, data_before)
    assert_unchanged(md, md_before)
    assert parents == parents_before
    assert data[0]["primary"]["img"] is arrays[0] and data[1]["primary"]["img"] is arrays[1]
    assert data[0]["primary"]["v"] is arrays[2]


def test_caller_data_and_metadata_are_not_mutated_by_a_store_save(
    shared_store: AnalysisStore, reader: AnalysisStore
) -> None:
    data, md = caller_inputs()
    data_before, md_before = snapshot(data), snapshot(md)
    uid = shared_store.save(data, md, {"img": "TIFF", "v": "HDF5"}, **PROVENANCE)
    assert_unchanged(data, data_before)
    assert_unchanged(md, md_before)
    assert reader[uid].start["sample"] == {"name": "Si", "temperatures": [290, 300]}


# --- refusals: raised before anything is written -----------------------------------------------


def good_events(count: int = 2) -> list[dict]:
    frames = make_frames("uint16", (4, 4), count)
    return [{"primary": {"img": f, "x": n}} for n, f in enumerate(frames)]


def refuse(tmp_path: Path, error: type, match: str, data=None, md=None, **kwargs) -> None:
    """compose_documents must raise ``error`` and leave its writer root untouched."""
    root = kwargs.pop("root", tmp_path / "root")
    writers = kwargs.pop("writers", {"img": "TIFF"})
    provenance = {**PROVENANCE, **kwargs}
    with pytest.raises(error, match=match):
        for _ in compose_documents(data or good_events(), md or {}, writers, root=root,
                                   **provenance):
            pass
    assert files_under(tmp_path) == []
    assert_empty_or_missing(root)


@pytest.mark.parametrize("key", ["a/b", "a.b", ".", "..", "", "time", "seq_num", 3])
def test_bad_data_keys(key, tmp_path: Path) -> None:
    data = good_events()
    for n, event in enumerate(data):  # every event carries it: only the name is wrong
        event["primary"][key] = float(n)
    refuse(tmp_path, DataKeyError, "data key", data)
    refuse(tmp_path, ValueError, "data key", data)


def test_a_bad_file_key_is_refused_too(tmp_path: Path) -> None:
    frames = make_frames("uint16", (2, 2))
    refuse(tmp_path, DataKeyError, "reserved", [{"primary": {"time": f}} for f in frames],
           writers={"time": "TIFF"})


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    data = good_events()
    data[-1]["primary"]["x"] = np.array([1, "a", None], dtype=object)
    refuse(tmp_path, DataValueError, "dtype object", data)
    data[-1]["primary"]["x"] = [[1, 2], [3]]  # ragged
    refuse(tmp_path, DataValueError, "cannot be made an array", data)
    data[-1]["primary"]["x"] = None
    refuse(tmp_path, DataValueError, "dtype object", data)


def test_file_key_must_keep_its_shape_and_dtype(tmp_path: Path) -> None:
    data = good_events(3)
    data[-1]["primary"]["img"] = np.zeros((4, 5), dtype="u2")
    refuse(tmp_path, DataValueError, r"same shape and dtype: first \(4, 4\) <u2, then \(4, 5\)",
           data)
    data[-1]["primary"]["img"] = np.zeros((4, 4), dtype="f4")
    refuse(tmp_path, DataValueError, "then \\(4, 4\\) <f4", data)
    data[-1]["primary"]["img"] = np.zeros((4, 4, 1), dtype="u2")
    refuse(tmp_path, ValueError, "same shape", data)


def test_inline_key_may_not_change_its_number_of_dimensions(tmp_path: Path) -> None:
    data = good_events()
    data[0]["primary"]["v"] = np.zeros(3)
    data[1]["primary"]["v"] = np.zeros((3, 1))
    refuse(tmp_path, DataValueError, "changed its shape", data)
    data[1]["primary"]["v"] = "text"
    refuse(tmp_path, DataValueError, "changed its shape", data)


def test_events_of_one_stream_must_have_the_same_keys(tmp_path: Path) -> None:
    data = good_events(3)
    data[-1]["primary"]["extra"] = 1
    refuse(tmp_path, DataKeyError, r"has keys \['extra', 'img', 'x'\]", data)
    data = good_events(3)
    del data[-1]["primary"]["x"]
    refuse(tmp_path, DataKeyError, "earlier events", data)


@pytest.mark.parametrize(
    "md",
    [{"when": object()}, {"n": np.int64(3)}, {"a": np.arange(3)}, {"nested": {"s": {1, 2}}}],
    ids=["object", "numpy-int", "array", "set"],
)
def test_metadata_must_be_json(md, tmp_path: Path) -> None:
    refuse(tmp_path, MetadataError, "not JSON-serialisable", md=md)
    refuse(tmp_path, TypeError, "not JSON-serialisable", md=md)


@pytest.mark.parametrize("key", ["uid", "parent_uids", "provenance", "time"])
def test_metadata_may_not_set_reserved_keys(key, tmp_path: Path) -> None:
    refuse(tmp_path, MetadataError, f"may not set \\['{key}'\\]", md={key: "x", "ok": 1})


def test_writer_root_that_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "file-root"
    root.write_text("not a folder")
    with pytest.raises(WriterRootError, match="is not a folder"):
        compose_documents(good_events(), {}, {"img": "TIFF"}, root=root, **PROVENANCE)
    with pytest.raises(OSError):
        compose_documents(good_events(), {}, {"img": "TIFF"}, root=root, **PROVENANCE)
    assert files_under(tmp_path) == [root]
    assert root.read_text() == "not a folder"


def test_writer_root_whose_parent_is_a_file(tmp_path: Path) -> None:
    parent = tmp_path / "a-file"
    parent.write_text("x")
    with pytest.raises(WriterRootError, match="cannot create writer root"):
        compose_documents(good_events(), {}, {"img": "TIFF"}, root=parent / "data", **PROVENANCE)
    assert files_under(tmp_path) == [parent]


def test_the_root_is_not_needed_without_file_keys(tmp_path: Path) -> None:
    parent = tmp_path / "a-file"
    parent.write_text("x")
    documents = validate(
        compose_documents([{"primary": {"x": 1}}], {}, {"img": "TIFF"}, root=parent / "data",
                          **PROVENANCE)
    )
    assert count_names(documents)["event"] == 1


def test_a_refused_run_has_not_even_created_its_root(tmp_path: Path) -> None:
    root = tmp_path / "never"
    data = good_events()
    data[1]["primary"]["img"] = np.zeros((9,), dtype="u2")
    with pytest.raises(DataValueError):
        compose_documents(data, {}, {"img": "NPY"}, root=root, **PROVENANCE)
    assert not root.exists()


def test_metadata_is_copied_into_the_start_document(tmp_path: Path) -> None:
    md = {"sample": "Si", "scan_id": 7, "nested": {"a": [1, 2]}}
    documents = validate(
        compose_documents([{"primary": {"x": 1}}], md, root=tmp_path, **PROVENANCE)
    )
    start = documents[0][1]
    assert {k: start[k] for k in md} == md
    assert start["parent_uids"] == [PARENT_UID]
    assert json.loads(json.dumps(start["provenance"])) == start["provenance"]
    assert os.path.isabs(start["provenance"]["code"][0]["file"])
