"""The safe 0MQ encoding (``zmq_dumps``/``zmq_loads``) and what the worker does with what it
receives (``DocumentGate``, ``SafeRemoteDispatcher.receive``), in this process."""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from bluesky.plans import count, scan
from ophyd.sim import hw

from bluesky_analysis_store import AnalysisStoreError
from bluesky_analysis_store._errors import MessageError
from bluesky_analysis_store._remote_worker import DocumentGate, SafeRemoteDispatcher
from bluesky_analysis_store._zmq_documents import NDARRAY_EXT_TYPE, zmq_dumps, zmq_loads


def _same(a: Any, b: Any) -> bool:
    """Equal as documents: tuples are lists after the trip, numpy scalars Python numbers."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and np.asarray(a).dtype == b.dtype
            and np.array_equal(a, b, equal_nan=b.dtype.kind in "fc")
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, np.generic):
        return a.item() == b
    return a == b and type(a) is type(b)


def test_a_real_runs_documents_come_back_equal(RE: Any, tmp_path: Path) -> None:  # noqa: N803
    sim = hw(save_path=str(tmp_path))
    documents: list[tuple[str, dict[str, Any]]] = []
    RE.subscribe(lambda name, doc: documents.append((name, doc)))
    RE(scan([sim.det, sim.img], sim.motor, -1, 1, 3))
    RE(count([sim.direct_img], num=2))  # arrays inside the events
    names = {name for name, _ in documents}
    assert {"start", "descriptor", "resource", "datum", "event", "stop"} <= names
    for name, doc in documents:
        back = zmq_loads(zmq_dumps(doc))
        assert _same(doc, back), name
    inline = [
        key
        for name, doc in documents
        if name == "event"
        for key, value in doc["data"].items()
        if isinstance(value, np.ndarray)
    ]
    assert inline, "some events carry arrays"


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.uint16).reshape(3, 4),
        np.arange(12, dtype=">i4").reshape(4, 3).T,  # big-endian, not contiguous
        np.array([1.5, np.nan, -np.inf], dtype=np.float32),
        np.array([True, False]),
        np.array([1 + 2j], dtype=np.complex128),
        np.array(["ab", "c"]),
        np.array(["2026-12-01"], dtype="datetime64[D]"),
        np.zeros((0, 5)),
        np.array(3.0),
        np.zeros(2, dtype=[("a", "<f4"), ("b", "<i8", (2,))]),
    ],
    ids=lambda a: str(a.dtype),
)
def test_arrays_keep_dtype_shape_and_values(array: np.ndarray) -> None:
    back = zmq_loads(zmq_dumps({"data": {"x": array}}))["data"]["x"]
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    assert back.tobytes() == array.copy(order="C").tobytes()
    back[...] = back  # writable: a reducer may work in place
    assert back.flags.writeable


def test_numpy_scalars_become_python_values() -> None:
    back = zmq_loads(zmq_dumps({"a": np.float32(2.5), "b": np.int64(7), "c": np.bool_(True)}))
    assert back == {"a": 2.5, "b": 7, "c": True}
    assert [type(v) for v in back.values()] == [float, int, bool]


@pytest.mark.parametrize(
    "value",
    [
        np.array([object(), 1], dtype=object),
        np.zeros(1, dtype=[("a", "O")]),
        object(),
        {1, 2},
    ],
    ids=["object array", "object field", "object", "set"],
)
def test_values_that_are_not_plain_data_are_refused_when_sent(value: Any) -> None:
    with pytest.raises(MessageError):
        zmq_dumps({"data": {"x": value}})
    assert issubclass(MessageError, AnalysisStoreError)


class _TouchOnLoad:
    """Unpickled, it creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def _ext(header: list[Any]) -> bytes:
    payload = msgpack.packb(header, use_bin_type=True)
    return msgpack.packb({"x": msgpack.ExtType(NDARRAY_EXT_TYPE, payload)}, use_bin_type=True)


def _received(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    yield "a pickle", pickle.dumps({"uid": _TouchOnLoad(tmp_path / "unpickled")})
    yield "empty", b""
    yield "not msgpack", b"\xc1\xc1"
    yield "trailing bytes", zmq_dumps({}) + b"\x00"
    yield "a list", msgpack.packb([1, 2])
    yield "integer keys", msgpack.packb({1: 2})
    yield "an unknown extension", msgpack.packb({"x": msgpack.ExtType(7, b"")})
    yield "an object dtype", _ext(["|O", [1], b"\x00" * 8])
    yield "a structured object dtype", _ext([[["a", "|O"]], [1], b"\x00" * 8])
    yield "not a dtype", _ext(["nonsense", [1], b""])
    yield "too few bytes", _ext(["<f8", [2, 2], b"\x00" * 8])
    yield "a negative size", _ext(["<f8", [-1], b""])
    yield "a boolean size", _ext(["<f8", [True], b"\x00" * 8])
    yield "a header of two", _ext(["<f8", [1]])


def test_anything_but_the_encoding_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    for what, data in _received(tmp_path):
        with pytest.raises(MessageError):
            zmq_loads(data)
            pytest.fail(f"{what} was accepted")
    assert not (tmp_path / "unpickled").exists()


# --- what the worker lets through ---------------------------------------------------------


@pytest.mark.slow
def test_an_ophyd_async_run_through_the_encoding_and_the_gate_is_reduced_relocated(
    RE: Any,  # noqa: N803
    shared_store: Any,
    tmp_path: Path,
) -> None:
    """stream_resource/stream_datum documents (HDF5 of a SimBlobDetector) cross the
    encoding and the gate; their URIs name the acquisition machine's mount, and the root map
    finds the files here."""
    import h5py
    from _remote_reducers import detector_total
    from bluesky.plans import count as count_plan
    from ophyd_async import sim
    from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider
    from ophyd_async.plan_stubs import ensure_connected

    from bluesky_analysis_store import AnalysisStoreCallback

    store = shared_store
    folder = tmp_path / "blob"
    folder.mkdir()
    acquisition_mount = "/acquisition-machine/blob"
    detector = sim.SimBlobDetector(
        StaticPathProvider(UUIDFilenameProvider(), folder), sim.PatternGenerator(), name="det"
    )
    callback = AnalysisStoreCallback(
        [detector_total], store, background=False, root_map={acquisition_mount: str(folder)}
    )
    gate = DocumentGate(callback)
    names: list[str] = []
    files: list[str] = []

    def over_the_wire(name: str, doc: dict[str, Any]) -> None:
        if name == "stream_resource":
            files.append(doc["uri"].removeprefix("file://localhost"))
            doc = {**doc, "uri": doc["uri"].replace(str(folder), acquisition_mount)}
        names.append(name)
        gate(name, zmq_loads(zmq_dumps(doc)))

    RE.subscribe(over_the_wire)
    try:
        RE(ensure_connected(detector))
        (raw_uid,) = RE(count_plan([detector], num=3))
    finally:
        callback.close(timeout=60)
    assert {"stream_resource", "stream_datum"} <= set(names)
    assert gate.ignored == 0
    [child_uid] = store.children(raw_uid)
    child = store[child_uid]
    assert child.stop["exit_status"] == "success"
    [path] = sorted(set(files))[:1]
    with h5py.File(path, "r", swmr=True, locking=False) as file:
        frames = np.asarray(file["/entry/data/data"], dtype=np.float64)
    np.testing.assert_array_equal(
        child["primary"]["det_total"].read(), frames.reshape(3, -1).sum(axis=1)
    )


class _Recorder:
    def __init__(self) -> None:
        self.documents: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.documents.append((name, doc))


def _two_runs(RE: Any, tmp_path: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:  # noqa: N803
    sim = hw(save_path=str(tmp_path))
    documents: list[tuple[str, dict[str, Any]]] = []
    RE.subscribe(lambda name, doc: documents.append((name, zmq_loads(zmq_dumps(doc)))))
    uids = [*RE(count([sim.img], num=3)), *RE(count([sim.det], num=2))]
    return documents, uids


def test_a_run_joined_midway_is_dropped_with_one_warning(
    RE: Any,  # noqa: N803
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    documents, (first, second) = _two_runs(RE, tmp_path)
    joined_at = next(i for i, (name, _) in enumerate(documents) if name == "event")
    sink = _Recorder()
    gate = DocumentGate(sink)
    with caplog.at_level(logging.WARNING, "bluesky_analysis_store._remote_worker"):
        for name, doc in documents[joined_at:]:
            gate(name, doc)
    runs = {doc["uid"] for name, doc in sink.documents if name == "start"}
    assert runs == {second}
    assert [n for n, _ in sink.documents] == [n for n, d in documents if _of(d, documents, second)]
    assert len([r for r in caplog.records if "did not see" in r.message]) == 1
    assert gate.ignored == sum(1 for _, d in documents[joined_at:] if _of(d, documents, first))


def _of(doc: dict[str, Any], documents: list[tuple[str, dict[str, Any]]], run: str) -> bool:
    """Whether ``doc`` belongs to run ``run``."""
    descriptors = {d["uid"] for n, d in documents if n == "descriptor" and d["run_start"] == run}
    resources = {d["uid"] for n, d in documents if n == "resource" and d["run_start"] == run}
    return (
        doc.get("uid") == run
        or doc.get("run_start") == run
        or doc.get("descriptor") in descriptors
        or doc.get("resource") in resources
    )


def test_events_lost_in_transit_are_told(
    RE: Any,  # noqa: N803
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    documents, (first, _) = _two_runs(RE, tmp_path)
    lost = [d for n, d in documents if n == "event" and _of(d, documents, first)][1]
    sink = _Recorder()
    gate = DocumentGate(sink)
    with caplog.at_level(logging.WARNING, "bluesky_analysis_store._remote_worker"):
        for name, doc in documents:
            if doc is not lost:
                gate(name, doc)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("events 2 to 2 of stream ")
    assert first in warning
    assert len(sink.documents) == len(documents) - 1


def test_a_silent_run_is_ended_after_run_timeout(
    RE: Any,  # noqa: N803
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    documents, (first, second) = _two_runs(RE, tmp_path)
    raw_stop = next(i for i, (n, d) in enumerate(documents) if n == "stop")
    sink = _Recorder()
    gate = DocumentGate(sink, run_timeout=60.0)
    for name, doc in documents[:raw_stop]:  # the first run, without its stop
        gate(name, doc)
    assert gate.expire() == []  # not silent long enough
    with caplog.at_level(logging.WARNING, "bluesky_analysis_store._remote_worker"):
        assert gate.expire(time.monotonic() + 60.0) == [first]
    name, stop = sink.documents[-1]
    assert name == "stop"
    assert stop["run_start"] == first
    assert stop["exit_status"] == "fail"
    assert "no stop document came" in stop["reason"]
    assert any(first in r.getMessage() for r in caplog.records)
    received = len(sink.documents)
    for name, doc in documents[raw_stop:]:  # its late stop is dropped; the next run is not
        gate(name, doc)
    assert [n for n, _ in sink.documents[received:]] == [
        n for n, d in documents[raw_stop:] if _of(d, documents, second)
    ]
    assert gate.expire(time.monotonic() + 3600) == []  # nothing open


def test_malformed_documents_and_failing_sinks_do_not_stop_the_gate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    def sink(name: str, doc: dict[str, Any]) -> None:
        calls.append(name)
        raise RuntimeError("the callback broke")

    gate = DocumentGate(sink)
    start = {"uid": "u1", "time": 1.0}
    with caplog.at_level(logging.WARNING, "bluesky_analysis_store._remote_worker"):
        gate("start", {"uid": "u0"})  # no time: not a start document
        gate("bulk_events", {})
        gate("start", start)
        gate("stop", {"uid": "s1", "run_start": "u1", "time": 2.0, "exit_status": "success"})
    assert calls == ["start", "stop"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("a malformed start document was skipped" in m for m in messages)
    assert any("'bulk_events' document is not handled" in m for m in messages)
    assert sum("the analysis callback failed" in m for m in messages) == 2


@pytest.fixture
def dispatcher() -> Iterator[SafeRemoteDispatcher]:
    dispatcher = SafeRemoteDispatcher("tcp://127.0.0.1:9")  # never started: no socket
    yield dispatcher
    dispatcher.loop.close()


def test_the_dispatcher_skips_what_it_cannot_decode(
    dispatcher: SafeRemoteDispatcher, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = _Recorder()
    dispatcher.subscribe(sink)
    start = {"uid": "u1", "time": 1.0}
    with caplog.at_level(logging.WARNING, "bluesky_analysis_store._remote_worker"):
        for _, data in _received(tmp_path):
            dispatcher.receive(b" start " + data)
        dispatcher.receive(b"nospaces")
        dispatcher.receive(b" \xff\xfe " + zmq_dumps(start))
        dispatcher.receive(b" bogus " + zmq_dumps(start))
        dispatcher.receive(b" start " + zmq_dumps(start))
    assert sink.documents == [("start", start)]
    assert dispatcher.malformed == len(list(_received(tmp_path))) + 3
    assert not (tmp_path / "unpickled").exists()
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_a_prefix_selects_a_publisher(tmp_path: Path) -> None:
    dispatcher = SafeRemoteDispatcher("tcp://127.0.0.1:9", prefix=b"bl01")
    try:
        sink = _Recorder()
        dispatcher.subscribe(sink)
        start = {"uid": "u1", "time": 1.0}
        dispatcher.receive(b"bl02 start " + zmq_dumps(start))
        dispatcher.receive(b"bl01 start " + zmq_dumps(start))
        assert sink.documents == [("start", start)]
        assert dispatcher.malformed == 0
    finally:
        dispatcher.loop.close()
