"""Derived data from bluesky runs, saved as child runs with provenance in an analysis store.

The names are imported when first used (PEP 562): the command line and a store opened for
reading do not pay for the live pipeline's imports (bluesky, event-model's filler, ...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The errors are imported now: they cost nothing and are what a failing call raises.
from ._errors import (
    AnalysisStoreError,
    AssetExistsError,
    AssetLocationError,
    DataKeyError,
    DataValueError,
    DeliveryError,
    DiskFullError,
    FormatRegistryError,
    FrameWriteError,
    IngestError,
    JournalError,
    MessageError,
    MetadataError,
    PlotError,
    ProvenanceError,
    RunNotFoundError,
    WriterRootError,
)

if TYPE_CHECKING:
    from ._callback import AnalysisStoreCallback
    from ._composer import RunComposer, compose_documents
    from ._handover import Abandoned
    from ._ingest import ingest
    from ._plans import wait_for_derived, wait_for_derived_decorator, wait_for_derived_wrapper
    from ._provenance import code_record, environment_record, make_provenance
    from ._recovery import RecoveryReport
    from ._reducers import Reducer
    from ._reprocess import ReprocessReport, reprocess
    from ._reproduce import ReproduceReport, reproduce
    from ._store import JOURNAL_ENV, STORE_ENV, AnalysisStore, ChildRun
    from ._writer_specs import DATA_ROOT_ENV
    from .formats import FileFormat, FormatRegistry, Handler, RewindableWriter, Writer, formats

# Where each public name lives.
_MODULES = {
    "AnalysisStoreCallback": "._callback",
    "RunComposer": "._composer",
    "compose_documents": "._composer",
    "Abandoned": "._handover",
    "ingest": "._ingest",
    "wait_for_derived": "._plans",
    "wait_for_derived_decorator": "._plans",
    "wait_for_derived_wrapper": "._plans",
    "code_record": "._provenance",
    "environment_record": "._provenance",
    "make_provenance": "._provenance",
    "RecoveryReport": "._recovery",
    "Reducer": "._reducers",
    "ReprocessReport": "._reprocess",
    "reprocess": "._reprocess",
    "ReproduceReport": "._reproduce",
    "reproduce": "._reproduce",
    "JOURNAL_ENV": "._store",
    "STORE_ENV": "._store",
    "AnalysisStore": "._store",
    "ChildRun": "._store",
    "DATA_ROOT_ENV": "._writer_specs",
    **dict.fromkeys(
        ["DerivedRunWatcher", "RunEnded", "RunStarted", "SavedEvent", "SavedFrames"],
        "._watching",
    ),
    "zmq_dumps": "._zmq_documents",
    "zmq_loads": "._zmq_documents",
    **dict.fromkeys(
        ["FileFormat", "FormatRegistry", "Handler", "RewindableWriter", "Writer", "formats"],
        ".formats",
    ),
}


# Imported now: the name is also the subpackage's, which importing any of its modules would
# bind here in place of the registry.
from .formats import formats  # noqa: E402


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    # Live and offline reduction
    "AnalysisStoreCallback",
    "Abandoned",
    "wait_for_derived",
    "wait_for_derived_decorator",
    "wait_for_derived_wrapper",
    "Reducer",
    "ReprocessReport",
    "ReproduceReport",
    "ingest",
    "reprocess",
    "reproduce",
    # A facility-wide store: watching it, and documents sent over 0MQ
    "DerivedRunWatcher",
    "RunEnded",
    "RunStarted",
    "SavedEvent",
    "SavedFrames",
    "zmq_dumps",
    "zmq_loads",
    # Composing and saving runs
    "AnalysisStore",
    "ChildRun",
    "RecoveryReport",
    "RunComposer",
    "compose_documents",
    # Provenance
    "code_record",
    "environment_record",
    "make_provenance",
    # File formats
    "FileFormat",
    "FormatRegistry",
    "Handler",
    "RewindableWriter",
    "Writer",
    "formats",
    # Configuration
    "DATA_ROOT_ENV",
    "JOURNAL_ENV",
    "STORE_ENV",
    # Errors
    "AnalysisStoreError",
    "AssetExistsError",
    "AssetLocationError",
    "DataKeyError",
    "DataValueError",
    "DeliveryError",
    "DiskFullError",
    "FormatRegistryError",
    "FrameWriteError",
    "IngestError",
    "JournalError",
    "MessageError",
    "MetadataError",
    "PlotError",
    "ProvenanceError",
    "RunNotFoundError",
    "WriterRootError",
]
