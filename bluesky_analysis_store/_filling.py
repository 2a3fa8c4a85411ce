"""Loading raw event data stored outside the events, before reducers see it.

Legacy ``resource``/``datum`` go through event-model's ``Filler`` with the handlers found
through the ``databroker.handlers`` entry points (ophyd.sim's ``NPY_SEQ``,
area-detector-handlers, this package's formats). event-model has no filler for
``stream_resource``/``stream_datum`` (what ophyd-async detectors emit), so those are read
here, file by file, from the mimetype and parameters tiled would use.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from event_model import DocumentRouter, Filler

from .formats import formats

__all__ = ["EventFiller", "HANDLER_ENTRY_POINT_GROUP", "RouterFiller", "handler_registry"]

logger = logging.getLogger(__name__)

HANDLER_ENTRY_POINT_GROUP = "databroker.handlers"
# Values a reducer cannot change in place, handed over without a copy.
_IMMUTABLE = (str, bytes, int, float, bool, type(None))


@functools.cache
def _entry_point_handlers() -> dict[str, type]:
    handlers: dict[str, type] = {}
    for entry_point in entry_points(group=HANDLER_ENTRY_POINT_GROUP):
        try:
            handlers[entry_point.name] = entry_point.load()
        except Exception as error:  # one broken plugin must not hide the others
            logger.warning("handler %s could not be loaded: %s", entry_point.name, error)
    return handlers


def handler_registry(extra: Mapping[str, type] | None = None) -> dict[str, type]:
    """Handlers by spec: the ``databroker.handlers`` entry points, this package's formats
    and ``extra`` (which wins)."""
    return {**_entry_point_handlers(), **formats.handler_registry(), **(extra or {})}


def _uri_path(uri: str) -> str:
    return unquote(urlparse(uri).path)


def _read_stream_frame(resource: Mapping[str, Any], index: int) -> np.ndarray:
    """Frame ``index`` of the files a ``stream_resource`` describes."""
    from bluesky_tiled_plugins.utils import compile_template

    mimetype = resource["mimetype"]
    params = resource.get("parameters", {})
    path = _uri_path(resource["uri"])
    if mimetype == "application/x-hdf5" and not params.get("template"):
        import h5py

        with h5py.File(path, "r", locking=False, swmr=bool(params.get("swmr", False))) as file:
            return np.asarray(file[params["dataset"]][index])
    if mimetype.startswith("multipart/related"):
        template = params.get("template")
        if mimetype == "multipart/related;type=application/x-npy":
            template = "%s_%d.npy"  # tiled's NPY consolidator fixes this naming too
        if template is None:
            raise ValueError(f"stream_resource {resource['uid']} has no filename template")
        name = compile_template(template, params.get("filename", "")).format(index)
        frame_path = _uri_path(resource["uri"] + name)
        if mimetype.endswith("image/tiff"):
            import tifffile

            return tifffile.imread(frame_path)
        if mimetype.endswith("application/x-npy"):
            return np.load(frame_path, allow_pickle=False)
    for fmt in formats:  # a format registered by a plugin, read through its handler
        if fmt.mimetype == mimetype:
            kwargs = {k: v for k, v in params.items() if k in fmt.default_resource_kwargs}
            return np.asarray(fmt.handler(path, **kwargs)(index=index))
    raise ValueError(f"no reader for stream_resource mimetype {mimetype!r}")


class RouterFiller(Filler):
    """The Filler a ``RunRouter`` applies to each event page, minus the needless copies.

    A RunRouter fills every page it routes, through ``filler_class``; the package's routers
    have no handlers, so they load nothing, yet each page is unpacked, copied and packed
    again: about 20 us an event, a quarter of the reduction of a scalar event. A page that
    marks no key as unfilled is passed on as it is; the others go through the Filler as
    before (which may raise, e.g. for a datum it never saw).
    """

    def event_page(self, doc: Any) -> Any:
        filled = doc.get("filled")
        if isinstance(filled, Mapping) and not any(
            value is False for values in filled.values() for value in values
        ):
            return doc
        return super().event_page(doc)


class EventShortcut:
    """Sends the events of streams a RunRouter has routed before straight to their run.

    A RunRouter packs each event into a page that the run's DocumentRouter unpacks again:
    about a tenth of the work of a scalar event. ``runs`` is the owner's mapping of run
    start uid to the callback its RunRouter made for the run; :meth:`learn` each document
    the RunRouter routed, and :meth:`route` an event first.
    """

    def __init__(self, runs: Mapping[str, Callable[[str, Any], Any]]) -> None:
        self._runs = runs
        self._by_descriptor: dict[str, Callable[[str, Any], Any]] = {}

    def route(self, name: str, doc: Mapping[str, Any]) -> bool:
        """Hand an event of a known stream to its run; False for anything else."""
        run = self._by_descriptor.get(doc["descriptor"]) if name == "event" else None
        if run is None:
            return False
        run(name, doc)
        return True

    def learn(self, name: str, doc: Mapping[str, Any]) -> None:
        if name == "descriptor" and doc.get("run_start") in self._runs:
            self._by_descriptor[doc["uid"]] = self._runs[doc["run_start"]]

    def forget(self, run: object) -> None:
        """Drop the streams of a finished run."""
        for descriptor in [d for d, known in self._by_descriptor.items() if known is run]:
            del self._by_descriptor[descriptor]


class EventFiller(DocumentRouter):
    """Feed it every document of one run; :meth:`fill` returns an event's data, loaded."""

    def __init__(
        self,
        handlers: Mapping[str, type] | None = None,
        root_map: Mapping[str, str] | None = None,
        *,
        copy_values: bool = True,
    ) -> None:
        super().__init__()
        # Whether inline values are copied before a reducer sees them: the RunEngine hands
        # the same event to every subscriber, and a reducer may change an array in place.
        # A worker process's events are its own copies already.
        self._copy_values = copy_values
        self._filler = Filler(
            dict(handlers if handlers is not None else handler_registry()),
            root_map=dict(root_map or {}),
            inplace=False,
        )
        self._stream_resources: dict[str, dict[str, Any]] = {}
        # (descriptor uid, seq_num) -> {data key: (stream_resource uid, index)}
        self._stream_frames: dict[tuple[str, int], dict[str, tuple[str, int]]] = {}
        self._external_descriptors: set[str] = set()

    def start(self, doc: dict[str, Any]) -> None:
        self._filler("start", doc)

    def descriptor(self, doc: dict[str, Any]) -> None:
        if any("external" in data_key for data_key in doc.get("data_keys", {}).values()):
            self._external_descriptors.add(doc["uid"])
        self._filler("descriptor", doc)

    def resource(self, doc: dict[str, Any]) -> None:
        self._filler("resource", doc)

    def datum(self, doc: dict[str, Any]) -> None:
        self._filler("datum", doc)

    def datum_page(self, doc: dict[str, Any]) -> None:
        self._filler("datum_page", doc)

    def stream_resource(self, doc: dict[str, Any]) -> None:
        self._stream_resources[doc["uid"]] = doc

    def stream_datum(self, doc: dict[str, Any]) -> None:
        resource = self._stream_resources.get(doc["stream_resource"])
        if resource is None:
            logger.warning("stream_datum %s refers to an unknown stream_resource", doc["uid"])
            return
        seq_start, seq_stop = doc["seq_nums"]["start"], doc["seq_nums"]["stop"]
        first_index = doc["indices"]["start"]
        for offset, seq_num in enumerate(range(seq_start, seq_stop)):
            frames = self._stream_frames.setdefault((doc["descriptor"], seq_num), {})
            frames[resource["data_key"]] = (resource["uid"], first_index + offset)

    def fill(self, event: dict[str, Any]) -> dict[str, Any]:
        """The event's data with every external value loaded (a new dict, sharing no
        mutable value with the event)."""
        if self._filler_has_work(event):
            _, filled = self._filler("event", event)
            data = dict(filled["data"])
        else:
            # The Filler would deep-copy the whole event (through an event page and back):
            # about as long as the rest of the reduction of a scalar event. Copy only what a
            # reducer could change in place.
            data = {
                key: value
                if not self._copy_values or isinstance(value, _IMMUTABLE)
                else copy.deepcopy(value)
                for key, value in event["data"].items()
            }
        frames = self._stream_frames.pop((event["descriptor"], event["seq_num"]), {})
        for data_key, (resource_uid, index) in frames.items():
            data[data_key] = _read_stream_frame(self._stream_resources[resource_uid], index)
        return data

    def _filler_has_work(self, event: dict[str, Any]) -> bool:
        """Whether event-model's Filler would load anything: its own test
        (``Filler.fill_event``), keys ``filled`` marks False, else external keys."""
        filled = event.get("filled")
        if filled is None:
            return event["descriptor"] in self._external_descriptors
        return any(value is False for value in filled.values())

    def stop(self, doc: dict[str, Any]) -> None:
        self._filler("stop", doc)

    def close(self) -> None:
        self._filler.close()
