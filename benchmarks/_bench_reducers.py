"""Reducers used by ``bench_live_reduction.py``.

They live in their own module, as top-level functions, because the callback records the
code that made the derived data and refuses code it could not import again by name
(lambdas, functions defined inside other functions). Every variant of a scenario calls
the very same function, so the reduction work is identical across the figures compared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["FRAME_KEY", "SCALAR_KEY", "bin_and_sum", "normalise_and_sum", "scale_scalar"]

FRAME_KEY = "frame"
"""Data key of the simulated area detector the scenarios with images read."""
SCALAR_KEY = "det"
"""Data key of ``ophyd.sim.det``, the scalar detector of scenario B."""

BIN = 4
"""Side of the square of raw pixels one pixel of :func:`bin_and_sum`'s image sums."""


def normalise_and_sum(data: Mapping[str, Any]) -> dict[str, Any]:
    """Scenario A: the frame as float32 scaled to [0, 1], and its total."""
    frame = np.asarray(data[FRAME_KEY], dtype=np.float32)
    peak = float(frame.max())
    norm = frame * np.float32(1.0 / peak) if peak > 0 else frame
    return {"norm": norm, "total": float(frame.sum(dtype=np.float64))}


def bin_and_sum(data: Mapping[str, Any]) -> dict[str, Any]:
    """Scenario C: the frame binned ``BIN`` x ``BIN`` into float32, and its total.

    A 1024x1024 frame gives a 256x256 float32 image (256 KiB), so 2,000 events write
    0.5 GB of derived data rather than 8 GB while still writing a frame per event.
    """
    frame = np.asarray(data[FRAME_KEY])
    rows, cols = frame.shape
    binned = (
        frame.reshape(rows // BIN, BIN, cols // BIN, BIN)
        .sum(axis=(1, 3), dtype=np.float32)
    )
    return {"binned": binned, "total": float(binned.sum(dtype=np.float64))}


def scale_scalar(data: Mapping[str, Any]) -> dict[str, Any]:
    """Scenario B: a scalar reading, scaled."""
    return {"det_scaled": 2.0 * float(data[SCALAR_KEY])}
