"""Loading raw event data stored outside the events, before reducers see it.

Legacy ``resource``/``datum`` go through event-model's ``Filler`` with the handlers found
through the ``databroker.handlers`` entry points (ophyd.sim's ``NPY_SEQ``,
area-detector-handlers, this package's formats), after a check that their files stay inside
their root (``_resource_paths``). ``stream_resource``/``stream_datum`` (what ophyd-async
detectors emit) are read through bluesky-tiled-plugins' consolidators and tiled's adapters
(``_stream_filling``), as tiled reads them offline.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

from event_model import DocumentRouter, Filler, unpack_datum_page

from ._errors import AssetLocationError
from ._resource_paths import check_legacy_resource
from ._stream_filling import StreamFiller
from .formats import formats

__all__ = [
    "EventFiller",
    "HANDLER_ENTRY_POINT_GROUP",
    "RouterFiller",
    "entry_point_handler",
    "handler_registry",
]

logger = logging.getLogger(__name__)

HANDLER_ENTRY_POINT_GROUP = "databroker.handlers"
# Values a reducer cannot change in place, handed over without a copy.
_IMMUTABLE = (str, bytes, int, float, bool, type(None))


@functools.cache
def _entry_point_handlers() -> dict[str, type]:
    handlers: dict[str, type] = {}
    for entry_point in entry_points(group=HANDLER_ENTRY_POINT_GROUP):
        handler = _load_handler(entry_point)
        if handler is not None:
            handlers[entry_point.name] = handler
    return handlers


@functools.cache
def entry_point_handler(spec: str) -> type | None:
    """The handler of ``spec`` among the ``databroker.handlers`` entry points, loaded alone
    (None if none loads). Loading them all imports area-detector-handlers and ophyd: about
    2 s of a process that reads a run which needs one of them, or none."""
    for entry_point in entry_points(group=HANDLER_ENTRY_POINT_GROUP, name=spec):
        handler = _load_handler(entry_point)
        if handler is not None:
            return handler
    return None


def _load_handler(entry_point: Any) -> type | None:
    try:
        return entry_point.load()
    except Exception as error:  # one broken plugin must not hide the others
        logger.warning("handler %s could not be loaded: %s", entry_point.name, error)
        return None


def handler_registry(extra: Mapping[str, type] | None = None) -> dict[str, type]:
    """Handlers by spec: the ``databroker.handlers`` entry points, this package's formats
    and ``extra`` (which wins)."""
    return {**_entry_point_handlers(), **formats.handler_registry(), **(extra or {})}


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
    """Feed it every document of one run; :meth:`fill` returns an event's data, loaded.

    ``root_map`` relocates data: a legacy resource's ``root`` is looked up in it as
    event-model's ``Filler`` does, a stream resource's URI path by its longest matching
    prefix. A resource whose files would leave their root is refused: the events that need
    it fail with ``AssetLocationError``, nothing of it is opened.

    Without ``handlers``, this package's formats are registered at once and an entry
    point's handler at the first resource of its spec (see :func:`entry_point_handler`).
    """

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
        self._root_map = dict(root_map or {})
        self._handlers_by_entry_point = handlers is None
        self._filler = Filler(
            dict(handlers if handlers is not None else formats.handler_registry()),
            root_map=self._root_map,
            inplace=False,
        )
        self._streams = StreamFiller(self._root_map)
        self._refused_resources: dict[str, AssetLocationError] = {}
        self._refused_datums: dict[str, AssetLocationError] = {}
        self._external_descriptors: set[str] = set()

    def start(self, doc: dict[str, Any]) -> None:
        self._filler("start", doc)

    def descriptor(self, doc: dict[str, Any]) -> None:
        if any("external" in data_key for data_key in doc.get("data_keys", {}).values()):
            self._external_descriptors.add(doc["uid"])
        self._streams.descriptor(doc)
        self._filler("descriptor", doc)

    def resource(self, doc: dict[str, Any]) -> None:
        try:
            check_legacy_resource(doc, self._root_map)
        except AssetLocationError as error:
            # Never handed to the Filler: no handler is built on a path outside its root.
            logger.warning("%s", error)
            self._refused_resources[doc["uid"]] = error
            return
        spec = doc.get("spec")
        if self._handlers_by_entry_point and spec not in self._filler.handler_registry:
            handler = entry_point_handler(spec) if isinstance(spec, str) else None
            if handler is not None:
                self._filler.register_handler(spec, handler)
        self._filler("resource", doc)

    def datum(self, doc: dict[str, Any]) -> None:
        refused = self._refused_resources.get(doc["resource"])
        if refused is not None:
            self._refused_datums[doc["datum_id"]] = refused
            return
        self._filler("datum", doc)

    def datum_page(self, doc: dict[str, Any]) -> None:
        if doc["resource"] in self._refused_resources:
            for datum in unpack_datum_page(doc):
                self.datum(datum)
            return
        self._filler("datum_page", doc)

    def stream_resource(self, doc: dict[str, Any]) -> None:
        self._streams.stream_resource(doc)

    def stream_datum(self, doc: dict[str, Any]) -> None:
        self._streams.stream_datum(doc)

    def fill(self, event: dict[str, Any]) -> dict[str, Any]:
        """The event's data with every external value loaded (a new dict, sharing no
        mutable value with the event)."""
        # Taken first, so a failing event does not leave its rows behind.
        stream_values = self._streams.pop_values(event["descriptor"], event["seq_num"])
        if self._filler_has_work(event):
            self._refuse_escaping_datums(event)
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
        data.update(stream_values)
        return data

    def _refuse_escaping_datums(self, event: dict[str, Any]) -> None:
        if not self._refused_datums:
            return
        for value in event["data"].values():
            if isinstance(value, str) and value in self._refused_datums:
                raise self._refused_datums[value]

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
