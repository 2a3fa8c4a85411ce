"""The analysis store: a databroker 2 / tiled catalog of derived runs.

By default an embedded SQLite catalog in a folder, served inside the process (no server, no
network); :meth:`AnalysisStore.from_uri` talks to a tiled server instead, for a facility
that shares one (PostgreSQL behind it). Tiled is imported on first use: it takes seconds.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ._composer import compose_documents
from ._confinement import check_readable
from ._errors import AnalysisStoreError, RunNotFoundError
from ._pending_writes import PendingWrites, writer_importable_now
from ._provenance import check_parents, code_identity
from ._trust import claims_derivation
from ._versions import PIN_KEY, mark_current, pin_record, pin_time, reducer_of

__all__ = ["STORE_ENV", "AnalysisStore", "ChildRun", "default_store_location"]

logger = logging.getLogger(__name__)

STORE_ENV = "BLUESKY_ANALYSIS_STORE"
"""Environment variable naming the store: a folder, or the http(s) URI of a tiled server."""

_UID_TEXT = re.compile(r"[0-9A-Za-z_-]{1,64}")
_MIN_UID_PREFIX = 5
_CATALOG_SPECS = [{"name": "CatalogOfBlueskyRuns", "version": "3.0"}]
_CONFIG_FILE = "store.json"


def default_store_location() -> str:
    return os.environ.get(STORE_ENV) or "analysis-store"


def _asset_paths(name: str, doc: Mapping[str, Any]) -> list[str]:
    """The files a stream resource or resource names (the first file, for a template)."""
    if name == "stream_resource":
        parsed = urlparse(doc["uri"])
        if parsed.scheme not in ("file", ""):
            return []
        path = unquote(parsed.path)
        template = (doc.get("parameters") or {}).get("template")
        # tiled's consolidators append the rendered template to the URI's path verbatim.
        return [path, path + template] if isinstance(template, str) else [path]
    if name == "resource":
        path = os.path.join(doc.get("root", "") or "", doc["resource_path"])
        kwargs = doc.get("resource_kwargs") or {}
        names = [
            v for k, v in kwargs.items() if k in ("template", "filename") and isinstance(v, str)
        ]
        return [path, *(os.path.join(path, name) for name in names)]
    return []


def _remember_readable(folder: Path, readable: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The extra readable folders given now and at earlier opens (kept in store.json).

    Only folders given as ``readable`` by whoever opens the store are added: nothing else
    (saving, ingesting, reprocessing, the command line) widens what the store may read.
    """
    config_path = folder / _CONFIG_FILE
    try:
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
    except (OSError, ValueError) as error:
        raise AnalysisStoreError(
            f"cannot read the store's settings {config_path}: {error}"
        ) from error
    known = config.get("readable", []) if isinstance(config, dict) else None
    if not isinstance(known, list) or not all(
        isinstance(path, str) and os.path.isabs(path) for path in known
    ):
        raise AnalysisStoreError(
            f"{config_path} is damaged: 'readable' must be a list of absolute folder paths"
        )
    known = list(known)
    for path in readable:
        absolute = os.path.abspath(os.fspath(path))
        if absolute not in known:
            logger.info("the store in %s may now also read files under %s", folder, absolute)
            known.append(absolute)
    if known != config.get("readable", []):
        config["readable"] = known
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return known


class PlainStructureClients(Mapping[str, Any]):
    """tiled's client classes for each structure family, imported when first met, and none
    for specs: nodes read through it are plain containers, arrays and tables."""

    _CLASSES = {
        "container": ("tiled.client.container", "Container"),
        "composite": ("tiled.client.composite", "CompositeClient"),
        "array": ("tiled.client.array", "ArrayClient"),
        "awkward": ("tiled.client.awkward", "AwkwardClient"),
        "bytes": ("tiled.client.bytes", "BytesClient"),
        "dataframe": ("tiled.client.dataframe", "DataFrameClient"),
        "table": ("tiled.client.dataframe", "DataFrameClient"),
        "ragged": ("tiled.client.ragged", "RaggedClient"),
        "sparse": ("tiled.client.sparse", "SparseClient"),
        "xarray_dataset": ("tiled.client.xarray", "DatasetClient"),
    }

    def __getitem__(self, family: str) -> Any:
        import importlib

        module, name = self._CLASSES[family]
        return getattr(importlib.import_module(module), name)

    def __iter__(self) -> Any:
        return iter(self._CLASSES)

    def __len__(self) -> int:
        return len(self._CLASSES)


class ChildRun(str):
    """The uid of a derived run (usable wherever a uid is), with when it started, the code
    that made it (``[{"name": "module:qualname", "version": ...}, ...]``) and how it ended.

    ``complete`` is whether the run has a stop document: a child without one is still being
    written, or its process died before it was closed. ``exit_status`` and ``reason`` come
    from the stop (None without one); ``events_reduced`` and ``events_failed`` from the
    stop's ``reduction`` record (None where the stop has none, as for a run from
    :meth:`AnalysisStore.save`). :attr:`succeeded` says whether the child is a whole,
    faultless reduction. ``verified`` is whether this package wrote it (its node carries
    the package's seal, matching its start; see :meth:`AnalysisStore.children`), and
    ``identity`` the code identity that decides "already reduced" (:func:`code_identity`).

    ``reducer`` names the code that made it (``module:qualname`` of each code record,
    without versions): children of one parent with the same reducer are versions of one
    result. ``pinned_at`` is when a user pinned it (:meth:`AnalysisStore.pin`; None if not
    pinned), and ``current`` whether it is its reducer's current result for the parent it
    was listed for (the most recently pinned, else the newest that succeeded; see
    :meth:`AnalysisStore.children`).
    """

    time: float
    code: list[dict[str, Any]]
    identity: list[tuple[str, ...]]
    verified: bool
    complete: bool
    exit_status: str | None
    reason: str | None
    events_reduced: int | None
    events_failed: int | None
    reducer: tuple[str, ...]
    pinned_at: float | None
    current: bool

    @classmethod
    def from_start(
        cls,
        uid: str,
        start: Mapping[str, Any],
        stop: Mapping[str, Any] | None = None,
        *,
        verified: bool = False,
        pinned_at: float | None = None,
    ) -> ChildRun:
        child = cls(uid)
        child.time = float(start.get("time", 0.0))
        child.verified = verified
        child.reducer = reducer_of(start)
        child.pinned_at = pinned_at
        child.current = False
        code = (start.get("provenance") or {}).get("code") or []
        child.code = [{"name": c.get("name"), "version": c.get("version")} for c in code]
        child.identity = code_identity(code)
        child.complete = bool(stop)
        stop = stop or {}
        child.exit_status = stop.get("exit_status")
        child.reason = stop.get("reason") or None
        reduction = stop.get("reduction") or {}
        child.events_reduced = cls._count(reduction.get("events_reduced"))
        child.events_failed = cls._count(reduction.get("events_failed"))
        return child

    @staticmethod
    def _count(value: Any) -> int | None:
        return int(value) if isinstance(value, (int, float)) else None

    @property
    def succeeded(self) -> bool:
        """Whether this child is a whole, faultless reduction of its parent: it has a stop
        document, its exit status is ``"success"`` and its stop records no failed event
        (``events_failed`` is 0, or absent for a run saved without a reduction record).
        A child with even one failed event is worth redoing, so it does not count."""
        return self.complete and self.exit_status == "success" and not self.events_failed

    @property
    def status(self) -> str:
        """How the child ended, in words: ``success``, ``fail (reason)``, ``success, 2 of
        5 events failed``, ``incomplete (no stop)``."""
        if not self.complete:
            return "incomplete (no stop)"
        text = str(self.exit_status)
        if self.reason:
            text += f" ({self.reason})"
        if self.events_failed:
            total = self.events_failed + (self.events_reduced or 0)
            text += f", {self.events_failed} of {total} events failed"
        return text

    @property
    def code_versions(self) -> str:
        return ", ".join(f"{c['name']} {c['version']}" for c in self.code)

    @property
    def all_failed(self) -> bool:
        """Whether the reduction failed on every event it was given (and reduced none)."""
        return bool(self.events_failed) and not self.events_reduced

    def __repr__(self) -> str:
        marks = ", current=True" if self.current else ""
        marks += ", pinned=True" if self.pinned_at is not None else ""
        return (
            f"ChildRun({str(self)!r}, code={self.code_versions!r}, status={self.status!r}, "
            f"verified={self.verified!r}{marks})"
        )


class AnalysisStore:
    """A catalog of bluesky runs that derived data is saved into.

    The store is a document callback: ``store(name, doc)`` saves a run's documents, so
    ``RE.subscribe(store)`` records runs directly. ``store[uid]`` reads a run back (a tiled
    ``BlueskyRun``), :meth:`save` composes and saves a run from arrays, :meth:`children`
    finds the derived runs of a raw run. Use :meth:`open` or :meth:`from_uri` to make one.
    """

    def __init__(
        self,
        client: Any,
        *,
        asset_root: str | os.PathLike[str] | None = None,
        readable_roots: Sequence[str | os.PathLike[str]] | None = None,
        location: str | None = None,
        flush_interval: float = 0.5,
    ) -> None:
        from tiled.client.context import Context

        # Given a Context, the clients are made when first needed: the full one (runs as
        # bluesky-tiled-plugins' BlueskyRun, whose module takes a second to import) for
        # users, and the plain one for the listings and writes of this package.
        self._context = client if isinstance(client, Context) else client.context
        self._client = None if isinstance(client, Context) else client
        self._catalog: Any = None
        self._flush_interval = flush_interval
        self._writer_: Any = None
        self._pending: PendingWrites | None = None
        self.asset_root = os.path.abspath(asset_root) if asset_root is not None else None
        self.readable_roots = (
            [os.path.abspath(r) for r in readable_roots] if readable_roots is not None else None
        )
        self.location = location
        # How another process opens this store again (see __reduce__), set by open/from_uri.
        self._reopen: tuple[Any, ...] | None = None
        # The server reads its files on this machine (an embedded store, set by open).
        self._files_here = False

    # --- making one ---------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        readable: Sequence[str | os.PathLike[str]] = (),
        flush_interval: float = 0.5,
        served: bool | None = None,
    ) -> AnalysisStore:
        """Open the embedded store in folder ``path``, creating it if needed.

        ``path`` defaults to ``$BLUESKY_ANALYSIS_STORE``, else ``./analysis-store``. Derived
        files go under ``<path>/assets``; ``readable`` adds folders whose files the store may
        also serve (raw data referenced by runs saved here); they are remembered in
        ``<path>/store.json`` for later opens.

        The folder is served by one local server process, started by the first open (a few
        seconds, once) and shared by every process that opens the folder after it, which
        then needs a fraction of a second (see ``_local_server``). ``served=False`` (or
        ``$BLUESKY_ANALYSIS_STORE_SERVED=0``) serves the catalog inside this process
        instead. Either way several processes may open one folder and write to it: their
        requests take turns on ``<path>/write.lock``.
        """
        location = os.fspath(path) if path is not None else default_store_location()
        if location.startswith(("http://", "https://")):
            return cls.from_uri(location)
        from ._catalog_lock import CatalogLock

        folder = Path(location).absolute()
        (folder / "assets").mkdir(parents=True, exist_ok=True)
        (folder / "data").mkdir(exist_ok=True)
        catalog_lock = CatalogLock(folder)
        with catalog_lock.held():  # store.json: one process at a time
            readable_roots = [str(folder / "assets"), *_remember_readable(folder, readable)]
        if served is None:
            from ._local_server import served_by_default

            served = served_by_default()
        if served:
            catalog_lock.close()
            context = _served_context(folder, readable_roots)
        else:
            context = _in_process_context(folder, readable_roots, catalog_lock)
        store = cls(
            context,
            asset_root=folder / "assets",
            readable_roots=readable_roots,
            location=str(folder),
            flush_interval=flush_interval,
        )
        store._reopen = (_open_folder, (str(folder), flush_interval, served))
        store._files_here = True
        return store

    @classmethod
    def from_uri(
        cls,
        uri: str,
        api_key: str | None = None,
        *,
        asset_root: str | os.PathLike[str] | None = None,
        readable_roots: Sequence[str | os.PathLike[str]] | None = None,
        flush_interval: float = 0.5,
    ) -> AnalysisStore:
        """Connect to a tiled server holding a catalog of bluesky runs.

        ``asset_root`` is where :meth:`save` writes files (it must be readable by the
        server); ``readable_roots``, when given, are checked before an asset is saved.
        """
        from tiled.client import from_uri

        client = from_uri(uri, api_key=api_key)
        store = cls(
            client,
            asset_root=asset_root,
            readable_roots=readable_roots,
            location=uri,
            flush_interval=flush_interval,
        )
        store._reopen = (
            _connect,
            (uri, api_key, store.asset_root, store.readable_roots, flush_interval),
        )
        return store

    @property
    def journal_folder(self) -> Path:
        """Where child runs are journaled before they reach the catalog (see ``recover``):
        ``$BLUESKY_ANALYSIS_JOURNAL`` if set (a local disk, not the catalog's), else
        ``<store folder>/journal`` for an embedded store and a folder per server under
        ``~/.local/state/bluesky-analysis-store/journals`` for a tiled server."""
        return journal_folder_for(self.location)

    def recover(self) -> Any:
        """Deliver child runs left in the journal (the store was down, or their process
        was killed) and close those without a stop as interrupted: a
        :class:`~bluesky_analysis_store.RecoveryReport`. Idempotent."""
        from ._recovery import recover

        return recover(self)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled, a store is the way to open it again: the callback's worker process
        writes through a store of its own on the same catalog."""
        if self._reopen is None:
            raise TypeError(
                "this AnalysisStore wraps a tiled client given to it and cannot be opened in "
                "another process; make it with AnalysisStore.open or AnalysisStore.from_uri"
            )
        return self._reopen

    # --- writing ------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The tiled client of the catalog (runs read back as ``BlueskyRun``).

        Its arrays whose files are on this machine, inside the store's readable folders,
        are read from them in this process (see :meth:`read`): ``array.read()`` then costs
        about what reading the file does, not a trip of every byte through the server."""
        self._wait_for_pending_writes()
        if self._client is None:
            from tiled.client import from_context

            if self.readable_roots is None:
                self._client = from_context(self._context)
            else:
                from ._local_reading import LocalFirstStructureClients

                # Nodes come with their data sources: a local array is then read with no
                # request to the server at all.
                self._client = from_context(
                    self._context,
                    structure_clients=LocalFirstStructureClients(
                        self.readable_roots, files_here=self._files_here
                    ),
                    include_data_sources=True,
                )
        return self._client

    @property
    def catalog(self) -> Any:
        """The catalog as plain tiled nodes: runs and streams are tiled containers, read
        without importing the client classes of bluesky-tiled-plugins (a second or two);
        their start and stop documents are in ``catalog[uid].metadata``."""
        self._wait_for_pending_writes()
        return self._plain_catalog()

    def _plain_catalog(self) -> Any:
        if self._catalog is None:
            from tiled.client import from_context

            if self._client is not None:  # perhaps of a node below the server's root
                self._catalog = self._client.new_variation(
                    structure_clients=PlainStructureClients()
                )
            else:
                self._catalog = from_context(
                    self._context, structure_clients=PlainStructureClients()
                )
        return self._catalog

    @property
    def _writer(self) -> Any:
        if self._writer_ is None:
            from ._tiled_writing import FlushingTiledWriter

            self._writer_ = FlushingTiledWriter(
                self._plain_catalog(), flush_interval=self._flush_interval
            )
        return self._writer_

    def _wait_for_pending_writes(self) -> None:
        """Reads in this process see the documents handed to the store before them."""
        pending = self._pending
        if pending is not None and not pending.caught_up:
            pending.wait()

    def __call__(self, name: str, doc: dict[str, Any], *, close_streams: bool = True) -> None:
        """Save one document; asset files outside the store's readable folders are refused.

        This is the way in for raw runs (``RE.subscribe(store)``). A run saved here is never
        sealed as this package's derived data: one whose start names ``parent_uids`` or
        ``provenance`` is kept as an unverified run, which :meth:`children` does not list
        (see docs/decisions/0007-trusted-provenance.md).

        ``close_streams=False`` saves a stop document but leaves telling tiled's stream
        subscribers that the run's streams ended to :meth:`close_streams` or the next
        :meth:`flush`, so that a caller waiting for the run to be saved waits less.
        """
        self.check_asset_location(name, doc)
        if name == "start" and claims_derivation(doc):
            logger.warning(
                "run %s names parent_uids or provenance, but documents given to the store "
                "directly are not this package's write path: it is saved unsealed, as an "
                "unverified run that children() does not list (save derived data with "
                "store.save, AnalysisStoreCallback or reprocess)",
                doc.get("uid"),
            )
        if self._pending is None and self._writer_ is None and not writer_importable_now():
            # The first document of a session: not held while the writer imports (a
            # second); see _pending_writes.
            self._pending = PendingWrites(lambda: self._writer)
        pending = self._pending
        if pending is not None:
            if pending.add(name, doc, close_streams):
                return
            self._pending = None  # caught up: written directly from now on
            self._writer(name, doc, close_streams=close_streams)
            pending.raise_refused()
            return
        self._writer(name, doc, close_streams=close_streams)

    def close_streams(self) -> None:
        """End the streams of runs saved with ``close_streams=False``."""
        self._wait_for_pending_writes()
        self._writer.close_streams()

    def check_asset_location(self, name: str, doc: Mapping[str, Any]) -> None:
        """Refuse a ``stream_resource`` or ``resource`` whose files, symlinks resolved, are
        outside the store's readable folders (:class:`AssetLocationError`); without
        ``readable_roots`` (a server store given none) nothing is checked here."""
        if self.readable_roots is None:
            return
        for path in _asset_paths(name, doc):
            check_readable(path, self.readable_roots, what=f"{name} {doc.get('uid', '')}")

    def flush(self) -> None:
        """Write rows buffered for open runs, so readers see them now (and end the streams
        of runs saved with ``close_streams=False``)."""
        pending = self._pending
        if pending is not None:
            pending.wait()
            pending.raise_refused()
        self._writer.flush()

    def save(
        self,
        data_dicts: Iterable[Mapping[str, Mapping[str, Any]]],
        md: Mapping[str, Any] | None,
        writers_dict: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Compose a run (see :func:`compose_documents`), save it and return its uid.

        Files go under the store's asset folder unless ``root`` is given. The whole run is
        composed and checked before its first document reaches the catalog, journaled, then
        saved and read back: if the store fails, :class:`DeliveryError` names the journal
        that ``recover`` delivers later. Parents given by uid must be runs of this store
        (else :class:`ProvenanceError`); a parent in another catalog is given as its run
        client or start document.
        """
        from ._delivery import save_documents

        if "readable_roots" in kwargs:
            raise AnalysisStoreError(
                "save checks files against the store's own readable folders; open the store "
                "with readable=[...] instead of passing readable_roots"
            )
        kwargs.setdefault("root", self.asset_root)
        kwargs["readable_roots"] = self.readable_roots  # refused before any file is written
        kwargs["parents"] = check_parents(self, kwargs.get("parents", ()))
        md = self._with_parents_access_tags(md, kwargs["parents"])
        documents = list(compose_documents(data_dicts, md, writers_dict, **kwargs))
        save_documents(self, documents)
        return documents[0][1]["uid"]

    def _with_parents_access_tags(self, md: Any, parents: list[Any]) -> Any:
        """``md`` with the access tags the parents share (``_access_tags``)."""
        from ._access_tags import inherit_access_tags, node_access_tags, start_access_tags
        from ._provenance import CheckedParent

        if md is not None and not isinstance(md, Mapping):
            return md  # refused, with its own message, by compose_documents
        tags = []
        for parent in parents:
            if isinstance(parent, CheckedParent):  # found in this catalog: its node's tags
                tags.append(node_access_tags(self.catalog[parent.uid]))
            elif isinstance(parent, Mapping):  # a start document of another catalog
                tags.append(start_access_tags(parent))
            else:  # a run client
                tags.append(node_access_tags(parent))
        return inherit_access_tags(md or {}, tags)

    # --- reading ------------------------------------------------------------------------

    def __getitem__(self, uid: str) -> Any:
        try:
            return self.client[uid]
        except KeyError:
            raise RunNotFoundError(f"no run {uid!r} in the analysis store") from None

    def read(self, array: Any, slice: Any = ...) -> Any:
        """The values of an array of this store, as a numpy array (``array[slice]``).

        ``array`` is a tiled array client (``store[uid]["primary"]["profile"]``) or its path
        (``f"{uid}/primary/profile"``). When its files are on this machine, inside the
        folders the store may read, tiled's adapter reads them in this process, as fast as
        reading the file itself; otherwise it is read through the catalog, as
        ``array.read()`` does. The values are the same either way.
        """
        from ._local_reading import read_array

        if isinstance(array, str):
            path = array
            try:  # the node and its data sources in one request
                array = self.catalog.new_variation(include_data_sources=True)[path]
            except KeyError:
                # An event stream's inline keys are columns of its table, which the run's
                # client finds by name.
                try:
                    node = self.client
                    for part in path.split("/"):
                        node = node[part]
                except KeyError:
                    raise RunNotFoundError(f"no array {path!r} in the analysis store") from None
                array = node
        return read_array(array, self.readable_roots, slice, files_here=self._files_here)

    def read_stream(
        self, uid: str, stream: str = "primary", keys: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """Every event's values of ``keys`` (default: every data key) of one stream of run
        ``uid``, as numpy arrays by key; ``"seq_num"`` and ``"time"`` may be asked for too.

        The same values as ``store[uid][stream][key].read()`` key by key, in fewer requests:
        the stream's contents are listed once, its scalar columns are read together and
        each array in one request (read from its file when it is local, as :meth:`read`).
        :class:`RunNotFoundError` for an unknown run, KeyError for an unknown stream or key.
        """
        from ._stream_reading import StreamReader

        run = self[uid]
        if stream not in run:
            raise KeyError(f"run {uid!r} has no stream {stream!r}; it has {sorted(run)}")
        reader = StreamReader(run[stream], stream)
        names = list(reader.keys() if keys is None else keys)
        return dict(zip(names, reader.columns(*names), strict=True))

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, str) and uid in self.catalog

    def __len__(self) -> int:
        # tiled's client keeps a container's length for a second: a fresh view of the same
        # node counts the runs saved just now too.
        return len(self.catalog.new_variation())

    def search(self, query: Any) -> Any:
        """Runs matching a tiled query (``tiled.queries``)."""
        return self.client.search(query)

    def children(
        self, parent_uid: str, *, unverified: bool = False, current: bool = False
    ) -> list[ChildRun]:
        """The runs derived from ``parent_uid``, newest first: their uids, each carrying the
        start time, the code (names and versions) that made it and how it ended
        (:class:`ChildRun`). Incomplete children (no stop document) are listed too.

        Children made by the same reducer (the same code names, whatever their versions and
        parameters) are versions of one result: in each such group the one a user pinned
        most recently (:meth:`pin`), else the newest that succeeded, is marked ``current``.
        ``current=True`` lists only those, one per reducer.

        Only runs this package wrote are listed: those whose node carries its seal, which
        matches their start document (:attr:`ChildRun.verified`). ``unverified=True`` adds
        the runs that only claim ``parent_uid`` as a parent (documents given to the store
        directly, a start edited after it was saved, runs of versions before the seal).

        ``parent_uid`` may be the first characters of a uid (at least 5), of a run of this
        store or of a parent its runs name; :class:`RunNotFoundError` if it is neither.
        """
        children = self._children_of(self.resolve_parent_uid(parent_uid), unverified=unverified)
        mark_current(children)
        return [c for c in children if c.current] if current else children

    def lineage(self, uid: str, *, max_depth: int = 20) -> Any:
        """Where run ``uid`` came from, back to the raw data, and every run derived from it,
        down to the grandchildren and beyond (a :class:`~bluesky_analysis_store._lineage.
        Lineage`: ``ancestry`` and ``descent`` trees of runs, each with its ``links``)."""
        from ._lineage import lineage

        return lineage(self, uid, max_depth=max_depth)

    def pin(self, child_uid: str) -> ChildRun:
        """Make ``child_uid`` (a uid, or its first characters) the current result of its
        reducer for each of its parents, whatever newer children there are; returns it.

        The pin is written into the catalog, in the child's node metadata: every client of
        the store sees it. The child must be a complete derived run this package wrote
        (:class:`AnalysisStoreError` otherwise). Pinning another child of the same reducer
        later makes that one current; :meth:`unpin` takes a pin away. The child returned
        carries its ``pinned_at``; which child is ``current`` is worked out by
        :meth:`children`, for each parent."""
        import time

        uid, node = self._derived_node(child_uid)
        node.update_metadata({PIN_KEY: pin_record(time.time())})
        return self._child_from(uid, node.metadata, verified=True)

    def unpin(self, child_uid: str) -> ChildRun:
        """Take away the pin of ``child_uid``: the newest child of its reducer that
        succeeded is current again (unless another one is pinned). Returns it."""
        uid, node = self._derived_node(child_uid)
        metadata = dict(node.metadata)
        if PIN_KEY in metadata:
            del metadata[PIN_KEY]
            node.replace_metadata(metadata)
        return self._child_from(uid, node.metadata, verified=True)

    def _derived_node(self, text: str) -> tuple[str, Any]:
        """The uid and plain node of a complete, sealed derived run of this store."""
        from ._trust import is_sealed

        uid = self.resolve_parent_uid(text)
        if uid not in self.catalog:
            raise RunNotFoundError(f"no run {text!r} in the analysis store")
        node = self.catalog.new_variation()[uid]
        metadata = node.metadata
        start = metadata.get("start") or {}
        if not claims_derivation(start):
            raise AnalysisStoreError(f"run {uid} is not a derived run; only a child can be pinned")
        if not is_sealed(metadata):
            raise AnalysisStoreError(
                f"run {uid} was not written by bluesky-analysis-store (it has no valid seal); "
                "only a child this package wrote can be a current result"
            )
        if not metadata.get("stop"):
            raise AnalysisStoreError(
                f"run {uid} is incomplete (no stop document); only a complete child can be pinned"
            )
        return uid, node

    @staticmethod
    def _child_from(uid: str, node_metadata: Mapping[str, Any], verified: bool) -> ChildRun:
        return ChildRun.from_start(
            uid,
            node_metadata.get("start") or {},
            node_metadata.get("stop"),
            verified=verified,
            pinned_at=pin_time(node_metadata),
        )

    def resolve_parent_uid(self, text: str) -> str:
        """The full uid that ``text`` (a uid, or its first characters) names: a run of this
        store, else a parent named by runs of this store (it may live in another catalog).
        :class:`RunNotFoundError` if none, :class:`AnalysisStoreError` if several match."""
        from tiled.queries import Contains, Like

        if not isinstance(text, str) or not _UID_TEXT.fullmatch(text):
            raise RunNotFoundError(f"{text!r} is not a run uid (nor the start of one)")
        if text in self.catalog:
            return text
        matches: set[str] = set()
        if len(text) >= _MIN_UID_PREFIX:
            # The catalog of an embedded store or of a tiled server is SQL: LIKE works.
            found = self.catalog.search(Like("start.uid", f"{text}%")).keys().head(2)
            matches.update(found)
            if not matches:
                # Contains is a substring match on the JSON text: prefixes checked here.
                for run in self.catalog.search(Contains("start.parent_uids", text)).values():
                    for uid in (run.metadata.get("start") or {}).get("parent_uids") or ():
                        if isinstance(uid, str) and uid.startswith(text):
                            matches.add(uid)
        if text in matches:  # a whole uid, which others happen to begin with
            return text
        if len(matches) > 1:
            raise AnalysisStoreError(
                f"uid prefix {text!r} matches more than one run; give more characters"
            )
        if not matches:
            if len(text) < _MIN_UID_PREFIX:
                raise RunNotFoundError(
                    f"no run {text!r} in the analysis store (a uid prefix needs at least "
                    f"{_MIN_UID_PREFIX} characters)"
                )
            raise RunNotFoundError(
                f"no run {text!r} in the analysis store, nor any run derived from it"
            )
        return matches.pop()

    def _children_of(self, parent_uid: str, *, unverified: bool = False) -> list[ChildRun]:
        """:meth:`children` of exactly ``parent_uid``, which need not be known here: an
        empty list for a uid no run of this store names."""
        from tiled.queries import Contains

        from ._trust import is_sealed

        # TiledWriter keeps the start document under the run's "start" metadata; Contains is a
        # substring match on the JSON text, so membership is checked again here.
        results = self.catalog.search(Contains("start.parent_uids", parent_uid))
        children = []
        for uid, run in results.items():
            node_metadata = run.metadata
            start = node_metadata.get("start") or {}
            if parent_uid not in (start.get("parent_uids") or ()):
                continue
            verified = is_sealed(node_metadata)
            if verified or unverified:
                children.append(self._child_from(uid, node_metadata, verified))
        return sorted(children, key=lambda child: child.time, reverse=True)

    def __repr__(self) -> str:
        return f"<AnalysisStore {self.location or self._context.api_uri!s}>"


JOURNAL_ENV = "BLUESKY_ANALYSIS_JOURNAL"
"""Environment variable naming the folder child runs are journaled in before delivery."""


def journal_folder_for(location: str | None) -> Path:
    if os.environ.get(JOURNAL_ENV):
        return Path(os.environ[JOURNAL_ENV]).absolute()
    if location and not location.startswith(("http://", "https://")):
        return Path(location) / "journal"
    import hashlib

    key = hashlib.sha256((location or "").encode()).hexdigest()[:16]
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "bluesky-analysis-store" / "journals" / key


def _open_folder(folder: str, flush_interval: float, served: bool = True) -> AnalysisStore:
    return AnalysisStore.open(folder, flush_interval=flush_interval, served=served)


def readable_folders(folder: Path) -> list[str]:
    """What an embedded store may serve: its assets, and the folders of ``store.json``."""
    return [str(folder / "assets"), *_remember_readable(folder, ())]


def build_embedded_app(
    folder: Path,
    readable_roots: Sequence[str],
    *,
    api_key: str | None = None,
    cache_config: dict[str, Any] | None = None,
) -> Any:
    """The tiled app serving an embedded store's folder (its catalog created if needed),
    with tiled's streaming cache when ``cache_config`` is given."""
    from tiled.catalog import from_uri

    from ._catalog_lock import CatalogLock
    from ._catalog_template import copy_empty_catalog
    from ._tiled_app import build_store_app

    lock = CatalogLock(folder)
    catalog = folder / "catalog.db"
    try:
        with lock.held():  # two processes may create the catalog at once
            adapter = from_uri(
                f"sqlite:///{catalog}",
                # tiled creates a catalog in a subprocess (seconds): a copy of an empty one
                # is made instead where it can be, and reopening one needs neither.
                init_if_not_exists=not (catalog.is_file() or copy_empty_catalog(catalog)),
                specs=_CATALOG_SPECS,
                writable_storage=[str(folder / "data"), f"sqlite:///{folder / 'tables.db'}"],
                readable_storage=list(readable_roots),
                cache_config=cache_config,
            )
    finally:
        lock.close()
    return build_store_app(adapter, api_key=api_key)


def _in_process_context(folder: Path, readable_roots: Sequence[str], catalog_lock: Any) -> Any:
    from tiled.client import Context

    from ._catalog_lock import LockingTransport, wrap_transport
    from ._quiet import quiet_tiled

    with quiet_tiled():  # the app is started (and logs its version) when the context is made
        app = build_embedded_app(folder, readable_roots)
        context = Context.from_app(app)
    wrap_transport(context.http_client, lambda inner: LockingTransport(inner, catalog_lock))
    return context


def _served_context(folder: Path, readable_roots: Sequence[str]) -> Any:
    from tiled.client import Context

    from ._catalog_lock import wrap_transport
    from ._local_server import ServerTransport, api_key, ensure_server

    info = ensure_server(folder, readable_roots)
    # trust_env=False: a proxy from the environment has no business on localhost.
    context = Context(
        info.uri,
        api_key=api_key(folder),
        # Compressing arrays to send them to this same machine only costs time.
        headers={"accept-encoding": "identity"},
        trust_env=False,
        # Plain HTTP on 127.0.0.1: no certificate is ever checked, and httpx would load
        # the CA bundle for each of the context's two clients anyway (~60 ms apiece).
        verify=False,
    )
    wrap_transport(
        context.http_client, lambda inner: ServerTransport(inner, folder, readable_roots)
    )
    return context


def _connect(
    uri: str,
    api_key: str | None,
    asset_root: str | None,
    readable_roots: list[str] | None,
    flush_interval: float,
) -> AnalysisStore:
    return AnalysisStore.from_uri(
        uri,
        api_key,
        asset_root=asset_root,
        readable_roots=readable_roots,
        flush_interval=flush_interval,
    )
