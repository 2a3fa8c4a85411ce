"""Confinement: no file is written outside its root, and no existing file is changed.

Each probe is what an adversarial (or careless) user would try: a stream name that climbs
out, a resource func returning ``../..`` or an absolute path, symlinks inside the root that
lead outside, an existing file at the target, two saves that would meet on one file,
handlers given ``root/../../..`` or an absolute resource path. Every test snapshots the
folders around (file contents hashed, links and folders listed) before and after, and
checks that the refusal came before anything was made: nothing outside changed, nothing
inside was written, and the store holds no run of the refused call.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import event_model
import numpy as np
import pytest
from _helpers import PROVENANCE, assert_same_array

from bluesky_analysis_store import (
    AnalysisStore,
    AnalysisStoreError,
    AssetExistsError,
    AssetLocationError,
    RunComposer,
    compose_documents,
)
from bluesky_analysis_store._writer_specs import resolve_writers
from bluesky_analysis_store.cli import main
from bluesky_analysis_store.formats import formats

FORMAT_NAMES = ("HDF5", "TIFF", "NPY")
IMAGE = np.arange(12, dtype="uint16").reshape(3, 4)


def snapshot(folder: Path) -> dict[str, str]:
    """Everything under ``folder``: each file's sha256, each link's target, each folder."""
    if not folder.exists():
        return {}
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                found[key] = "link -> " + os.readlink(path)
            elif path.is_dir():
                found[key] = "folder"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def files_in(folder: Path) -> list[str]:
    return sorted(k for k, v in snapshot(folder).items() if v != "folder")


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """A writer root and a folder beside it, ``outside``, holding a file of its own."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "precious.txt").write_text("must never change")
    return {"root": root, "outside": outside, "tmp": tmp_path}


def returning(path: str | Path, **resource_kwargs: Any) -> Callable[..., Mapping[str, Any]]:
    """A DBEP 6 resource func that always gives ``path``."""

    def resource(docs: Mapping[str, Any], data_key: str, **kwargs: Any) -> Mapping[str, Any]:
        return {"resource_path": str(path), "resource_kwargs": resource_kwargs}

    return resource


def long_form(fmt_name: str, root: Path, func: Callable[..., Any]) -> dict[str, Any]:
    fmt = formats[fmt_name]
    return {
        "img": {
            "writer": fmt.writer,
            "resource": {"func": func, "kwargs": {}},
            "root": str(root),
            "spec": fmt.spec,
        }
    }


def compose(writers_dict: Any, root: Path, data: Any = None, **kwargs: Any) -> list:
    """All documents of a run (writing its files), as ``store.save`` would compose them."""
    data = data if data is not None else [{"primary": {"img": IMAGE}}]
    return list(compose_documents(data, {}, writers_dict, root=root, **kwargs, **PROVENANCE))


def assert_refused_cleanly(
    places: dict[str, Path], before: dict[str, dict[str, str]], error: type = AssetLocationError
) -> None:
    assert snapshot(places["outside"]) == before["outside"], "something changed outside"
    assert snapshot(places["root"]) == before["root"], "something was written in the root"
    assert sorted(p.name for p in places["tmp"].iterdir()) == before["tmp"]


def before_of(places: dict[str, Path]) -> dict[str, Any]:
    return {
        "outside": snapshot(places["outside"]),
        "root": snapshot(places["root"]),
        "tmp": sorted(p.name for p in places["tmp"].iterdir()),
    }


# --- stream names and resource funcs that climb out ------------------------------------------


@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
def test_a_stream_name_climbing_out_writes_nothing(fmt_name, places) -> None:
    before = before_of(places)
    with pytest.raises(AnalysisStoreError):
        compose({"img": fmt_name}, places["root"], [{"../../../outside/s": {"img": IMAGE}}])
    assert_refused_cleanly(places, before)


@pytest.mark.parametrize("stream", ["../../../outside/s", "../outside", "..", "a/../../outside"])
def test_the_final_path_is_resolved_whatever_the_stream_name_check_lets_through(
    stream, places
) -> None:
    # The path check does not rely on stream names being checked first: the plan of a key
    # is made from the very stem a stream name gives.
    spec = resolve_writers({"img": "HDF5"}, places["root"])["img"]
    before = before_of(places)
    with pytest.raises(AssetLocationError):
        spec.plan({}, "img", f"{stream}/img")
    assert_refused_cleanly(places, before)


@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
@pytest.mark.parametrize(
    "path", ["../../x", "../outside/x", "sub/../../outside/x", "", ".", "sub/.."]
)
def test_a_resource_func_climbing_out_or_onto_the_root_writes_nothing(
    fmt_name, path, places
) -> None:
    before = before_of(places)
    with pytest.raises(AssetLocationError):
        compose(long_form(fmt_name, places["root"], returning(path)), places["root"])
    assert_refused_cleanly(places, before)


@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
def test_a_resource_func_returning_an_absolute_path_writes_nothing(fmt_name, places) -> None:
    before = before_of(places)
    for absolute in (places["tmp"] / "abs" / "x", places["outside"] / "x", Path("/tmp/abs/x")):
        with pytest.raises(AssetLocationError, match="absolute"):
            compose(long_form(fmt_name, places["root"], returning(absolute)), places["root"])
    assert not Path("/tmp/abs/x").exists()
    assert_refused_cleanly(places, before)


def test_a_resource_func_returning_no_path_is_a_clean_error(places) -> None:
    before = before_of(places)
    for made in ({"resource_path": None}, {"resource_path": 3}, {}, None):
        with pytest.raises(AnalysisStoreError):
            compose(long_form("HDF5", places["root"], lambda docs, key, made=made: made),
                    places["root"])

    def broken(docs: Any, key: str) -> Any:
        raise RuntimeError("the func itself fails")

    with pytest.raises(AnalysisStoreError, match="the func itself fails"):
        compose(long_form("HDF5", places["root"], broken), places["root"])
    assert_refused_cleanly(places, before)


# --- symlinks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
def test_a_symlink_inside_the_root_that_leads_outside_is_refused(fmt_name, places) -> None:
    (places["root"] / "link").symlink_to(places["outside"])
    before = before_of(places)
    with pytest.raises(AssetLocationError, match="symlinks resolved"):
        compose(long_form(fmt_name, places["root"], returning("link/x")), places["root"])
    assert_refused_cleanly(places, before)


@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
def test_a_symlinked_folder_deeper_in_the_path_is_refused(fmt_name, places) -> None:
    # root/sub is a real folder; root/sub/deeper a link out of the root.
    (places["root"] / "sub").mkdir()
    (places["root"] / "sub" / "deeper").symlink_to(places["outside"], target_is_directory=True)
    before = before_of(places)
    with pytest.raises(AssetLocationError):
        compose(long_form(fmt_name, places["root"], returning("sub/deeper/run/x")),
                places["root"])
    assert_refused_cleanly(places, before)


def test_a_symlink_that_stays_inside_the_root_is_fine(places) -> None:
    (places["root"] / "real").mkdir()
    (places["root"] / "alias").symlink_to(places["root"] / "real")
    documents = compose(long_form("HDF5", places["root"], returning("alias/x.h5")),
                        places["root"])
    assert (places["root"] / "real" / "x.h5").is_file()
    assert [d["uri"] for n, d in documents if n == "stream_resource"]


def test_a_live_composer_checks_each_path_before_its_writer_is_made(places) -> None:
    # The live callback builds a RunComposer and writes event by event, with no plan of
    # the whole run: its first value of a key is where the path is checked.
    (places["root"] / "link").symlink_to(places["outside"])
    writers = resolve_writers(
        {"img": {"resource": {"func": returning("link/x")}, "spec": "BAS_HDF5"}},
        places["root"],
    )
    composer = RunComposer({}, writers)
    composer.start()
    before = before_of(places)
    with pytest.raises(AssetLocationError):
        composer.event("primary", {"img": IMAGE})
    composer.close()
    assert_refused_cleanly(places, before)


# --- never writing into existing data --------------------------------------------------------


def _existing_target(fmt_name: str, root: Path) -> tuple[str, Path]:
    """A resource path under ``root`` where data of ``fmt_name`` already is."""
    fmt = formats[fmt_name]
    resource_path = fmt.resource_path("earlier/primary/img")
    writer = fmt.writer(os.path.join(root, resource_path), **fmt.default_resource_kwargs)
    writer(IMAGE + 100)
    writer.close()
    return resource_path, root / resource_path


@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
def test_an_existing_file_at_the_target_is_refused_and_left_alone(fmt_name, places) -> None:
    resource_path, _ = _existing_target(fmt_name, places["root"])
    fmt = formats[fmt_name]
    before = before_of(places)
    with pytest.raises(AssetExistsError):
        compose(long_form(fmt_name, places["root"], returning(resource_path)), places["root"])
    assert_refused_cleanly(places, before)
    # The writer itself refuses too, given the path directly.
    with pytest.raises(AssetExistsError):
        fmt.writer(os.path.join(places["root"], resource_path), **fmt.default_resource_kwargs)
    assert_refused_cleanly(places, before)
    handler = fmt.handler(os.path.join(places["root"], resource_path),
                          **fmt.default_resource_kwargs)
    assert_same_array(handler(index=0), IMAGE + 100)


def test_an_hdf5_file_with_another_dataset_is_not_fair_game(places) -> None:
    resource_path, path = _existing_target("HDF5", places["root"])
    before = before_of(places)
    with pytest.raises(AssetExistsError):
        formats["HDF5"].writer(str(path), dataset="other")
    assert_refused_cleanly(places, before)


def test_two_keys_of_one_run_may_not_share_a_file(places) -> None:
    shared = returning("same/place.h5")
    writers_dict = {
        key: {"resource": {"func": shared}, "spec": "BAS_HDF5"} for key in ("img", "mask")
    }
    before = before_of(places)
    with pytest.raises(AssetExistsError, match="where 'img' of stream 'primary' is written"):
        compose(writers_dict, places["root"], [{"primary": {"img": IMAGE, "mask": IMAGE}}])
    assert_refused_cleanly(places, before)


def test_a_refused_second_stream_leaves_the_first_unwritten(places) -> None:
    # Every file is planned before the first is written: a bad path for a later stream
    # must not leave the earlier stream's files behind.
    def per_stream(docs: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        name = docs["descriptor"]["name"]
        return {"resource_path": f"ok/{name}.h5" if name == "first" else "../escape.h5"}

    writers_dict = {"img": {"resource": {"func": per_stream}, "spec": "BAS_HDF5"}}
    data = [{"first": {"img": IMAGE}}, {"second": {"img": IMAGE}}]
    before = before_of(places)
    with pytest.raises(AssetLocationError):
        compose(writers_dict, places["root"], data)
    assert_refused_cleanly(places, before)


def test_default_paths_start_with_the_run_uid(places) -> None:
    documents = compose({"img": "TIFF", "other": "HDF5"}, places["root"],
                        [{"primary": {"img": IMAGE, "other": IMAGE}}],
                        asset_documents="resource")
    uid = documents[0][1]["uid"]
    paths = [d["resource_path"] for n, d in documents if n == "resource"]
    assert len(paths) == 2 and all(p.startswith(f"{uid}/primary/") for p in paths)


# --- through the store ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def confined_store(tmp_path_factory: pytest.TempPathFactory) -> AnalysisStore:
    return AnalysisStore.open(tmp_path_factory.mktemp("confined") / "store")


@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
def test_two_saves_that_would_meet_on_one_file(fmt_name, confined_store) -> None:
    assets = Path(confined_store.asset_root)
    fixed = formats[fmt_name].resource_path(f"shared-{fmt_name}/img")
    writers_dict = long_form(fmt_name, assets, returning(fixed))
    first = confined_store.save([{"primary": {"img": IMAGE}}], {}, writers_dict, **PROVENANCE)
    before = snapshot(assets)
    runs = set(confined_store.client)
    with pytest.raises(AssetExistsError):
        confined_store.save([{"primary": {"img": IMAGE * 2}}], {}, writers_dict, **PROVENANCE)
    assert snapshot(assets) == before  # the first run's file is untouched
    assert set(confined_store.client) == runs
    assert_same_array(confined_store[first]["primary"]["img"].read()[0], IMAGE)


def test_save_refuses_a_root_outside_the_store_before_making_it(
    confined_store, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    runs = set(confined_store.client)
    with pytest.raises(AssetLocationError, match="outside the folders this store may read"):
        confined_store.save([{"primary": {"img": IMAGE}}], {}, {"img": "HDF5"},
                            root=outside / "deep", **PROVENANCE)
    assert not outside.exists()
    assert set(confined_store.client) == runs


@pytest.mark.parametrize("background", [False, "thread"])
def test_a_live_callback_refuses_a_root_the_store_may_not_read(
    confined_store, tmp_path: Path, background
) -> None:
    from bluesky_analysis_store import AnalysisStoreCallback

    outside = tmp_path / "elsewhere"
    with pytest.raises(AssetLocationError, match="outside the folders this store may read"):
        AnalysisStoreCallback(
            lambda_free_total, confined_store, root=outside, background=background
        )
    assert not outside.exists()


def lambda_free_total(data: Mapping[str, Any]) -> dict[str, Any]:
    return {"total": float(np.sum(data["img"]))}


def test_save_refuses_a_root_symlinked_out_of_the_store(confined_store, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    assets = Path(confined_store.asset_root)
    link = assets / f"link-{tmp_path.name}"
    link.symlink_to(outside)
    before_assets, runs = snapshot(assets), set(confined_store.client)
    with pytest.raises(AssetLocationError):
        confined_store.save([{"primary": {"img": IMAGE}}], {}, {"img": "TIFF"}, root=link,
                            **PROVENANCE)
    with pytest.raises(AssetLocationError):  # the same link met by a resource func
        confined_store.save([{"primary": {"img": IMAGE}}], {},
                            long_form("NPY", assets, returning(f"{link.name}/x")), **PROVENANCE)
    assert snapshot(outside) == {}
    assert snapshot(assets) == before_assets
    assert set(confined_store.client) == runs


def test_save_may_not_widen_the_readable_folders(confined_store, tmp_path: Path) -> None:
    with pytest.raises(AnalysisStoreError, match="readable"):
        confined_store.save([{"primary": {"img": IMAGE}}], {}, {"img": "HDF5"},
                            root=tmp_path, readable_roots=[tmp_path], **PROVENANCE)
    assert not any(tmp_path.iterdir())


def test_the_store_refuses_documents_whose_templates_climb_out(confined_store) -> None:
    assets = confined_store.asset_root
    resource = {"uid": "r", "root": assets, "resource_path": "x", "spec": "AD_TIFF",
                "resource_kwargs": {"template": "../../../etc/%s", "filename": "f"}}
    with pytest.raises(AssetLocationError):
        confined_store.check_asset_location("resource", resource)
    stream_resource = {"uid": "s", "uri": f"file://localhost{assets}/run/",
                       "parameters": {"template": "../../../../etc/{:06d}.tif"}}
    with pytest.raises(AssetLocationError):
        confined_store.check_asset_location("stream_resource", stream_resource)
    confined_store.check_asset_location(  # a template inside the folder is fine
        "stream_resource", {**stream_resource, "parameters": {"template": "{:06d}.tif"}}
    )


# --- handlers, as event-model's Filler uses them ---------------------------------------------


def _fill(resource: dict[str, Any], registry: Mapping[str, Any]) -> Any:
    """Fill one datum of ``resource`` through event-model's Filler (no retries)."""
    filler = event_model.Filler(registry, inplace=False, retry_intervals=[])
    try:
        filler("resource", resource)
        datum = {"datum_id": f"{resource['uid']}/0", "resource": resource["uid"],
                 "datum_kwargs": {"index": 0}}
        filler("datum", datum)
        return filler.get_handler(resource)(**datum["datum_kwargs"])
    finally:
        filler.close()


@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
def test_handlers_through_the_filler_refuse_paths_out_of_their_root(fmt_name, places) -> None:
    fmt = formats[fmt_name]
    secret = fmt.resource_path("secret/primary/img")
    writer = fmt.writer(os.path.join(places["outside"], secret), **fmt.default_resource_kwargs)
    writer(IMAGE + 7)
    writer.close()
    root = str(places["root"])
    base = {"spec": fmt.spec, "root": root, "resource_kwargs": dict(fmt.default_resource_kwargs),
            "path_semantics": "posix", "run_start": ""}
    climbing = {**base, "uid": "climbing", "resource_path": f"../outside/{secret}"}
    up_and_up = {**base, "uid": "up", "resource_path": "../../.."}
    absolute = {**base, "uid": "absolute", "resource_path": str(places["outside"] / secret)}
    before = before_of(places)

    def refused(resource: dict[str, Any], registry: Mapping[str, Any]) -> None:
        with pytest.raises(Exception) as info:  # the Filler wraps what the handler raised
            _fill(resource, registry)
        error: BaseException | None = info.value
        while error is not None and not isinstance(error, AssetLocationError):
            error = error.__cause__
        assert isinstance(error, AssetLocationError), repr(info.value)

    plain = formats.handler_registry()
    refused(climbing, plain)
    refused(up_and_up, plain)
    confined = formats.handler_registry(roots=[root])
    for resource in (climbing, up_and_up, absolute):
        refused(resource, confined)
    (places["root"] / "link").symlink_to(places["outside"])
    refused({**base, "uid": "linked", "resource_path": f"link/{secret}"}, confined)
    assert_refused_cleanly(places, {**before, "root": snapshot(places["root"])})


# --- the readable folders -------------------------------------------------------------------


def test_readable_folders_are_only_those_given_and_ls_lists_them(
    confined_store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = Path(confined_store.location)
    assets = folder / "assets"
    # The saves of the tests above, to roots of their own too, added no folder.
    assert confined_store.readable_roots == [str(assets)]
    assert not (folder / "store.json").exists()
    raw = tmp_path / "raw"
    raw.mkdir()
    store = AnalysisStore.open(folder, readable=[raw])  # the owner's explicit setting
    assert store.readable_roots == [str(assets), str(raw)]
    store.save([{"primary": {"img": IMAGE}}], {}, {"img": "NPY"}, root=assets / "mine",
               **PROVENANCE)
    reopened = AnalysisStore.open(folder)
    assert reopened.readable_roots == [str(assets), str(raw)]
    assert (folder / "store.json").read_text().count('"') == 4  # "readable" and one folder

    capsys.readouterr()
    assert main(["--store", str(folder), "ls"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == f"# store {folder}; files readable under: {assets}, {raw}"
    # The JSON of ls stays a list of runs only.
    assert main(["--store", str(folder), "ls", "--json"]) == 0
    assert capsys.readouterr().out.lstrip().startswith("[")


def test_a_damaged_store_json_is_a_clean_error(tmp_path: Path) -> None:
    folder = tmp_path / "store"  # refused before any catalog is made
    folder.mkdir()
    (folder / "store.json").write_text('{"readable": "/"}')
    with pytest.raises(AnalysisStoreError, match="damaged"):
        AnalysisStore.open(folder)
    (folder / "store.json").write_text("{not json")
    with pytest.raises(AnalysisStoreError, match="cannot read"):
        AnalysisStore.open(folder)


def test_ingesting_one_file_twice_gives_two_runs_and_leaves_the_first_files_alone(
    confined_store, tmp_path: Path
) -> None:
    from bluesky_analysis_store import ingest

    source = tmp_path / "frames.npy"
    np.save(source, IMAGE)
    assets = Path(confined_store.asset_root)
    first = ingest(source, store=confined_store, writer="HDF5")
    first_files = {k: v for k, v in snapshot(assets).items() if k.startswith(first)}
    second = ingest(source, store=confined_store, writer="HDF5")
    assert first != second
    assert {k: v for k, v in snapshot(assets).items() if k.startswith(first)} == first_files
    assert any(k.startswith(second) for k in snapshot(assets))  # a folder of its own
    for uid in (first, second):
        assert_same_array(confined_store[uid]["primary"]["image"].read()[0], IMAGE)
