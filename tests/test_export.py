"""Exports of a derived run: a Workflow Run RO-Crate (its ``ro-crate-metadata.json`` parsed,
its data files read back) and a NeXus file (opened with h5py, its ``NXprocess`` checked),
through the functions and the ``export`` command."""

from __future__ import annotations

import json
import pathlib
import sys
import uuid

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from _helpers import run_command  # noqa: E402
from _offline_reducers import scaled_total  # noqa: E402

from bluesky_analysis_store import AnalysisStore, AnalysisStoreError, code_record  # noqa: E402
from bluesky_analysis_store._export import export_nexus, export_ro_crate  # noqa: E402

pytestmark = pytest.mark.usefixtures("isolated_env")

PARENT = "c6041c47-3333-4000-8000-000000000000"


@pytest.fixture(scope="module")
def child(store: AnalysisStore, tmp_path_factory: pytest.TempPathFactory) -> dict:
    data = tmp_path_factory.mktemp("inputs") / "counts.txt"
    data.write_text("1\n2\n")
    reducer = {**code_record(scaled_total), "params": {"factor": 2.0}}  # as reprocess records
    profiles = [np.linspace(0, n, 5) for n in range(3)]
    uid = store.save(
        [{"primary": {"total": float(n), "profile": profiles[n]}} for n in range(3)],
        {"sample": "Si"}, None,
        parents=[{"uid": PARENT, "time": 0.0}], files=[data], code=reducer,
    )  # fmt: skip
    provenance = store[uid].start["provenance"]
    return {"uid": uid, "file": data, "profiles": np.stack(profiles),
            "code": provenance["code"][0], "sha256": provenance["files"][0]["sha256"]}  # fmt: skip


def test_the_ro_crate_names_the_code_as_the_instrument_of_the_run(store, child, tmp_path):
    metadata_path = export_ro_crate(store, child["uid"][:8], tmp_path / "crate")
    crate = json.loads(metadata_path.read_text())
    assert crate["@context"] == "https://w3id.org/ro/crate/1.1/context"
    by_id = {entity["@id"]: entity for entity in crate["@graph"]}
    assert by_id["ro-crate-metadata.json"]["about"] == {"@id": "./"}
    root = by_id["./"]
    [action] = [e for e in crate["@graph"] if e["@type"] == "CreateAction"]
    assert root["mentions"] == [{"@id": action["@id"]}]
    assert action["identifier"] == child["uid"]
    assert action["actionStatus"] == {"@id": "http://schema.org/CompletedActionStatus"}
    [tool] = [by_id[ref["@id"]] for ref in action["instrument"]]
    assert tool["@type"] == "SoftwareApplication"
    assert tool["name"] == child["code"]["name"] == "_offline_reducers:scaled_total"
    assert tool["softwareVersion"] == child["code"]["version"]
    used = {ref["@id"] for ref in action["object"]}
    assert f"urn:bluesky:run:{PARENT}" in used
    assert f"file://{child['file']}" in used
    assert by_id[f"file://{child['file']}"]["sha256"] == child["sha256"]
    [params] = [by_id[i] for i in used if i.endswith("-params")]
    assert json.loads(params["value"]) == {"factor": 2.0}
    [result] = action["result"]
    assert result == {"@id": "primary.npz"} and {"@id": "primary.npz"} in root["hasPart"]
    with np.load(metadata_path.parent / "primary.npz") as arrays:
        np.testing.assert_array_equal(arrays["profile"], child["profiles"])
        np.testing.assert_array_equal(arrays["total"], [0.0, 1.0, 2.0])
    with pytest.raises(FileExistsError):
        export_ro_crate(store, child["uid"], tmp_path / "crate")


def test_the_nexus_file_has_the_data_and_an_nxprocess(store, child, tmp_path):
    import h5py

    path = export_nexus(store, child["uid"], tmp_path / "child.nxs")
    with h5py.File(path, "r") as file:
        entry = file["entry"]
        assert entry.attrs["NX_class"] == "NXentry"
        assert entry["entry_identifier"][()].decode() == child["uid"]
        assert entry["primary"].attrs["NX_class"] == "NXdata"
        np.testing.assert_array_equal(entry["primary/profile"][()], child["profiles"])
        process = entry["process"]
        assert process.attrs["NX_class"] == "NXprocess"
        assert process["program"][()].decode() == "_offline_reducers:scaled_total"
        assert process["version"][()].decode() == child["code"]["version"]
        assert process["date"][()].decode().startswith(str(np.datetime64("today"))[:4])
        notes = json.loads(process["notes/data"][()])
        assert notes["parent_uids"] == [PARENT]
        assert notes["files"][0]["sha256"] == child["sha256"]
        assert notes["exit_status"] == "success"
        parameters = process["parameters_0"]
        assert parameters.attrs["NX_class"] == "NXparameters"
        assert json.loads(parameters["factor"][()]) == 2.0
    with pytest.raises(FileExistsError):
        export_nexus(store, child["uid"], path)


def test_a_raw_run_is_not_exported(store):
    from event_model import compose_run

    bundle = compose_run()
    store("start", bundle.start_doc)
    store("stop", bundle.compose_stop())
    store.flush()
    with pytest.raises(AnalysisStoreError, match="is raw data"):
        export_nexus(store, bundle.start_doc["uid"], "unused.nxs")


def test_the_export_command(module_store_folder, child, tmp_path):
    base = ("--store", str(module_store_folder), "export", child["uid"][:8])
    status, out, err = run_command(*base, "--format", "nexus", "-o", str(tmp_path / "c.nxs"))
    assert (status, err) == (0, ""), err
    assert out == f"exported {child['uid']} as nexus: {tmp_path / 'c.nxs'}\n"
    status, out, err = run_command(*base, "--format", "ro-crate", "-o", str(tmp_path / "crate"))
    assert status == 0 and (tmp_path / "crate" / "ro-crate-metadata.json").is_file()
    status, _, err = run_command(*base, "--format", "nexus", "-o", str(tmp_path / "c.nxs"))
    assert status == 2 and err.startswith("bluesky-analysis-store: error: --output:"), err
    status, _, err = run_command("--store", str(module_store_folder), "export",
                                 str(uuid.uuid4()), "--format", "nexus", "-o", "x.nxs")  # fmt: skip
    assert status == 2 and "UID: no run" in err, err
