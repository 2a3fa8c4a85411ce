"""The package's exceptions: one base, each paired with the builtin it refines."""

from __future__ import annotations

__all__ = [
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
    "PlotError",
    "MessageError",
]


class AnalysisStoreError(Exception):
    """Base of every error raised by bluesky-analysis-store."""


class DataKeyError(AnalysisStoreError, ValueError):
    """A data key that cannot name a column: contains ``/`` or ``.``, or is reserved."""


class DataValueError(AnalysisStoreError, ValueError):
    """A value that cannot be stored: dtype object, or a shape that changes within a stream."""


class MetadataError(AnalysisStoreError, TypeError):
    """Metadata that is not JSON-serialisable, or that overwrites a reserved start-document key."""


class WriterRootError(AnalysisStoreError, OSError):
    """A writer root that is not a writable folder."""


class AssetLocationError(AnalysisStoreError, PermissionError):
    """An asset file outside the folders the analysis store may read."""


class AssetExistsError(AnalysisStoreError, FileExistsError):
    """A writer given a path that already holds data: existing files are never replaced."""


class FrameWriteError(AnalysisStoreError, OSError):
    """A frame that could not be written; the files are left as they were before the call."""


class DiskFullError(FrameWriteError):
    """Not enough free space for the next frame (``errno`` is ``ENOSPC``)."""


class FormatRegistryError(AnalysisStoreError, KeyError):
    """An unknown format, or a second, different class registered under a taken name."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class ProvenanceError(AnalysisStoreError, ValueError):
    """The provenance needed to trust a derived run is missing or cannot be recorded."""


class RunNotFoundError(AnalysisStoreError, KeyError):
    """No run with that uid in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class IngestError(AnalysisStoreError, ValueError):
    """An input that ingest cannot take: a missing path, an unsupported file type, an empty
    folder, an HDF5 dataset that is not in its file, or a stream name already taken."""


class JournalError(AnalysisStoreError, OSError):
    """A journal that cannot be written, locked or read (the derived data it would hold is
    recorded as failed, never half-written)."""


class DeliveryError(AnalysisStoreError, RuntimeError):
    """A run could not be delivered to the store; its journal keeps it for ``recover``."""


class PlotError(AnalysisStoreError, ValueError):
    """A key that cannot be plotted: not in the run (nor, for the x axis, in its parent run),
    not numbers, more than two dimensions an event, or an event index out of range."""


class MessageError(AnalysisStoreError, ValueError):
    """A document that cannot be sent over 0MQ safely, or a message received that is not a
    bluesky document in the package's encoding (``zmq_dumps``/``zmq_loads``)."""
