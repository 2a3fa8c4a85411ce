"""The embedded analysis store: opening and reopening it, saving runs (``save`` and as a document
callback), reading them back, finding the children of a parent run, and refusing assets the
store could not read."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from _helpers import (
    PARENT_UID,
    PROVENANCE,
    assert_same_array,
    count_names,
    docs_named,
    files_under,
    make_frames,
    validate,
)
from tiled.client.base import BaseClient
from tiled.queries import Key

from bluesky_analysis_store import (
    STORE_ENV,
    AnalysisStore,
    AssetLocationError,
    RunNotFoundError,
    compose_documents,
    make_provenance,
)
from bluesky_analysis_store._store import default_store_location

pytestmark = pytest.mark.usefixtures("isolated_env")


def save_child(store: AnalysisStore, parent_uid: str, value: float) -> str:
    return store.save([{"primary": {"value": value}}], {"purpose": "children"},
                      parents=[{"uid": parent_uid, "time": 0.0}], code=np.mean)


# --- opening ------------------------------------------------------------------------------------


def test_open_creates_the_store_and_a_reopened_store_finds_its_runs(
    shared_store: AnalysisStore, store_folder: Path
) -> None:
    assert (store_folder / "catalog.db").is_file()
    assert Path(shared_store.asset_root) == store_folder / "assets"
    assert shared_store.location == str(store_folder)
    frames = make_frames("float32", (3, 3))
    uid = shared_store.save([{"primary": {"img": f}} for f in frames], {"label": "reopen"},
                            {"img": "TIFF"}, **PROVENANCE)

    reopened = AnalysisStore.open(store_folder)
    assert uid in reopened
    run = reopened[uid]
    assert run.start["uid"] == uid and run.start["label"] == "reopen"
    assert_same_array(run["primary"]["img"].read(), np.stack(frames))
    # (No len() comparisons: tiled's client caches a container's length for a while.)


def test_default_location_comes_from_the_environment(
    shared_store: AnalysisStore, store_folder: Path, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    uid = save_child(shared_store, str(uuid.uuid4()), 1.0)
    monkeypatch.setenv(STORE_ENV, str(store_folder))
    store = AnalysisStore.open()
    assert store.location == str(store_folder)
    assert uid in store
    monkeypatch.delenv(STORE_ENV)
    monkeypatch.chdir(tmp_path)
    assert default_store_location() == "analysis-store"


def test_client_is_a_tiled_client(shared_store: AnalysisStore) -> None:
    assert isinstance(shared_store.client, BaseClient)
    uid = save_child(shared_store, str(uuid.uuid4()), 2.0)
    assert uid in shared_store.client
    assert shared_store.client[uid].start["uid"] == uid


def test_a_missing_run(shared_store: AnalysisStore) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(RunNotFoundError, match=missing):
        shared_store[missing]
    with pytest.raises(KeyError):
        shared_store[missing]
    assert missing not in shared_store
    assert 3 not in shared_store


# --- saving and reading -------------------------------------------------------------------------


def test_save_returns_the_uid_of_a_complete_run(
    shared_store: AnalysisStore, reader: AnalysisStore
) -> None:
    images = make_frames("uint16", (6, 5), count=3)
    uid = shared_store.save(
        [{"primary": {"img": images[n], "x": 0.5 * n, "label": f"p{n}"}} for n in range(3)]
        + [{"baseline": {"temperature": 293.5}}],
        {"sample": "Si", "nested": {"a": [1, 2]}},
        {"img": "HDF5"},
        **PROVENANCE,
    )
    assert uid in reader
    run = reader[uid]
    assert sorted(run) == ["baseline", "primary"]
    primary = reader.read_stream(uid, "primary", ["img", "x", "label"])
    assert_same_array(primary["img"], np.stack(images))
    np.testing.assert_array_equal(primary["x"], [0.0, 0.5, 1.0])
    assert list(primary["label"]) == ["p0", "p1", "p2"]
    np.testing.assert_array_equal(
        reader.read_stream(uid, "baseline", ["temperature"])["temperature"], [293.5]
    )
    assert run.start["sample"] == "Si" and run.start["nested"] == {"a": [1, 2]}
    assert run.start["parent_uids"] == [PARENT_UID]
    assert run.start["provenance"]["code"][0]["distribution"] == "numpy"
    assert run.stop["num_events"] == {"primary": 3, "baseline": 1}
    assert run.stop["exit_status"] == "success"


def test_len_counts_a_run_saved_just_now(shared_store: AnalysisStore) -> None:
    counts = [len(shared_store)]
    for n in range(2):
        shared_store.save([{"primary": {"x": n}}], {}, **PROVENANCE)
        counts.append(len(shared_store))  # within a second: tiled's client caches its own
    assert counts == [counts[0], counts[0] + 1, counts[0] + 2]


def test_inline_arrays_are_saved_and_read_back(
    shared_store: AnalysisStore, reader: AnalysisStore
) -> None:
    patterns = [np.linspace(0, n, 7, dtype="f4") for n in range(3)]
    uid = shared_store.save(
        [{"primary": {"pattern": patterns[n], "hkl": np.array([1, 1, n])}} for n in range(3)],
        {},
        None,  # no writers: the arrays stay inline in the events
        **PROVENANCE,
    )
    primary = reader.read_stream(uid, "primary", ["pattern", "hkl"])
    assert_same_array(primary["pattern"], np.stack(patterns))
    np.testing.assert_array_equal(primary["hkl"], [[1, 1, 0], [1, 1, 1], [1, 1, 2]])


def test_read_stream_gives_each_keys_values_in_fewer_requests(
    shared_store: AnalysisStore, reader: AnalysisStore
) -> None:
    frames = make_frames("uint16", (4, 5))
    uid = shared_store.save(
        [{"primary": {"total": float(f.sum()), "img": f, "hkl": np.array([1, n])}}
         for n, f in enumerate(frames)],
        {}, {"img": "HDF5"}, **PROVENANCE,
    )  # fmt: skip
    requests: list[str] = []
    hooks = reader.client.context.http_client.event_hooks
    hooks["request"].append(lambda request: requests.append(str(request.url)))
    try:
        read = reader.read_stream(uid)
        at_once = len(requests)
        primary = reader[uid]["primary"]
        one_by_one = {key: primary[key].read() for key in ("total", "img", "hkl")}
    finally:
        hooks["request"].pop()
    assert list(read) == ["total", "hkl", "img"]  # the table's columns, then the arrays
    for key, values in one_by_one.items():
        assert_same_array(read[key], values, key)
    assert_same_array(read["img"], np.stack(frames))
    assert at_once < len(requests) - at_once, requests
    asked = reader.read_stream(uid, keys=["seq_num", "total"])
    np.testing.assert_array_equal(asked["seq_num"], [1, 2, 3])
    with pytest.raises(KeyError, match="no key 'nope'.*'total'"):
        reader.read_stream(uid, keys=["nope"])
    with pytest.raises(KeyError, match="no stream 'baseline'"):
        reader.read_stream(uid, stream="baseline")
    with pytest.raises(RunNotFoundError):
        reader.read_stream(str(uuid.uuid4()))


def test_the_store_as_a_document_callback(
    shared_store: AnalysisStore, reader: AnalysisStore
) -> None:
    images = make_frames("int64", (4, 4), count=2)
    patterns = make_frames("float32", (10,), count=2)
    documents = validate(
        compose_documents(
            [{"primary": {"img": images[n], "pattern": patterns[n], "n": n}} for n in range(2)],
            {"via": "callback"}, {"img": "TIFF", "pattern": "NPY"},
            root=shared_store.asset_root, **PROVENANCE,
        )
    )
    for name, doc in documents:
        shared_store(name, doc)
    uid = documents[0][1]["uid"]
    run = reader[uid]
    assert run.start["via"] == "callback"
    primary = reader.read_stream(uid, "primary", ["img", "pattern", "n"])
    assert_same_array(primary["img"], np.stack(images))
    assert_same_array(primary["pattern"], np.stack(patterns))
    np.testing.assert_array_equal(primary["n"], [0, 1])
    assert run.stop["num_events"] == {"primary": 2}


def test_flush_makes_rows_of_an_open_run_visible(
    store_folder: Path, reader: AnalysisStore
) -> None:
    store = AnalysisStore.open(store_folder, flush_interval=3600)
    documents = validate(
        compose_documents([{"primary": {"x": float(n)}} for n in range(4)], {},
                          **PROVENANCE)
    )
    uid = documents[0][1]["uid"]
    *running, stop = documents
    for name, doc in running:
        store(name, doc)
    store.flush()
    np.testing.assert_array_equal(reader[uid]["primary"]["x"].read(), [0.0, 1.0, 2.0, 3.0])
    assert "stop" not in reader[uid].metadata
    store(*stop)
    assert reader[uid].stop["num_events"] == {"primary": 4}


# --- children -----------------------------------------------------------------------------------


def test_children_newest_first(shared_store: AnalysisStore) -> None:
    parent = str(uuid.uuid4())
    other = parent + "-other"  # contains ``parent``: a substring match would find its children
    first = save_child(shared_store, parent, 1.0)
    time.sleep(0.01)  # start times must differ for "newest first" to mean something
    second = save_child(shared_store, parent, 2.0)
    of_other = save_child(shared_store, other, 3.0)

    assert shared_store.children(parent) == [second, first]
    assert shared_store.children(other) == [of_other]
    with pytest.raises(RunNotFoundError, match="nor any run derived from it"):
        shared_store.children(str(uuid.uuid4()))
    # The first characters of a uid will do: of a run here, or of a parent runs here name.
    lone = str(uuid.uuid4())
    lone_child = save_child(shared_store, lone, 4.0)
    assert shared_store.children(lone[:8]) == [lone_child]
    assert shared_store.children(lone_child[:8]) == []  # a run of the store: no children
    with pytest.raises(RunNotFoundError, match="at least 5 characters"):
        shared_store.children(parent[:3])
    with pytest.raises(RunNotFoundError, match="not a run uid"):
        shared_store.children("../etc")
    assert shared_store[second].start["time"] > shared_store[first].start["time"]


def test_a_run_can_be_the_parent(shared_store: AnalysisStore) -> None:
    parent = save_child(shared_store, str(uuid.uuid4()), 1.0)
    parent_uids, provenance = make_provenance(parents=shared_store[parent], code=np.mean)
    assert parent_uids == [parent]
    assert provenance["parents"] == [
        {"uid": parent, "streams": ["primary"], "verified": True, "verified_by": "run client"}
    ]
    child = shared_store.save([{"primary": {"y": 1}}], {}, parents=shared_store[parent],
                              code=np.mean)
    assert shared_store.children(parent) == [child]


def test_search(shared_store: AnalysisStore) -> None:
    tag = uuid.uuid4().hex
    uid = shared_store.save([{"primary": {"x": 1}}], {"tag": tag}, **PROVENANCE)
    assert list(shared_store.search(Key("start.tag") == tag)) == [uid]


# --- assets the store could not read ------------------------------------------------------------


def test_save_refuses_files_outside_the_store_before_saving(
    shared_store: AnalysisStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    before = set(shared_store.client)
    refused = pytest.raises(AssetLocationError, match="outside the folders this store may read")
    with refused as caught:
        shared_store.save([{"primary": {"img": np.ones((2, 2))}}], {}, {"img": "TIFF"},
                          root=outside, **PROVENANCE)
    assert isinstance(caught.value, PermissionError)
    assert not outside.exists()  # refused before any file or folder was made there
    assert set(shared_store.client) == before


def test_callback_refuses_a_stream_resource_outside_the_store(
    shared_store: AnalysisStore, tmp_path: Path
) -> None:
    documents = validate(
        compose_documents([{"primary": {"img": np.ones((2, 2))}}], {}, {"img": "NPY"},
                          root=tmp_path / "outside", **PROVENANCE)
    )
    refused = []
    for name, doc in documents:
        try:
            shared_store(name, doc)
        except AssetLocationError:
            refused.append(name)
            break
    assert refused == ["stream_resource"]


def test_readable_folders_may_hold_assets(store_folder: Path, tmp_path: Path) -> None:
    raw = tmp_path / "beamline-data"
    store = AnalysisStore.open(store_folder, readable=[raw])
    assert str(raw) in store.readable_roots
    frames = make_frames("uint16", (3, 2))
    uid = store.save([{"primary": {"img": f}} for f in frames], {}, {"img": "TIFF"},
                     root=raw, **PROVENANCE)
    assert files_under(raw)
    assert_same_array(store[uid]["primary"]["img"].read(), np.stack(frames))


def test_saved_documents_are_valid(shared_store: AnalysisStore) -> None:
    documents = validate(
        compose_documents([{"primary": {"img": np.zeros((2, 2), dtype="u2")}}], {},
                          {"img": "HDF5"}, root=shared_store.asset_root, **PROVENANCE)
    )
    assert count_names(documents) == {"start": 1, "descriptor": 1, "stream_resource": 1,
                                      "stream_datum": 1, "event": 1, "stop": 1}
    for name, doc in documents:
        shared_store(name, doc)
    (resource,) = docs_named(documents, "stream_resource")
    assert resource["uri"].startswith(f"file://localhost{shared_store.asset_root}/")


@pytest.mark.parametrize(
    ("name", "break_it"),
    [
        ("event", lambda doc: {**doc, "seq_num": 2.5}),
        ("event", lambda doc: {**doc, "time": "noon"}),
        ("stream_datum", lambda doc: {**doc, "indices": {"start": "1", "stop": 2}}),
        ("stream_datum", lambda doc: {**doc, "seq_nums": {"start": 1.5, "stop": 2}}),
    ],
    ids=["event-float-seq-num", "event-str-time", "datum-str-index", "datum-float-seq-num"],
)
def test_a_document_breaking_the_schema_is_refused_after_valid_ones(
    shared_store: AnalysisStore, name: str, break_it
) -> None:
    """The store checks the schema once per layout of an event or stream datum: a document
    of another layout is still checked."""
    import jsonschema

    documents = list(
        compose_documents([{"primary": {"img": np.full((2, 2), n, dtype="u2")}} for n in range(2)],
                          {}, {"img": "HDF5"}, root=shared_store.asset_root, **PROVENANCE)
    )
    last = max(i for i, (doc_name, _) in enumerate(documents) if doc_name == name)
    for doc_name, doc in documents[:last]:
        shared_store(doc_name, doc)
    with pytest.raises(jsonschema.ValidationError):
        shared_store(name, break_it(documents[last][1]))


def test_children_carry_their_code_versions(shared_store: AnalysisStore) -> None:
    import numpy

    from bluesky_analysis_store import code_record

    parent = str(uuid.uuid4())
    uid = save_child(shared_store, parent, 1.0)
    (child,) = shared_store.children(parent)
    assert child == uid and isinstance(child, str)
    name = code_record(numpy.mean)["name"]
    assert child.code == [{"name": name, "version": numpy.__version__}]
    assert child.code_versions == f"{name} {numpy.__version__}"
    assert child.time == shared_store[uid].start["time"]


def test_a_pickled_store_opens_the_same_folder_again(tmp_path: Path) -> None:
    """How the callback's worker process gets a store of its own on the same catalog."""
    import pickle

    store = AnalysisStore.open(tmp_path / "store", readable=[tmp_path / "raw"])
    uid = store.save([{"primary": {"value": 1.5}}], {"purpose": "pickle"}, **PROVENANCE)

    copy = pickle.loads(pickle.dumps(store))

    assert copy is not store
    assert copy.location == store.location
    assert copy.asset_root == store.asset_root
    assert copy.readable_roots == store.readable_roots
    assert copy[uid]["primary"]["value"].read().tolist() == [1.5]


def test_a_store_around_a_given_client_cannot_be_pickled(tmp_path: Path) -> None:
    import pickle

    wrapped = AnalysisStore(AnalysisStore.open(tmp_path / "store").client)
    with pytest.raises(TypeError, match="AnalysisStore.open or AnalysisStore.from_uri"):
        pickle.dumps(wrapped)


def test_closing_a_stopped_runs_streams_can_wait_for_close_streams(tmp_path: Path) -> None:
    """What the live callback uses: the run and its stop are saved at once, and the requests
    that end its streams go out when asked for."""
    store = AnalysisStore.open(tmp_path / "store")
    closed: list[str] = []

    def record(request) -> None:
        if request.method == "DELETE" and "/stream/close/" in request.url.path:
            closed.append(request.url.path)

    store.client.context.http_client.event_hooks["request"].append(record)
    documents = list(
        compose_documents([{"primary": {"value": float(n)}} for n in range(3)], {},
                          **PROVENANCE)
    )
    uid = documents[0][1]["uid"]
    for name, doc in documents:
        store(name, doc, close_streams=False)

    assert closed == []
    reader = AnalysisStore.open(tmp_path / "store")
    assert reader[uid].metadata["stop"]["num_events"] == {"primary": 3}
    assert reader[uid]["primary"]["value"].read().tolist() == [0.0, 1.0, 2.0]

    store.close_streams()
    assert closed and all(uid in path for path in closed)
    assert any(path.rsplit("/", 1)[1] == uid for path in closed), closed  # the run itself
    count = len(closed)
    store.close_streams()
    store.flush()
    assert len(closed) == count, "streams are closed once"

    other = list(compose_documents([{"primary": {"value": 1.0}}], {}, **PROVENANCE))
    for name, doc in other:
        store(name, doc)  # the default: closed with the stop
    assert any(other[0][1]["uid"] in path for path in closed[count:])


def test_an_inline_array_changed_after_saving_keeps_its_saved_values(tmp_path: Path) -> None:
    """The store buffers rows until a flush: what it buffers must be a copy of the event's
    arrays (events of numbers and strings alone are copied more cheaply)."""
    store = AnalysisStore.open(tmp_path / "store", flush_interval=3600)
    documents = list(
        compose_documents(
            [{"primary": {"arr": np.arange(3.0) + 10 * n, "x": float(n)}} for n in range(2)],
            {}, **PROVENANCE,
        )
    )
    events = [doc for name, doc in documents if name == "event"]
    assert [type(e["data"]["arr"]) for e in events] == [np.ndarray] * 2, "inline arrays"
    for name, doc in documents[:-1]:
        store(name, doc)
    for event in events:
        event["data"]["arr"][:] = -1.0  # after the store was given them, before the flush
        event["data"]["x"] = -1.0
    store(*documents[-1])

    primary = AnalysisStore.open(tmp_path / "store").read_stream(
        documents[0][1]["uid"], "primary", ["arr", "x"]
    )
    np.testing.assert_array_equal(primary["arr"], [[0.0, 1.0, 2.0], [10, 11, 12]])
    assert primary["x"].tolist() == [0.0, 1.0]
