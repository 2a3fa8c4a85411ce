"""Tables and variable-length arrays: saved, read back equal, every way a user reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import event_model
import numpy as np
import pandas as pd
import pytest
from _helpers import PROVENANCE
from _live import children_of
from _tables import assert_read_back, edge_step, events, peak_lists, rows_of, spectra, spectrum
from bluesky.plans import scan

from bluesky_analysis_store import (
    AnalysisStore,
    AnalysisStoreCallback,
    AnalysisStoreError,
    DataKeyError,
    DataValueError,
    compose_documents,
)
from bluesky_analysis_store._filling import handler_registry

# --- through the embedded store, reopened --------------------------------------------------


def test_tables_and_variable_lengths_read_back_equal_from_a_reopened_store(shared_store, reader):
    tables, peaks = spectra(), peak_lists()
    uid = shared_store.save(events(tables, peaks), {"purpose": "tables"}, **PROVENANCE)

    assert_read_back(AnalysisStore.open(shared_store.location), uid, tables, peaks)
    # The data keys say what they hold: a row dtype, a variable number of rows.
    keys = reader[uid]["primary"].metadata["data_keys"]
    assert keys["spectrum"]["shape"] == [None]
    assert keys["spectrum"]["dtype_numpy"] == [
        ["energy", "<f8"], ["mu", "<f4"], ["counts", "<i2"], ["flag", "|b1"],
        ["channel", "<u4"], ["at", "<M8[us]"], ["edge", "|O8"],
    ]  # fmt: skip
    assert keys["peaks"] == {**keys["peaks"], "shape": [None], "dtype_numpy": "<f8"}
    # tiled's own client: one table per stream and key, its columns named by the key.
    through_tiled = reader.client[uid]["primary"].base["spectrum"].read()
    assert list(through_tiled.columns) == [
        "spectrum.seq_num", *(f"spectrum.{c}" for c in tables[0].columns)
    ]
    assert len(through_tiled) == sum(len(t) for t in tables)


def test_one_parquet_file_per_event_under_the_run(shared_store):
    tables, peaks = spectra(2), peak_lists(2)
    uid = shared_store.save(events(tables, peaks), {}, **PROVENANCE)
    folder = Path(shared_store.asset_root) / uid / "primary"
    assert sorted(p.name for p in (folder / "spectrum").iterdir()) == [
        "000000.parquet", "000001.parquet"
    ]  # fmt: skip
    assert len(list((folder / "peaks").iterdir())) == 2


def test_a_mapping_of_columns_is_a_table(shared_store, reader):
    columns = [{"q": np.linspace(0.1, 1.0, 5), "intensity": np.arange(5.0) * n} for n in range(2)]
    uid = shared_store.save([{"primary": {"pattern": c}} for c in columns], {}, **PROVENANCE)
    table = reader.read_stream(uid, keys=["pattern"])["pattern"]
    for n, original in enumerate(columns):
        pd.testing.assert_frame_equal(rows_of(table, n + 1), pd.DataFrame(original))


# --- through event-model's Filler, in resource style ----------------------------------------


def test_resource_documents_are_filled_back_to_the_same_tables(tmp_path):
    tables, peaks = spectra(), peak_lists()
    documents = list(
        compose_documents(
            events(tables, peaks), {}, root=tmp_path, asset_documents="resource", **PROVENANCE
        )
    )
    resources = [doc for name, doc in documents if name == "resource"]
    assert sorted(r["resource_kwargs"]["key"] for r in resources) == ["peaks", "spectrum"]
    assert {r["spec"] for r in resources} == {"BAS_PARQUET_TABLE"}  # one resource per key
    filled = []
    with event_model.Filler(handler_registry(), inplace=False) as filler:
        for name, doc in documents:
            _, doc = filler(name, doc)
            if name == "event":
                filled.append(doc["data"])
    assert len(filled) == len(tables)
    for data, table, found in zip(filled, tables, peaks, strict=True):
        pd.testing.assert_frame_equal(data["spectrum"], table)
        np.testing.assert_array_equal(data["peaks"], found)
        assert data["peaks"].dtype == found.dtype


# --- during a scan --------------------------------------------------------------------------


def test_a_reducer_returning_tables_during_a_scan(RE, store, motor):  # noqa: N803
    from ophyd.sim import SynGauss

    det = SynGauss("det", motor, "motor", center=0, Imax=1, sigma=1)
    # Variable-length keys are named before the scan: the first event's length is no promise.
    # The tables are made and written in the callback's worker process, as by default.
    callback = AnalysisStoreCallback([spectrum], store, writers={"peaks": "PARQUET"})
    callback.subscribe(RE)
    raw_events: list[dict[str, Any]] = []
    RE.subscribe(lambda name, doc: raw_events.append(doc) if name == "event" else None)
    (raw_uid,) = RE(scan([det], motor, -1, 1, 4))
    assert callback.flush(timeout=60)
    callback.close(timeout=60)

    (child,) = children_of(store, raw_uid)
    assert store.children(raw_uid)[0].events_failed == 0
    read = store.read_stream(child, keys=["spectrum", "peaks"])
    expected = [spectrum({"det": event["data"]["det"]}) for event in raw_events]
    assert len(expected) == 4
    for n, values in enumerate(expected):
        pd.testing.assert_frame_equal(rows_of(read["spectrum"], n + 1), values["spectrum"])
        np.testing.assert_array_equal(read["peaks"][n], values["peaks"])
    # The lengths did change from event to event: these are variable-length values.
    assert len({len(v["peaks"]) for v in expected}) > 1


# --- refused, before anything is written ----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (pd.DataFrame({"a": [1.0, 2.0]}, index=[3, 4]), "reset_index"),
        (pd.DataFrame({"a.b": [1.0]}), "column"),
        (pd.DataFrame({"seq_num": [1]}), "seq_num' is reserved"),
        (pd.DataFrame({"a": pd.Categorical(["x"])}), "dtype category"),
        (pd.DataFrame({"a": [1, "x"]}, dtype=object), "mixes strings"),
        (pd.DataFrame({"a": np.ones(2, dtype="c8")}), "dtype complex64"),
        ({"a": np.ones(2), "b": np.ones(3)}, "different lengths"),
        ({"a": np.ones((2, 2))}, "1-D"),
        (pd.DataFrame(), "no columns"),
    ],
)
def test_tables_the_store_would_not_give_back_are_refused(value, match, tmp_path):
    with pytest.raises(DataValueError, match=match):
        list(compose_documents([{"primary": {"t": value}}], {}, root=tmp_path, **PROVENANCE))
    assert not any(tmp_path.iterdir())


def test_a_table_changing_its_columns_or_going_to_another_format_is_refused(tmp_path):
    first, other = pd.DataFrame({"a": [1.0]}), pd.DataFrame({"b": [1.0]})
    with pytest.raises(DataValueError, match="changes its columns"):
        list(compose_documents([{"p": {"t": first}}, {"p": {"t": other}}], {}, root=tmp_path,
                               **PROVENANCE))
    with pytest.raises(DataValueError, match="written as Parquet files, not as BAS_HDF5"):
        list(compose_documents([{"p": {"t": first}}], {}, {"t": "HDF5"}, root=tmp_path,
                               **PROVENANCE))
    with pytest.raises(DataKeyError, match="reserved"):
        list(compose_documents([{"p": {"internal": first}}], {}, root=tmp_path, **PROVENANCE))
    assert not any(tmp_path.iterdir())


def test_variable_lengths_of_more_than_one_dimension_are_refused(tmp_path):
    data = [{"p": {"v": np.ones((n + 1, 2))}} for n in range(2)]
    with pytest.raises(DataValueError, match="changed its shape"):
        list(compose_documents(data, {}, root=tmp_path, **PROVENANCE))
    with pytest.raises(DataValueError, match="1-D arrays of any length"):
        list(compose_documents(data, {}, {"v": "PARQUET"}, root=tmp_path, **PROVENANCE))


# --- offline: reprocessed, reproduced, and read as the input of another reduction -------------


def test_a_chain_of_tables_is_reprocessed_and_reproduced(RE, store, motor):  # noqa: N803
    from ophyd.sim import SynGauss

    from bluesky_analysis_store import reprocess, reproduce

    det = SynGauss("det", motor, "motor", center=0, Imax=1, sigma=1)
    RE.subscribe(store)  # the raw run is saved in the store
    (raw,) = RE(scan([det], motor, -1, 1, 4))
    report = reprocess(store, raw, [spectrum], store, writers={"peaks": "PARQUET"})
    (child,) = report.saved.values()
    # The tables of the child are the input of a reduction in their turn.
    report = reprocess(store, child, [edge_step], store, derived=True)
    (grandchild,) = report.saved.values()
    tables = store.read_stream(child, keys=["spectrum", "peaks"])
    steps = store.read_stream(grandchild, keys=["step", "npeaks"])
    assert len({len(peaks) for peaks in tables["peaks"]}) > 1  # lengths vary
    for n in range(4):
        rows = rows_of(tables["spectrum"], n + 1)
        assert steps["step"][n] == rows["mu"].iloc[-1] - rows["mu"].iloc[0]
        assert steps["npeaks"][n] == len(tables["peaks"][n])
    # Re-running the recorded code gives the same tables, compared column by column.
    reproduced = reproduce(store, child)
    assert reproduced.values == "identical", str(reproduced)
    assert reproduce(store, grandchild).values == "identical"


# --- on the command line -----------------------------------------------------------------------


def test_show_plot_and_export_of_tables(shared_store, tmp_path, capsys):
    import h5py

    from bluesky_analysis_store.cli import main as command

    def main(argv: list[str]) -> int:
        try:
            return command(argv)
        except SystemExit as exit_:
            return int(exit_.code)

    tables, peaks = spectra(), peak_lists()
    uid = shared_store.save(events(tables, peaks), {}, **PROVENANCE)
    store = ["--store", shared_store.location]

    assert main(["show", uid, *store]) == 0
    shown = capsys.readouterr().out
    described = "spectrum  shape (3, None)  dtype table(energy float64, mu float32, counts int16"
    assert described in shown
    assert "peaks     shape (3, None)  dtype float64, variable length" in shown

    assert main(["plot", uid, "spectrum", "-o", str(tmp_path / "p.png"), *store]) == 2
    assert "holds tables or variable-length arrays" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()

    assert main(["export", uid, "--format", "nexus", "-o", str(tmp_path / "d.nxs"), *store]) == 0
    with h5py.File(tmp_path / "d.nxs") as nexus:
        data = nexus["entry/primary"]
        np.testing.assert_array_equal(
            data["spectrum.energy"][()], np.concatenate([t["energy"] for t in tables])
        )
        assert data["spectrum.seq_num"][()].tolist() == [1] * 4 + [2] * 5 + [3] * 6
        np.testing.assert_array_equal(data["peaks"][()], np.concatenate(peaks))
        assert data["peaks.offsets"][()].tolist() == [0, 0, 1, 3]
    assert main(["export", uid, "--format", "ro-crate", "-o", str(tmp_path / "crate"),
                 *store]) == 0  # fmt: skip
    with np.load(tmp_path / "crate" / "primary.npz") as arrays:
        assert arrays["spectrum.edge"].tolist() == [e for t in tables for e in t["edge"]]


def test_a_numeric_column_widens_across_events_where_the_cast_is_exact(shared_store):
    first = pd.DataFrame({"n": np.array([1, 2], dtype="i2"), "tag": ["a", "b"]})
    second = pd.DataFrame({"n": np.array([2.5, 4.0]), "tag": ["c", "d"]})
    uid = shared_store.save([{"p": {"t": first}}, {"p": {"t": second}}], {}, **PROVENANCE)
    table = shared_store.read_stream(uid, "p")["t"]
    assert table["n"].dtype == np.float64
    assert table["n"].tolist() == [1.0, 2.0, 2.5, 4.0]
    strings = pd.DataFrame({"n": ["1", "2"], "tag": ["a", "b"]})
    with pytest.raises(DataValueError, match="changes its type"):
        shared_store.save([{"p": {"t": first}}, {"p": {"t": strings}}], {}, **PROVENANCE)


def test_documents_of_tables_sent_to_the_store_one_by_one(shared_store, reader):
    tables, peaks = spectra(2), peak_lists(2)
    documents = list(
        compose_documents(events(tables, peaks), {}, root=shared_store.asset_root, **PROVENANCE)
    )
    for name, doc in documents:  # the store as a document callback, as RE.subscribe(store)
        shared_store(name, doc)
    shared_store.flush()  # the documents the store holds are written: another reader sees them
    assert_read_back(reader, documents[0][1]["uid"], tables, peaks)


def test_a_table_without_its_seq_num_column_is_refused_when_read(shared_store):
    """A run made by hand whose Parquet file lacks the column that gives rows their events."""
    run = event_model.compose_run()
    described = {"source": "x", "dtype": "array", "shape": [None],
                 "dtype_numpy": [["a", "<f8"]], "external": "STREAM:"}  # fmt: skip
    descriptor = run.compose_descriptor(name="primary", data_keys={"t": described})
    folder = Path(shared_store.asset_root) / run.start_doc["uid"]
    folder.mkdir()
    pd.DataFrame({"t.a": [1.0, 2.0]}).to_parquet(folder / "000000.parquet", index=False)
    resource = run.compose_stream_resource(
        mimetype="application/x-parquet", uri=f"file://localhost{folder}/", data_key="t",
        parameters={"key": "t", "columns": [["a", "<f8"]], "ragged": False},
    )  # fmt: skip
    datum = resource.compose_stream_datum(
        indices={"start": 0, "stop": 1}, seq_nums={"start": 1, "stop": 2},
        descriptor=descriptor.descriptor_doc,
    )  # fmt: skip
    for name, doc in [("start", run.start_doc), ("descriptor", descriptor.descriptor_doc),
                      ("stream_resource", resource.stream_resource_doc), ("stream_datum", datum),
                      ("event", descriptor.compose_event(data={}, timestamps={})),
                      ("stop", run.compose_stop())]:  # fmt: skip
        shared_store(name, doc)
    with pytest.raises(AnalysisStoreError, match="has no t.seq_num column"):
        shared_store.read_stream(run.start_doc["uid"])
