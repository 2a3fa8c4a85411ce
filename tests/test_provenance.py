"""Provenance: parents, input files, the code (installed, in a git checkout, a plain file) and
the environment, recorded in the start document; and the refusals of the strict check."""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging
import platform
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import tifffile
from _helpers import PARENT_UID, assert_empty_or_missing, make_frames, validate

from bluesky_analysis_store import (
    ProvenanceError,
    code_record,
    compose_documents,
    environment_record,
    make_provenance,
)
from bluesky_analysis_store._provenance import resolve_code_name

# Worker processes open the store again: served by its local server, in a fraction of a
# second each (see conftest's ``store``).
STORE_SERVED = True

pytestmark = pytest.mark.usefixtures("isolated_env")


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git(folder: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(folder), "-c", "user.name=Test", "-c", "user.email=test@example.org",
         *args],
        capture_output=True, text=True, check=True,
    )
    return result.stdout.strip()


def not_in_git(folder: Path) -> bool:
    return subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"],
                          capture_output=True).returncode != 0


REDUCER_SOURCE = '''
import numpy as np


def reduce(frame):
    """Sum a frame along its first axis."""
    return np.sum(frame, axis=0)


class Reducer:
    def __call__(self, frame):
        return frame

    def method(self, frame):
        return frame
'''


@pytest.fixture
def import_module_from(monkeypatch: pytest.MonkeyPatch):
    """Write ``REDUCER_SOURCE`` as a uniquely named module in a folder and import it."""
    imported: list[str] = []

    def make(folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        name = f"bas_test_reducers_{uuid.uuid4().hex[:12]}"
        (folder / f"{name}.py").write_text(REDUCER_SOURCE)
        monkeypatch.syspath_prepend(str(folder))
        imported.append(name)
        return importlib.import_module(name), folder / f"{name}.py"

    yield make
    for name in imported:
        sys.modules.pop(name, None)


# --- code -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("func", "distribution"), [(np.mean, "numpy"), (tifffile.imwrite, "tifffile")]
)
def test_code_from_an_installed_package(func, distribution) -> None:
    record = code_record(func)
    module_name, _, qualname = record["name"].partition(":")
    assert qualname == func.__qualname__ and module_name.split(".")[0] == distribution
    assert resolve_code_name(record["name"]) is func  # the name imports the very same code
    assert record["importable"] is True
    assert record["distribution"] == distribution
    assert record["version"] == metadata.version(distribution)
    assert record["url"].startswith("http")
    assert record["file"] == str(Path(inspect.getsourcefile(inspect.unwrap(func))).absolute())
    assert record["sha256"] == sha256(record["file"])
    # An installed package is not identified by a git checkout it may happen to lie in.
    assert "commit" not in record and "dirty" not in record


def test_code_in_a_git_checkout(tmp_path: Path, import_module_from) -> None:
    repo = tmp_path / "checkout"
    repo.mkdir()
    git(repo, "init", "-q")
    module, path = import_module_from(repo)
    git(repo, "add", path.name)
    git(repo, "commit", "-q", "-m", "reducers")
    head = git(repo, "rev-parse", "HEAD")

    record = code_record(module.reduce)
    assert record["name"] == f"{module.__name__}:reduce"
    assert record["importable"] is True
    assert record["commit"] == head
    assert record["dirty"] is False
    assert record["version"] == head
    assert record["file"] == str(path)
    assert record["sha256"] == sha256(path)
    assert "distribution" not in record

    # Read afresh: no cache to clear between an edit and the next record.
    path.write_text(REDUCER_SOURCE + "\n# changed after the commit\n")
    changed = code_record(module.reduce)
    assert changed["commit"] == head
    assert changed["dirty"] is True
    assert changed["sha256"] == sha256(path) != record["sha256"]


def test_an_untracked_file_in_a_git_checkout_is_identified_by_its_hash(
    tmp_path: Path, import_module_from
) -> None:
    repo = tmp_path / "checkout"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "README").write_text("tracked")
    git(repo, "add", "README")
    git(repo, "commit", "-q", "-m", "readme")
    module, path = import_module_from(repo)  # never added

    record = code_record(module.reduce)
    assert "commit" not in record
    assert record["version"] == "sha256:" + sha256(path)


def test_code_in_a_plain_file(tmp_path: Path, import_module_from) -> None:
    assert not_in_git(tmp_path)
    module, path = import_module_from(tmp_path / "scripts")
    record = code_record(module.reduce)
    assert record["name"] == f"{module.__name__}:reduce"
    assert record["importable"] is True
    assert record["version"] == "sha256:" + sha256(path)
    assert "commit" not in record and "distribution" not in record


def test_code_edited_on_disk_but_not_reloaded_is_not_named_by_its_file(
    tmp_path: Path, import_module_from, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    module, path = import_module_from(tmp_path / "edited")
    assert "edited_since_loaded" not in code_record(module.reduce)
    # The file changes under a running session: what would run is the old definition.
    path.write_text(REDUCER_SOURCE.replace("axis=0", "axis=1"))
    record = code_record(module.reduce)
    assert record["sha256"] == sha256(path)  # the file's hash, which no longer names the code
    assert "changed after 'reduce' was imported" in record["edited_since_loaded"]
    with pytest.raises(ProvenanceError, match="reload its module"):
        make_provenance([PARENT_UID], (), module.reduce)
    # Reloaded, the code is the file's again.
    importlib.reload(module)
    assert "edited_since_loaded" not in code_record(module.reduce)
    make_provenance([PARENT_UID], (), module.reduce)


def test_methods_partials_and_callable_instances(tmp_path: Path, import_module_from) -> None:
    module, _ = import_module_from(tmp_path / "scripts")
    assert code_record(module.Reducer().method)["name"] == f"{module.__name__}:Reducer.method"
    assert code_record(module.Reducer())["name"] == f"{module.__name__}:Reducer"
    partial = functools.partial(module.reduce, axis=1)
    assert code_record(partial)["name"] == f"{module.__name__}:reduce"
    assert code_record(partial)["importable"] is True


def test_an_explicit_code_record_is_kept() -> None:
    record = code_record({"name": "facility.pipeline:integrate", "version": "3.1"})
    assert record == {"importable": True, "name": "facility.pipeline:integrate", "version": "3.1"}
    with pytest.raises(ProvenanceError, match="needs at least a 'name'"):
        code_record({"version": "3.1"})
    with pytest.raises(ProvenanceError, match="not of the form"):
        resolve_code_name("no_colon")


def make_closure():
    offset = 3

    def shifted(frame):
        return frame + offset

    return shifted


@pytest.mark.parametrize(
    ("code", "shown"),
    [(lambda frame: frame * 2, "<lambda>"), (make_closure(), "<locals>.shifted")],
    ids=["lambda", "closure"],
)
def test_code_that_cannot_be_imported_again(code, shown, tmp_path: Path, caplog) -> None:
    record = code_record(code)
    assert record["importable"] is False
    assert shown in record["name"]

    with pytest.raises(ProvenanceError, match=f"{shown}.*cannot be imported again"):
        make_provenance(parents=[PARENT_UID], code=code)
    root = tmp_path / "root"
    with pytest.raises(ProvenanceError, match="strict=False"):
        compose_documents([{"primary": {"img": np.ones((2, 2))}}], {}, {"img": "TIFF"},
                          root=root, parents=[PARENT_UID], code=code)
    assert_empty_or_missing(root)

    with caplog.at_level(logging.WARNING, logger="bluesky_analysis_store._provenance"):
        documents = validate(
            compose_documents([{"primary": {"img": np.ones((2, 2))}}], {}, {"img": "TIFF"},
                              root=root, parents=[PARENT_UID], code=code, strict=False)
        )
    provenance = documents[0][1]["provenance"]
    assert provenance["strict"] is False
    assert len(provenance["missing"]) == 1 and shown in provenance["missing"][0]
    assert provenance["code"][0]["importable"] is False
    assert "incomplete provenance" in caplog.text


def test_no_parents_and_no_files(tmp_path: Path) -> None:
    with pytest.raises(ProvenanceError, match="no parent run uids and no input files"):
        make_provenance(code=np.mean)
    root = tmp_path / "root"
    with pytest.raises(ProvenanceError, match="origin"):
        compose_documents([{"primary": {"img": np.ones(3)}}], {}, {"img": "NPY"}, root=root,
                          code=np.mean)
    assert_empty_or_missing(root)
    _, provenance = make_provenance(code=np.mean, strict=False)
    assert provenance["strict"] is False and provenance["parents"] == provenance["files"] == []
    assert "origin" in provenance["missing"][0]


def test_no_code() -> None:
    with pytest.raises(ProvenanceError, match="no code given"):
        make_provenance(parents=[PARENT_UID])
    with pytest.raises(ProvenanceError, match="no code given"):
        compose_documents([{"primary": {"x": 1}}], {}, parents=[PARENT_UID])
    _, provenance = make_provenance(parents=[PARENT_UID], strict=False)
    assert provenance["code"] == [] and "no code given" in provenance["missing"][0]


def test_strict_provenance_is_recorded_as_strict() -> None:
    parent_uids, provenance = make_provenance(parents=PARENT_UID, code=np.mean)
    assert parent_uids == [PARENT_UID]
    assert provenance["strict"] is True and "missing" not in provenance


# --- files ------------------------------------------------------------------------------------


def test_input_files_are_recorded_with_their_hash(tmp_path: Path) -> None:
    first = tmp_path / "raw" / "frame.tif"
    first.parent.mkdir()
    tifffile.imwrite(first, make_frames("uint16", (8, 8), count=1)[0])
    second = tmp_path / "notes.txt"
    second.write_bytes(b"exposure 0.1 s\n")

    parent_uids, provenance = make_provenance(files=[first, str(second)], code=np.mean)
    assert parent_uids == []
    assert provenance["files"] == [
        {"path": str(first), "size": first.stat().st_size, "sha256": sha256(first)},
        {"path": str(second), "size": 15,
         "sha256": hashlib.sha256(b"exposure 0.1 s\n").hexdigest()},
    ]
    # A single path is one file, not a sequence of characters.
    assert len(make_provenance(files=second, code=np.mean)[1]["files"]) == 1
    with pytest.raises(ProvenanceError, match="does not exist"):
        make_provenance(files=[tmp_path / "missing.h5"], code=np.mean)


# --- parents ----------------------------------------------------------------------------------


def test_parents_as_uids_start_documents_and_records(tmp_path: Path) -> None:
    start = validate(compose_documents([{"primary": {"x": 1}}], {"raw": True},
                                       parents=["grandparent"], code=np.mean))[0][1]
    parents = [start, {"uid": "second", "streams": ["primary", "baseline"]}, "third"]
    documents = validate(
        compose_documents([{"primary": {"x": 1}}], {}, parents=parents, code=np.mean,
                          root=tmp_path)
    )
    child = documents[0][1]
    assert child["parent_uids"] == [start["uid"], "second", "third"]
    # A start document is its own evidence; a bare uid or a record was not checked.
    assert child["provenance"]["parents"] == [
        {"uid": start["uid"], "verified": True, "verified_by": "start document"},
        {"uid": "second", "streams": ["primary", "baseline"], "verified": False},
        {"uid": "third", "verified": False},
    ]
    # A single start document is one parent, not a sequence of its keys.
    assert make_provenance(parents=start, code=np.mean)[0] == [start["uid"]]
    with pytest.raises(ProvenanceError, match="cannot tell the uid"):
        make_provenance(parents=[{"streams": ["primary"]}], code=np.mean)


# --- environment ------------------------------------------------------------------------------


def test_environment_has_python_and_package_versions() -> None:
    _, provenance = make_provenance(parents=[PARENT_UID], code=tifffile.imwrite)
    environment = provenance["environment"]
    assert environment["python"] == platform.python_version()
    packages = environment["packages"]
    for name in ("numpy", "event-model", "bluesky", "tiled", "h5py", "tifffile",
                 "bluesky-analysis-store"):
        assert packages[name] == metadata.version(name)
    assert environment_record(["pytest"])["packages"]["pytest"] == metadata.version("pytest")
    assert "pytest" not in environment_record()["packages"]
    assert "no-such-distribution" not in environment_record(["no-such-distribution"])["packages"]


def test_provenance_reaches_the_start_document(tmp_path: Path) -> None:
    raw = tmp_path / "raw.npy"
    np.save(raw, np.arange(4))
    documents = validate(
        compose_documents([{"primary": {"x": 1}}], {"sample": "Si"},
                          parents=[PARENT_UID], files=[raw], code=[np.mean, tifffile.imwrite],
                          root=tmp_path)
    )
    start = documents[0][1]
    assert start["parent_uids"] == [PARENT_UID]
    provenance = start["provenance"]
    assert [c["distribution"] for c in provenance["code"]] == ["numpy", "tifffile"]
    assert provenance["files"][0]["sha256"] == sha256(raw)
    assert provenance["strict"] is True


# --- the worker process records the code it loaded ----------------------------------------

WORKER_REDUCER_V1 = '''
def total(data):
    return {"total": float(data["det"])}
'''
WORKER_REDUCER_V2 = WORKER_REDUCER_V1.replace('float(data["det"])', '2 * float(data["det"])')


@pytest.mark.slow
def test_a_restarted_worker_records_the_code_it_loaded(
    RE, store, make_callback, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog  # noqa: N803
) -> None:
    """A reducer from a module is pickled by reference: a new worker imports the module
    again, edited meanwhile, and its child runs must name that code, not the old one."""
    import os
    import signal
    import time

    from bluesky.plans import count
    from ophyd.sim import det

    folder = tmp_path / "reducers"
    folder.mkdir()
    name = f"bas_worker_reducers_{uuid.uuid4().hex[:12]}"
    path = folder / f"{name}.py"
    path.write_text(WORKER_REDUCER_V1)
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module(name)
    try:
        callback = make_callback([module.total])  # a worker process (the default)
        callback.subscribe(RE)
        (first_raw,) = RE(count([det], num=2))
        first_pid = callback.worker_pid

        path.write_text(WORKER_REDUCER_V2)  # edited while the callback runs
        os.kill(first_pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while callback.worker_pid == first_pid:
            assert time.monotonic() < deadline, "no new worker process after 60 s"
            time.sleep(0.05)
        with caplog.at_level(logging.WARNING, logger="bluesky_analysis_store"):
            (second_raw,) = RE(count([det], num=2))
    finally:
        sys.modules.pop(name, None)

    [first_child] = store.children(first_raw)
    [second_child] = store.children(second_raw)
    [first_code] = store[first_child].start["provenance"]["code"]
    [second_code] = store[second_child].start["provenance"]["code"]
    v1_sha = hashlib.sha256(WORKER_REDUCER_V1.encode()).hexdigest()
    v2_sha = hashlib.sha256(WORKER_REDUCER_V2.encode()).hexdigest()
    assert first_code["sha256"] == v1_sha and first_code["version"] == "sha256:" + v1_sha
    assert second_code["sha256"] == v2_sha and second_code["version"] == "sha256:" + v2_sha
    # The code recorded is the code that ran: the edited reducer doubles (det is constant).
    first_totals = store[first_child]["primary"]["total"].read()
    second_totals = store[second_child]["primary"]["total"].read()
    np.testing.assert_allclose(np.asarray(second_totals), 2 * np.asarray(first_totals))
    assert "is not the code the callback was made with" in caplog.text
