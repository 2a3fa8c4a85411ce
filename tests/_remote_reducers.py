"""Reducers the remote worker of tests/test_remote_worker.py imports (``--reducers``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def frame_total(data: Mapping[str, Any]) -> dict[str, float]:
    """The spot camera's frame summed, and its brightest pixel."""
    frame = np.asarray(data["cam"], dtype=np.float64)
    return {"total": float(frame.sum()), "peak": float(frame.max())}


def motor_shifted(data: Mapping[str, Any]) -> dict[str, float]:
    """The motor's readback plus one."""
    return {"motor_plus_one": float(data["motor"]) + 1.0}


def frame_normalised(data: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The frame scaled to its brightest pixel, as float32: an array a writer saves."""
    frame = np.asarray(data["cam"], dtype=np.float32)
    return {"normalised": frame / frame.max()}


MORE_REDUCERS = [motor_shifted, frame_normalised]
"""A list: ``--reducers _remote_reducers:MORE_REDUCERS`` adds each of its reducers."""


def detector_total(data: Mapping[str, Any]) -> dict[str, float]:
    """The pixel sum of an ophyd-async detector's event (its ``det`` frames)."""
    return {"det_total": float(np.asarray(data["det"], dtype=np.float64).sum())}
