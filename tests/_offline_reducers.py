"""Reducers for the offline-reduction tests (``reprocess``, ``reproduce``).

Reducers live at the top level of an importable module: the provenance check refuses code
that cannot be imported again by its recorded ``module:qualname`` (lambdas, closures), and
``reproduce`` imports it again by that name. The code version recorded for these reducers
comes from this file (its sha256, or the commit when git tracks it), so it must not change
while the tests run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# --- reducers -----------------------------------------------------------------------------


def scaled_total(data: Mapping[str, Any], *, key: str = "cam", factor: float = 1.0) -> dict:
    """The frame's total counts times ``factor`` (a parameter for ``functools.partial``)."""
    return {"total": factor * float(np.asarray(data[key]).sum(dtype=np.float64))}


def frame_peak(data: Mapping[str, Any], key: str = "cam") -> dict:
    """A different reducer: the frame's peak value."""
    return {"peak": int(np.asarray(data[key]).max())}


def row_sums(data: Mapping[str, Any], key: str = "cam") -> dict:
    """The sum of each row of the frame, in the dtype numpy sums the frame's dtype to: a
    frame read back with another dtype than it was taken with gives another result."""
    return {"row_sums": np.asarray(data[key]).sum(axis=1)}


def ingest_table(path: str) -> list[dict[str, dict[str, Any]]]:
    """The code of an ingested run: one event per line of a text file of numbers."""
    with open(path) as file:
        return [{"primary": {"value": float(line)}} for line in file if line.strip()]
