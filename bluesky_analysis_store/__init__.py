"""Derived data from bluesky runs, saved as child runs with provenance in an analysis store."""

from ._callback import AnalysisStoreCallback
from ._composer import RunComposer, compose_documents
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
    MetadataError,
    ProvenanceError,
    RunNotFoundError,
    WriterRootError,
)
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
    "MetadataError",
    "ProvenanceError",
    "RunNotFoundError",
    "WriterRootError",
]
