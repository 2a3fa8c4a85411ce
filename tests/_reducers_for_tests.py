"""Reducers and simulated data sources used by the tests.

They live at the top level of an importable module because the provenance check refuses
code that cannot be imported again by its recorded ``module:qualname`` (lambdas, closures).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from bluesky_analysis_store import Reducer

FRAME_SHAPE = (10, 10)
FRAME_STEP = 10.0


def frame(n: int) -> np.ndarray:
    """The ``n``-th frame of :class:`FrameSequence`: a ramp, raised by ``FRAME_STEP * n``."""
    return np.arange(np.prod(FRAME_SHAPE), dtype=np.float64).reshape(FRAME_SHAPE) + FRAME_STEP * n


class FrameSequence:
    """For ``SynSignal.sim_set_func``: frame ``start``, then ``start + 1``... one a trigger."""

    def __init__(self, start: int = 0) -> None:
        self.next = start

    def __call__(self) -> np.ndarray:
        value = frame(self.next)
        self.next += 1
        return value


# --- plain function reducers ------------------------------------------------------------


def scaled(data: Mapping[str, Any], *, key: str = "det", threshold: float = 0.0) -> dict:
    """Two scalars that both depend on the reading and on the parameter."""
    value = float(data[key])
    return {"total": 10.0 * value + threshold, "shifted": value - threshold}


def image_stats(data: Mapping[str, Any]) -> dict:
    """Shape facts about the image it was given, and two derived images."""
    img = data["img"]
    if not isinstance(img, np.ndarray):
        raise TypeError(f"img reached the reducer as {type(img).__name__}, not a numpy array")
    return {
        "is_ndarray": isinstance(img, np.ndarray),
        "rows": img.shape[0],
        "cols": img.shape[1],
        "img_total": float(img.sum()),
        "doubled": (2 * img).astype(np.float32),
        "as_u16": img.astype(np.uint16),
    }


def passthrough_total(data: Mapping[str, Any], *args: Any, **kwargs: Any) -> dict:
    """For parameter bookkeeping tests: returns nothing derived from its parameters."""
    return {"total": float(data.get("det", 0.0))}


# --- Reducer subclasses -------------------------------------------------------------------


@dataclasses.dataclass
class DarkSubtractedSum(Reducer):
    """Subtracts the last ``dark`` frame from each primary frame and sums the results."""

    key: str = "img"
    scale: float = 1.0

    def __post_init__(self) -> None:
        self._dark: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._frames = 0

    def event(self, stream: str, data: Mapping[str, Any], doc: Mapping[str, Any]) -> Any:
        image = np.asarray(data[self.key], dtype=np.float64)
        if stream == "dark":
            self._dark = image
            return None
        if stream != "primary":
            return None
        if self._dark is None:
            raise RuntimeError("a primary event arrived before any dark frame")
        corrected = (image - self._dark) * self.scale
        self._sum = corrected if self._sum is None else self._sum + corrected
        self._frames += 1
        return {"corrected_total": float(corrected.sum())}

    def stop(self, doc: Mapping[str, Any]) -> Any:
        if self._sum is None:
            return None
        return {"frames": self._frames, "sum": self._sum, "sum_total": float(self._sum.sum())}


@dataclasses.dataclass
class RaiseOnSeqNum(Reducer):
    """Returns ``det`` but raises on the event numbered ``seq_num``."""

    seq_num: int = 3

    def event(self, stream: str, data: Mapping[str, Any], doc: Mapping[str, Any]) -> Any:
        if doc["seq_num"] == self.seq_num:
            raise ValueError(f"this reducer refuses seq_num {self.seq_num}")
        return {"total": float(data["det"])}


@dataclasses.dataclass
class GarbageOnSeqNum(Reducer):
    """Returns ``det`` but something unstorable on ``seq_num``: a list, or an object array."""

    seq_num: int = 3
    garbage: str = "list"

    def event(self, stream: str, data: Mapping[str, Any], doc: Mapping[str, Any]) -> Any:
        value = float(data["det"])
        if doc["seq_num"] != self.seq_num:
            return {"total": value}
        if self.garbage == "list":
            return [value]
        return {"total": np.array([value, "text", None], dtype=object)}


@dataclasses.dataclass
class WithArrayParameter(Reducer):
    """A dataclass reducer with an array parameter (a mask, a flat field...)."""

    mask: np.ndarray
    label: str = "masked"

    def __post_init__(self) -> None:
        self._seen = 0

    def event(self, stream: str, data: Mapping[str, Any], doc: Mapping[str, Any]) -> Any:
        self._seen += 1
        return {self.label: float((np.asarray(data["img"]) * self.mask).sum())}


class PlainParams(Reducer):
    """A plain (non-dataclass) reducer: public attributes are its parameters."""

    def __init__(self, factor: float, name: str) -> None:
        self.factor = factor
        self.name = name
        self._cache: list[Any] = []

    def event(self, stream: str, data: Mapping[str, Any], doc: Mapping[str, Any]) -> Any:
        self._cache.append(doc["seq_num"])
        return {"total": self.factor * float(data["det"])}


def lowered_in_place(data: Mapping[str, Any]) -> dict:
    """Changes its input array in place, as a reducer may."""
    values = data["arr"]
    values -= 1.0
    return {"arr_min": float(values.min())}


class SeqNumFrames(Reducer):
    """A scalar and a frame that both say which raw event they came from: a child stream
    that is shifted or has a row twice shows it."""

    def event(self, stream: str, data: Mapping[str, Any], doc: Mapping[str, Any]) -> dict:
        n = doc["seq_num"]
        return {"y": float(n), "frame": np.full((16, 16), n, dtype=np.float32)}


_LEAKED: list[np.ndarray] = []


def leaking(data: Mapping[str, Any]) -> dict:
    """A reducer that keeps 64 MiB more of every event (a leak)."""
    _LEAKED.append(np.ones(8 * 2**20))
    return {"held": float(len(_LEAKED))}
