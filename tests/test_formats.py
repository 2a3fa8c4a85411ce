"""The file formats: every writer/handler pair round-trips arrays, through the handler
contract, through legacy resource/datum documents filled by event-model with the handlers
installed as ``databroker.handlers`` entry points, and through stream documents saved into
and read back from the analysis store; and the registry that finds the formats."""

from __future__ import annotations

import dataclasses
import os
import shutil
from importlib.metadata import entry_points
from pathlib import Path

import event_model
import numpy as np
import pytest
from _helpers import (
    DTYPES,
    FORMAT_NAMES,
    FRAME_SHAPES,
    HANDLER_SPECS,
    PROVENANCE,
    assert_same_array,
    count_names,
    docs_named,
    files_under,
    make_frames,
    validate,
)

from bluesky_analysis_store import (
    AnalysisStore,
    AnalysisStoreError,
    FileFormat,
    FormatRegistry,
    FormatRegistryError,
    Handler,
    Writer,
    compose_documents,
    formats,
)
from bluesky_analysis_store.formats import (
    ENTRY_POINT_GROUP,
    HDF5_FORMAT,
    NPY_FORMAT,
    PARQUET_FORMAT,
    TIFF_FORMAT,
)

pytestmark = pytest.mark.usefixtures("isolated_env")

MATRIX = [
    pytest.param(fmt, dtype, shape, id=f"{fmt}-{dtype}-{'x'.join(map(str, shape))}")
    for fmt in FORMAT_NAMES
    for dtype in DTYPES
    for shape in FRAME_SHAPES
]


def entry_point_handlers() -> dict[str, type]:
    """The handler registry built only from the installed ``databroker.handlers`` entry points."""
    return {
        ep.name: ep.load()
        for ep in entry_points(group="databroker.handlers")
        if ep.name in HANDLER_SPECS
    }


def events_of(documents, stream: str = "primary") -> list[dict]:
    descriptors = {d["uid"] for d in docs_named(documents, "descriptor") if d["name"] == stream}
    return [e for e in docs_named(documents, "event") if e["descriptor"] in descriptors]


# --- c. the writer/handler contract, format by format ---------------------------------------


@pytest.mark.parametrize(("fmt_name", "dtype", "shape"), MATRIX)
def test_writer_handler_contract(fmt_name, dtype, shape, tmp_path: Path) -> None:
    fmt = formats[fmt_name]
    frames = make_frames(dtype, shape, count=4)
    full_path = os.path.join(tmp_path, fmt.resource_path("run/primary/img"))

    writer = fmt.writer(full_path, **fmt.default_resource_kwargs)
    assert isinstance(writer, Writer)
    datum_kwargs = [writer(frame) for frame in frames]
    writer.close()
    assert all(isinstance(kwargs, dict) for kwargs in datum_kwargs)
    assert len({repr(sorted(kwargs.items())) for kwargs in datum_kwargs}) == len(frames)

    handler = fmt.handler(full_path, **fmt.default_resource_kwargs)
    assert isinstance(handler, Handler)
    for frame, kwargs in zip(frames, datum_kwargs, strict=True):
        assert_same_array(handler(**kwargs), frame)
    # Everything lies under the resource's full path.
    written = files_under(tmp_path)
    assert written
    assert all(str(path).startswith(full_path.rstrip("/")) for path in written)


def test_writers_leave_the_layout_their_suffix_promises(tmp_path: Path) -> None:
    frames = make_frames("uint16", (3, 4), count=3)
    for fmt in (TIFF_FORMAT, HDF5_FORMAT, NPY_FORMAT):
        full_path = os.path.join(tmp_path, fmt.resource_path(f"{fmt.name}/img"))
        writer = fmt.writer(full_path, **fmt.default_resource_kwargs)
        for frame in frames:
            writer(frame)
        writer.close()
    assert [p.name for p in files_under(tmp_path / "TIFF" / "img")] == [
        "000000.tif",
        "000001.tif",
        "000002.tif",
    ]
    assert [p.name for p in files_under(tmp_path / "HDF5")] == ["img.h5"]
    assert [p.name for p in files_under(tmp_path / "NPY")] == [
        "img_0.npy",
        "img_1.npy",
        "img_2.npy",
    ]


# --- a. legacy resource/datum documents, filled by event-model ------------------------------


def test_handlers_are_installed_as_databroker_entry_points() -> None:
    handlers = entry_point_handlers()
    assert handlers == {
        fmt.spec: fmt.handler for fmt in (TIFF_FORMAT, HDF5_FORMAT, NPY_FORMAT, PARQUET_FORMAT)
    }


@pytest.mark.parametrize(("fmt_name", "dtype", "shape"), MATRIX)
def test_resource_documents_filled_by_entry_point_handlers(
    fmt_name, dtype, shape, tmp_path: Path
) -> None:
    fmt = formats[fmt_name]
    frames = make_frames(dtype, shape)
    root = tmp_path / "writer-root"
    data = [{"primary": {"img": frame, "n": n}} for n, frame in enumerate(frames)]

    documents = validate(
        compose_documents(
            data, {"purpose": "test"}, {"img": fmt_name}, root=root,
            asset_documents="resource", **PROVENANCE,
        )
    )

    (resource,) = docs_named(documents, "resource")  # one resource, not one per event
    assert resource["spec"] == fmt.spec
    assert resource["root"] == str(root)
    assert not os.path.isabs(resource["resource_path"])
    assert not resource["resource_path"].startswith(str(root))
    assert resource["resource_kwargs"] == dict(fmt.default_resource_kwargs)
    full_path = os.path.join(resource["root"], resource["resource_path"])
    written = files_under(root)
    assert written and all(str(path).startswith(full_path.rstrip("/")) for path in written)
    datums = docs_named(documents, "datum")
    assert len(datums) == len(frames) == count_names(documents)["event"]
    assert all(d["resource"] == resource["uid"] for d in datums)

    filler = event_model.Filler(entry_point_handlers(), inplace=False)
    filled_events = []
    for name, doc in documents:
        _, filled = filler(name, doc)
        if name == "event":
            filled_events.append(filled)
    filler.close()

    assert len(filled_events) == len(frames)
    for n, (event, frame) in enumerate(zip(filled_events, frames, strict=True)):
        assert_same_array(event["data"]["img"], frame)
        assert event["data"]["n"] == n
    # inplace=False: the documents themselves still hold the datum ids.
    for event, datum in zip(events_of(documents), datums, strict=True):
        assert event["data"]["img"] == datum["datum_id"]
        assert event["filled"] == {"img": False}


def test_resource_paths_are_relative_so_a_root_map_relocates_them(tmp_path: Path) -> None:
    frames = make_frames("float32", (4, 4))
    root = tmp_path / "original"
    documents = validate(
        compose_documents(
            [{"primary": {"tif": f, "h5": f, "npy": f}} for f in frames], {},
            {"tif": "TIFF", "h5": "HDF5", "npy": "NPY"}, root=root,
            asset_documents="resource", **PROVENANCE,
        )
    )
    moved = tmp_path / "moved"
    shutil.move(root, moved)
    filler = event_model.Filler(
        entry_point_handlers(), inplace=False, root_map={str(root): str(moved)}
    )
    events = [filler(name, doc)[1] for name, doc in documents]
    events = [doc for doc, (name, _) in zip(events, documents, strict=True) if name == "event"]
    filler.close()
    for event, frame in zip(events, frames, strict=True):
        for key in ("tif", "h5", "npy"):
            assert_same_array(event["data"][key], frame)
    assert len(events) == len(frames)


def test_one_resource_per_stream_and_data_key(tmp_path: Path) -> None:
    images = make_frames("uint16", (5, 6), count=4)
    patterns = make_frames("float32", (9,), count=4, seed=1)
    darks = make_frames("uint16", (5, 6), count=2, seed=2)
    data = [
        {"primary": {"image": images[n], "pattern": patterns[n], "x": float(n)}}
        for n in range(4)
    ]
    data[0]["dark"] = {"image": darks[0], "pattern": patterns[0], "x": -1.0}
    data[3]["dark"] = {"image": darks[1], "pattern": patterns[1], "x": -2.0}

    documents = validate(
        compose_documents(
            data, {}, {"image": "TIFF", "pattern": "HDF5"}, root=tmp_path,
            asset_documents="resource", **PROVENANCE,
        )
    )

    resources = docs_named(documents, "resource")
    assert len(resources) == 4
    assert len({r["resource_path"] for r in resources}) == 4
    datums_per_resource = {r["uid"]: 0 for r in resources}
    for datum in docs_named(documents, "datum"):
        datums_per_resource[datum["resource"]] += 1
    events_per_stream = {s: len(events_of(documents, s)) for s in ("primary", "dark")}
    assert events_per_stream == {"primary": 4, "dark": 2}
    assert sorted(datums_per_resource.values()) == [2, 2, 4, 4]

    filler = event_model.Filler(entry_point_handlers(), inplace=False)
    filled = {"primary": [], "dark": []}
    stream_of = {}
    for name, doc in documents:
        _, out = filler(name, doc)
        if name == "descriptor":
            stream_of[doc["uid"]] = doc["name"]
        if name == "event":
            filled[stream_of[doc["descriptor"]]].append(out)
    filler.close()
    for n, event in enumerate(filled["primary"]):
        assert_same_array(event["data"]["image"], images[n])
        assert_same_array(event["data"]["pattern"], patterns[n])
    for n, event in enumerate(filled["dark"]):
        assert_same_array(event["data"]["image"], darks[n])
        assert_same_array(event["data"]["pattern"], patterns[n])


# --- b. stream documents through the analysis store ------------------------------------------


def matrix_key(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype}_{'x'.join(map(str, shape))}"


@pytest.fixture(scope="module")
def saved_matrix(shared_store: AnalysisStore) -> dict[str, tuple[str, dict[str, list]]]:
    """One run per format, saved with ``store.save``, holding a key per dtype and frame shape.

    (One run per format rather than per case: each save costs a round of catalog writes.)
    """
    saved = {}
    for fmt_name in FORMAT_NAMES:
        frames = {
            matrix_key(dtype, shape): make_frames(dtype, shape, seed=len(shape))
            for dtype in DTYPES
            for shape in FRAME_SHAPES
        }
        data = [
            {"primary": {**{key: f[n] for key, f in frames.items()}, "n": n}} for n in range(3)
        ]
        uid = shared_store.save(data, {"fmt": fmt_name}, dict.fromkeys(frames, fmt_name),
                                **PROVENANCE)
        saved[fmt_name] = (uid, frames)
    return saved


@pytest.mark.parametrize(("fmt_name", "dtype", "shape"), MATRIX)
def test_saved_and_read_back_through_the_store(
    fmt_name, dtype, shape, saved_matrix, shared_store: AnalysisStore, reader: AnalysisStore
) -> None:
    uid, frames = saved_matrix[fmt_name]
    key = matrix_key(dtype, shape)

    run = reader[uid]  # a separate store object: read from the catalog and the files
    assert_same_array(run["primary"][key].read(), np.stack(frames[key]))
    assert_same_array(run["primary"]["n"].read(), np.arange(3))
    assert run.start["fmt"] == fmt_name
    assert run.stop["num_events"] == {"primary": 3}
    descriptor_key = run["primary"].descriptors[0]["data_keys"][key]
    assert descriptor_key["shape"] == list(shape)
    assert descriptor_key["dtype_numpy"] == np.dtype(dtype).str
    # The files are where the store said it writes them.
    assert files_under(Path(shared_store.asset_root) / uid / "primary")


@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
def test_stream_documents_one_stream_resource_per_stream_and_key(
    fmt_name, shared_store: AnalysisStore
) -> None:
    fmt = formats[fmt_name]
    images = make_frames("int64", (4, 3), count=3)
    patterns = make_frames("float32", (8,), count=3, seed=1)
    dark = make_frames("int64", (4, 3), count=1, seed=2)[0]
    data = [{"primary": {"image": images[n], "pattern": patterns[n]}} for n in range(3)]
    data[1]["dark"] = {"image": dark, "pattern": patterns[0]}

    documents = validate(
        compose_documents(
            data, {}, {"image": fmt_name, "pattern": fmt_name}, root=shared_store.asset_root,
            **PROVENANCE,
        )
    )

    counts = count_names(documents)
    assert counts["stream_resource"] == 4
    assert counts["stream_datum"] == 2 * counts["event"] == 2 * 4
    assert "resource" not in counts and "datum" not in counts
    descriptors = {d["uid"]: d for d in docs_named(documents, "descriptor")}
    resources = docs_named(documents, "stream_resource")
    assert len({r["uri"] for r in resources}) == 4
    for resource in resources:
        assert resource["mimetype"] == fmt.mimetype
        assert resource["uri"].startswith("file://localhost" + str(shared_store.asset_root))
        datums = [
            d for d in docs_named(documents, "stream_datum")
            if d["stream_resource"] == resource["uid"]
        ]
        stream = descriptors[datums[0]["descriptor"]]["name"]
        assert len(datums) == {"primary": 3, "dark": 1}[stream]
        assert [d["indices"] for d in datums] == [
            {"start": i, "stop": i + 1} for i in range(len(datums))
        ]
        assert [d["seq_nums"]["start"] for d in datums] == list(range(1, len(datums) + 1))
    for descriptor in descriptors.values():
        for key in ("image", "pattern"):
            assert descriptor["data_keys"][key]["external"] == "STREAM:"

    for name, doc in documents:
        shared_store(name, doc)
    run = shared_store[documents[0][1]["uid"]]
    assert_same_array(run["primary"]["image"].read(), np.stack(images))
    assert_same_array(run["primary"]["pattern"].read(), np.stack(patterns))
    assert_same_array(run["dark"]["image"].read(), dark[np.newaxis])
    assert_same_array(run["dark"]["pattern"].read(), patterns[0][np.newaxis])


# --- d. the registry ----------------------------------------------------------------------------


@pytest.fixture
def registry() -> FormatRegistry:
    """A registry of its own (entry points loaded), so that tests leave ``formats`` alone."""
    return FormatRegistry()


def test_lookup_by_short_name_and_by_spec(registry: FormatRegistry) -> None:
    for fmt in (TIFF_FORMAT, HDF5_FORMAT, NPY_FORMAT, PARQUET_FORMAT):
        assert registry[fmt.name] is fmt
        assert registry[fmt.spec] is fmt
        assert fmt.name in registry and fmt.spec in registry
        assert formats[fmt.name] is fmt
    assert {fmt.name for fmt in registry} == {"TIFF", "HDF5", "NPY", "PARQUET"}
    assert {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} >= HANDLER_SPECS


def test_unknown_format_is_a_key_error(registry: FormatRegistry) -> None:
    with pytest.raises(FormatRegistryError, match="unknown format 'JPEG'.*HDF5, NPY, PARQUET, TIFF"):
        registry["JPEG"]
    with pytest.raises(KeyError):
        registry["JPEG"]
    assert "JPEG" not in registry
    with pytest.raises(FormatRegistryError, match="JPEG"):
        list(compose_documents([{"primary": {"img": np.zeros(3)}}], {}, {"img": "JPEG"},
                               **PROVENANCE))


def test_a_different_format_under_a_taken_spec_or_name_is_refused(
    registry: FormatRegistry,
) -> None:
    same_spec = dataclasses.replace(TIFF_FORMAT, name="TIFF2", suffix=".tiffs/")
    with pytest.raises(FormatRegistryError, match="BAS_TIFF_SERIES.*overwrite=True"):
        registry.register(same_spec)
    same_name = dataclasses.replace(TIFF_FORMAT, spec="OTHER_TIFF_SPEC")
    with pytest.raises(FormatRegistryError, match="'TIFF'"):
        registry.register(same_name)
    # A refusal changes nothing.
    assert "TIFF2" not in registry and "OTHER_TIFF_SPEC" not in registry
    assert registry["TIFF"] is TIFF_FORMAT and registry["BAS_TIFF_SERIES"] is TIFF_FORMAT
    with pytest.raises(FormatRegistryError, match="not a FileFormat"):
        registry.register(TIFF_FORMAT.writer)


def test_registering_the_identical_format_again_is_fine(registry: FormatRegistry) -> None:
    registry.register(HDF5_FORMAT)
    registry.register(dataclasses.replace(HDF5_FORMAT))  # equal, not the same object
    assert registry["HDF5"] == HDF5_FORMAT
    assert len(list(registry)) == 4


def test_overwrite_replaces(registry: FormatRegistry) -> None:
    replacement = dataclasses.replace(NPY_FORMAT, suffix="_frames")
    registry.register(replacement, overwrite=True)
    assert registry["NPY"] is replacement
    assert registry["BAS_NPY_SERIES"] is replacement
    assert formats["NPY"] is NPY_FORMAT  # the package's registry is untouched


def test_a_new_format_can_be_registered(registry: FormatRegistry) -> None:
    custom = FileFormat(
        name="RAW", spec="TEST_RAW", writer=NPY_FORMAT.writer, handler=NPY_FORMAT.handler,
        mimetype="application/octet-stream", suffix=".raw",
    )
    registry.register(custom)
    assert registry["RAW"] is custom and registry["TEST_RAW"] is custom
    assert registry.handler_registry()["TEST_RAW"] is NPY_FORMAT.handler


def test_handler_registry(registry: FormatRegistry) -> None:
    expected = {
        "BAS_TIFF_SERIES": TIFF_FORMAT.handler,
        "BAS_HDF5": HDF5_FORMAT.handler,
        "BAS_NPY_SERIES": NPY_FORMAT.handler,
        "BAS_PARQUET_TABLE": PARQUET_FORMAT.handler,
    }
    assert registry.handler_registry() == expected
    assert formats.handler_registry().items() >= expected.items()
    assert entry_point_handlers() == expected


def test_registry_without_entry_points_starts_empty() -> None:
    registry = FormatRegistry(load_entry_points=False)
    assert list(registry) == [] and registry.handler_registry() == {}
    with pytest.raises(FormatRegistryError):
        registry["TIFF"]
    registry.register(TIFF_FORMAT)
    assert registry["TIFF"] is TIFF_FORMAT


def test_stream_uri_and_parameters() -> None:
    assert TIFF_FORMAT.stream_uri("/data/run/primary/img/") == "file://localhost/data/run/primary/img/"
    assert HDF5_FORMAT.stream_uri("/data/run/primary/img.h5") == (
        "file://localhost/data/run/primary/img.h5"
    )
    assert TIFF_FORMAT.stream_parameters({"template": "{:06d}.tif"}, (5, 6)) == {
        "template": "{:06d}.tif",
        "chunk_shape": [1, 5, 6],
    }
    assert HDF5_FORMAT.stream_parameters({"dataset": "data"}, (7,)) == {
        "dataset": "data",
        "chunk_shape": [1, 7],
        "swmr": True,
        "locking": False,
    }


def test_a_writer_no_format_describes_cannot_make_stream_documents(tmp_path: Path) -> None:
    class PlainWriter(NPY_FORMAT.writer):
        pass

    writers = {"img": {"writer": PlainWriter, "spec": "BAS_NPY_SERIES"}}
    with pytest.raises(AnalysisStoreError, match="PlainWriter.*asset_documents='resource'"):
        list(compose_documents([{"primary": {"img": np.zeros(3)}}], {}, writers,
                               root=tmp_path, **PROVENANCE))
