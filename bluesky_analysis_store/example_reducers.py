"""Ready-made reducers: examples to copy, and the ones the demo and benchmarks use."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._reducers import Reducer

__all__ = ["DarkSubtracted", "normalise_and_sum", "spot_statistics"]


def normalise_and_sum(data: Mapping[str, Any], key: str = "cam") -> dict[str, Any]:
    """The frame scaled to float32 in [0, 1] and its total counts."""
    frame = np.asarray(data[key])
    total = float(frame.sum(dtype=np.float64))
    peak = frame.max()
    normalised = frame.astype(np.float32) / np.float32(peak if peak else 1)
    return {"normalised": normalised, "total": total}


def spot_statistics(data: Mapping[str, Any], key: str = "cam") -> dict[str, Any]:
    """Total counts, the spot's centroid and a float32 frame normalised to its peak."""
    frame = np.asarray(data[key], dtype=np.float64)
    background = np.median(frame)
    signal = np.clip(frame - background, 0, None)
    total = float(signal.sum())
    cols = np.arange(frame.shape[1])
    centroid_x = float((signal.sum(axis=0) * cols).sum() / total) if total else float("nan")
    peak = frame.max()
    return {
        "total": total,
        "centroid_x": centroid_x,
        "normalised": (frame / (peak if peak else 1.0)).astype(np.float32),
    }


@dataclass
class DarkSubtracted(Reducer):
    """Subtracts the frame of the ``dark`` stream from each frame; sums them up at the end."""

    key: str = "cam"
    dark_stream: str = "dark"
    _dark: np.ndarray | None = field(default=None, repr=False)
    _running_sum: np.ndarray | None = field(default=None, repr=False)

    def event(
        self, stream: str, data: Mapping[str, Any], doc: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        frame = np.asarray(data[self.key], dtype=np.float32)
        if stream == self.dark_stream:
            self._dark = frame
            return None
        if stream != "primary":
            return None
        corrected = frame - self._dark if self._dark is not None else frame
        self._running_sum = (
            corrected if self._running_sum is None else self._running_sum + corrected
        )
        return {"corrected": corrected, "corrected_total": float(corrected.sum())}

    def stop(self, doc: Mapping[str, Any]) -> dict[str, Any] | None:
        if self._running_sum is None:
            return None
        return {"summed": self._running_sum}
