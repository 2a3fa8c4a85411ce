"""Simulated devices for demos, tests and benchmarks (built on ophyd.sim)."""

from __future__ import annotations

from typing import Any

import numpy as np
from ophyd.sim import SynSignalWithRegistry

__all__ = ["spot_camera", "spot_image"]


def spot_image(
    position: float, shape: tuple[int, int] = (64, 64), width: float = 6.0, seed: int = 0
) -> np.ndarray:
    """A uint16 frame with a Gaussian spot whose column follows ``position`` (-5..5 spans
    the frame), plus reproducible noise (the seed and position fix it)."""
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols]
    centre_x = cols / 2 + position * cols / 10
    centre_y = rows / 2
    spot = 4000.0 * np.exp(-((x - centre_x) ** 2 + (y - centre_y) ** 2) / (2 * width**2))
    rng = np.random.default_rng([seed, int(round(position * 1000)) & 0xFFFFFFFF])
    noise = rng.poisson(20.0, size=shape)
    return (spot + noise).astype(np.uint16)


class _SpotFrame:
    """The callable that renders the current frame (a class, so that it can be copied)."""

    def __init__(self, motor: Any, shape: tuple[int, int]) -> None:
        self._motor = motor
        self._shape = shape

    def __call__(self) -> np.ndarray:
        return spot_image(float(self._motor.position), self._shape)


class _SpotCamera(SynSignalWithRegistry):
    """Describes its frames' dtype: without ``dtype_numpy`` tiled serves them as float64."""

    def describe(self) -> dict[str, Any]:
        description = super().describe()
        description[self.name]["dtype_numpy"] = np.dtype(np.uint16).str
        return description


def spot_camera(
    motor: Any, save_path: str, *, shape: tuple[int, int] = (64, 64), name: str = "cam"
) -> SynSignalWithRegistry:
    """An area detector whose frames (saved as ``.npy`` files under ``save_path``, legacy
    ``resource``/``datum`` with spec ``NPY_SEQ``) show a spot that moves with ``motor``."""
    return _SpotCamera(
        func=_SpotFrame(motor, shape), name=name, save_path=save_path, labels={"detectors"}
    )
