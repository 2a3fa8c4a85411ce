"""Where derived data came from: parent runs, input files, the code and its environment.

The record goes into the child run's start document as ``parent_uids`` (top level, so that
it can be searched) and ``provenance``. Code is identified by ``module:qualname`` plus the
version of the distribution that installed it, or the git commit of the checkout it lives
in, or the sha256 of its source file, so that :func:`reproduce` can import the very same
code again and check that it is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any

from event_model import DocumentNames, schema_validators

from ._errors import ProvenanceError
from ._recorded_code import edited_since_loaded, recorded_code_fields

__all__ = [
    "CheckedParent",
    "ParentSpec",
    "check_parents",
    "code_identity",
    "code_record",
    "environment_record",
    "file_record",
    "make_provenance",
    "resolve_code_name",
]

logger = logging.getLogger(__name__)

# Distributions whose versions decide how documents are made, written and read.
TRACKED_DISTRIBUTIONS = (
    "bluesky-analysis-store",
    "bluesky",
    "event-model",
    "ophyd",
    "ophyd-async",
    "databroker",
    "tiled",
    "bluesky-tiled-plugins",
    "numpy",
    "tifffile",
    "h5py",
)

ParentSpec = str | Mapping[str, Any] | Any
"""A parent: a run uid, a start document, ``{"uid": ..., "streams": [...]}``, or a run client."""


def sha256_of_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The absolute path, size and sha256 of one input file."""
    absolute = os.path.abspath(os.fspath(path))
    if not os.path.isfile(absolute):
        raise ProvenanceError(f"input file {absolute!r} does not exist or is not a file")
    return {
        "path": absolute,
        "size": os.path.getsize(absolute),
        "sha256": sha256_of_file(absolute),
    }


@dataclasses.dataclass(frozen=True)
class CheckedParent:
    """A parent run whose existence was checked: by :func:`check_parents` against a
    catalog, or because its start document was seen (the live callback, ``reprocess``)."""

    uid: str
    verified_by: str
    """How: ``"start document"``, ``"run client"``, or ``"catalog"`` (its uid was found)."""
    streams: tuple[str, ...] | None = None


def _is_start_document(parent: Mapping[str, Any]) -> bool:
    if "time" not in parent:  # a record ``{"uid": ..., "streams": [...]}`` has none
        return False
    try:
        schema_validators[DocumentNames.start].validate(dict(parent))
    except Exception:
        return False
    return True


def parent_record(parent: ParentSpec) -> dict[str, Any]:
    """``{"uid": ..., "streams": [...], "verified": ...}`` from a uid, a start document, a
    run client, a record or a :class:`CheckedParent`.

    ``verified`` is True only for a parent that is known to exist: a run client, a start
    document, or a uid checked against a catalog (:func:`check_parents`); a bare uid or a
    record is recorded ``verified: False``, never trusted silently.
    """
    if isinstance(parent, CheckedParent):
        record: dict[str, Any] = {"uid": parent.uid}
        if parent.streams is not None:
            record["streams"] = list(parent.streams)
        return {**record, "verified": True, "verified_by": parent.verified_by}
    if isinstance(parent, str):
        return {"uid": parent, "verified": False}
    start = getattr(parent, "start", None)
    if isinstance(start, Mapping) and "uid" in start:  # a tiled BlueskyRun client
        return {
            "uid": start["uid"],
            "streams": sorted(parent),
            "verified": True,
            "verified_by": "run client",
        }
    if isinstance(parent, Mapping) and isinstance(parent.get("uid"), str):
        record = {"uid": parent["uid"]}
        if "streams" in parent:
            record["streams"] = list(parent["streams"])
        if _is_start_document(parent):
            return {**record, "verified": True, "verified_by": "start document"}
        return {**record, "verified": False}
    raise ProvenanceError(
        f"cannot tell the uid of parent {parent!r}: give a uid, a start document or a run"
    )


def check_parents(catalog: Any, parents: Iterable[ParentSpec] | ParentSpec) -> list[ParentSpec]:
    """``parents`` with every bare uid (and ``{"uid": ...}`` record) looked up in
    ``catalog`` (anything that answers ``uid in catalog``: a store, a tiled client);
    :class:`ProvenanceError` names those it does not hold. Run clients and start documents
    are kept: they are their own evidence."""
    checked: list[ParentSpec] = []
    unknown: list[str] = []
    for parent in _as_list(parents):
        record = parent_record(parent)
        if record["verified"]:
            checked.append(parent)
        elif record["uid"] in catalog:
            streams = tuple(record["streams"]) if "streams" in record else None
            checked.append(CheckedParent(record["uid"], "catalog", streams))
        else:
            unknown.append(record["uid"])
    if unknown:
        raise ProvenanceError(
            f"parent run(s) {unknown} are not in {_catalog_name(catalog)}: a derived run may "
            "name only parents that exist; pass the parent's run client or start document "
            "(read from the catalog that holds it) instead of its uid"
        )
    return checked


def _catalog_name(catalog: Any) -> str:
    location = getattr(catalog, "location", None)
    return f"the catalog {location}" if location else "the catalog"


@functools.cache
def _module_distributions() -> Mapping[str, list[str]]:
    # Reads the file list of every installed distribution: about half a second.
    return metadata.packages_distributions()


def index_distributions() -> None:
    """Learn now which distribution provides each top-level module, so that the first
    code record of this process, or of a process forked from it, does not wait for it."""
    _module_distributions()


def _distribution_of(module_name: str) -> metadata.Distribution | None:
    top_level = module_name.split(".", 1)[0]
    for dist_name in _module_distributions().get(top_level, []):
        try:
            return metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _distribution_url(dist: metadata.Distribution) -> str | None:
    md = dist.metadata
    if url := md.get("Home-page"):
        return url
    for entry in md.get_all("Project-URL") or []:
        _, _, url = entry.partition(",")
        if url.strip():
            return url.strip()
    return None


def _git(folder: str, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", folder, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _git_state(folder: str) -> tuple[str, bool] | None:
    """The checkout's commit and whether it has uncommitted changes, read now: an edit, or
    a commit, made earlier in the same session must change the identity (about 5 ms)."""
    commit = _git(folder, "rev-parse", "HEAD")
    if not commit:
        return None
    changes = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return commit, bool(changes)


def _git_tracks(path: str) -> bool:
    """Whether git tracks ``path``: a file merely inside a checkout (an installed package in a
    virtualenv under it, an untracked script) is not identified by that checkout's commit."""
    folder, name = os.path.split(path)
    return _git(folder, "ls-files", "--error-unmatch", "--", name) is not None


def _unwrap(obj: Any) -> Any:
    """The function or class that holds the code: partials and instances are looked through."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    obj = inspect.unwrap(obj) if callable(obj) else obj
    if inspect.ismethod(obj):
        obj = obj.__func__
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
        obj = type(obj)  # a callable instance: its class is the code
    return obj


def resolve_code_name(name: str) -> Any:
    """Import ``module:qualname`` and return the object it names."""
    module_name, _, qualname = name.partition(":")
    if not module_name or not qualname:
        raise ProvenanceError(f"code name {name!r} is not of the form 'module:qualname'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ProvenanceError(f"cannot import module {module_name!r}: {error}") from error
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ProvenanceError(f"module {module_name!r} has no {qualname!r}") from None
    return obj


def code_record(code: Callable[..., Any] | Mapping[str, Any]) -> dict[str, Any]:
    """Identify a piece of code; an explicit record (a mapping with ``name``) is kept as given."""
    if isinstance(code, Mapping):
        if "name" not in code:
            raise ProvenanceError(f"a code record needs at least a 'name': {dict(code)!r}")
        return {"importable": True, **code}
    target = _unwrap(code)
    module_name = getattr(target, "__module__", None) or "__main__"
    qualname = getattr(target, "__qualname__", getattr(target, "__name__", repr(target)))
    record: dict[str, Any] = {"name": f"{module_name}:{qualname}"}

    importable = "<lambda>" not in qualname and "<locals>" not in qualname
    if importable:
        try:
            importable = _unwrap(resolve_code_name(record["name"])) is target
        except ProvenanceError:
            importable = False
    record["importable"] = importable

    source_file = None
    try:
        source_file = inspect.getsourcefile(target)
    except (TypeError, OSError):
        pass
    if source_file:
        source_file = os.path.abspath(source_file)
        record["file"] = source_file
        if os.path.isfile(source_file):
            record["sha256"] = sha256_of_file(source_file)

    dist = _distribution_of(module_name) if module_name != "__main__" else None
    if dist is not None:
        record["distribution"] = dist.metadata["Name"]
        record["version"] = dist.version
        if url := _distribution_url(dist):
            record["url"] = url
    if (
        source_file
        and _git_tracks(source_file)
        and (state := _git_state(os.path.dirname(source_file)))
    ):
        record["commit"], record["dirty"] = state
        record.setdefault("version", state[0])
    if "version" not in record and "sha256" in record:
        record["version"] = "sha256:" + record["sha256"]
    # Code of __main__ (a script, a profile, the prompt) cannot be imported elsewhere: its
    # definition's source is recorded, so that reproduce never runs the file it came from.
    record.update(recorded_code_fields(target, record))
    if "sha256" in record and (edited := edited_since_loaded(target)):
        # The file's sha256 (and git state) describe the file, not the code that runs.
        record["edited_since_loaded"] = edited
    return record


def code_identity(code: Iterable[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """What makes two reductions the same code: each code record's name, version, source
    sha256, git commit and dirty state, and parameters (a file edited, with or without a
    commit, is other code)."""
    return sorted(
        (
            str(c.get("name", "")),
            str(c.get("version", "")),
            str(c.get("sha256", "")),
            str(c.get("commit", "")),
            json.dumps(c.get("dirty")),
            json.dumps(c.get("params", {}), sort_keys=True),
        )
        for c in code
    )


@functools.cache
def _environment() -> dict[str, Any]:
    packages = {}
    for name in TRACKED_DISTRIBUTIONS:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "packages": packages,
    }


def environment_record(extra_distributions: Iterable[str] = ()) -> dict[str, Any]:
    """Python and the versions of the packages that matter (plus ``extra_distributions``)."""
    env = _environment()
    packages = dict(env["packages"])
    for name in extra_distributions:
        if name not in packages:
            try:
                packages[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
    return {**env, "packages": packages}


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if (
        hasattr(value, "start")
        or isinstance(value, (str, bytes, os.PathLike, Mapping, CheckedParent))
        or callable(value)
    ):
        return [value]
    return list(value)


def make_provenance(
    parents: Iterable[ParentSpec] | ParentSpec = (),
    files: Iterable[str | os.PathLike[str]] | str | os.PathLike[str] = (),
    code: Any = None,
    *,
    strict: bool = True,
    catalog: Any = None,
) -> tuple[list[str], dict[str, Any]]:
    """Return ``(parent_uids, provenance)`` for a child run's start document.

    With ``strict`` (the default) a run with neither parents nor input files, with no code,
    or with code that cannot be imported again by its recorded name is refused with
    :class:`ProvenanceError`. ``strict=False`` records the same gaps under ``missing``.

    Each parent is recorded with ``verified``: True for a run client, a start document, or
    a uid found in ``catalog`` (a uid it lacks is refused, see :func:`check_parents`);
    False for a bare uid when no catalog is given: it was not checked.
    """
    if catalog is not None:
        parents = check_parents(catalog, parents)
    parent_records = [parent_record(p) for p in _as_list(parents)]
    file_records = [file_record(f) for f in _as_list(files)]
    code_records = [code_record(c) for c in _as_list(code)]

    missing = []
    if not parent_records and not file_records:
        missing.append("the data's origin: no parent run uids and no input files")
    if not code_records:
        missing.append("the code that made the data: no code given")
    for record in code_records:
        if "recorded_code" in record:
            continue  # reproducible from its recorded source
        if "source_unavailable" in record or (
            record["importable"] and record["name"].startswith("__main__:")
        ):
            missing.append(
                f"code {record['name']!r} is defined in __main__ or a module that cannot be "
                "imported by its name, and its source cannot be recorded "
                f"({record.get('source_unavailable', 'no source')}): define it in a module"
            )
        elif "edited_since_loaded" in record:
            missing.append(
                f"the code {record['name']!r} that would run is not what its file holds now "
                f"({record['edited_since_loaded']}): reload its module (importlib.reload) "
                "or restart the session"
            )
        elif not record["importable"]:
            missing.append(
                f"code {record['name']!r} cannot be imported again by that name "
                "(a lambda or a function defined inside another): define it at the top "
                "level of a module"
            )
    if missing and strict:
        raise ProvenanceError(
            "refusing to save a run without provenance; missing "
            + "; ".join(missing)
            + ". Pass strict=False to save it anyway (the gaps are recorded)."
        )

    distributions = [r["distribution"] for r in code_records if "distribution" in r]
    provenance: dict[str, Any] = {
        "parents": parent_records,
        "files": file_records,
        "code": code_records,
        "environment": environment_record(distributions),
        "strict": strict,
    }
    if missing:
        provenance["missing"] = missing
        logger.warning("saving a run with incomplete provenance: %s", "; ".join(missing))
    return [p["uid"] for p in parent_records], provenance
