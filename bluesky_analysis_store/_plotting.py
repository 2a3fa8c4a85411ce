"""Plots of derived data: a line over the run for scalars, an image for a frame."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._errors import AnalysisStoreError

__all__ = ["plot_key"]


def plot_key(
    run: Any,
    key: str,
    output: str | os.PathLike[str],
    *,
    stream: str = "primary",
    index: int = -1,
    x_key: str | None = None,
    size: tuple[float, float] = (6.4, 4.8),
    dpi: int = 100,
) -> str:
    """Write a PNG of ``key`` from ``run[stream]`` and return its path.

    A scalar key is drawn as a line against ``x_key`` (default: the event number); an array
    key as an image of event ``index`` (the last by default; 1-D arrays as a line).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if stream not in run:
        raise AnalysisStoreError(f"run has no stream {stream!r}; it has {sorted(run)}")
    node = run[stream]
    if key not in node:
        keys = sorted(k for k in node if k not in {"seq_num", "time"} and not k.startswith("ts_"))
        raise AnalysisStoreError(f"stream {stream!r} has no key {key!r}; it has {keys}")
    client = node[key]
    figure = Figure(figsize=size, dpi=dpi)
    axes = figure.add_subplot()
    title = f"{run.start['uid'][:8]} {stream}/{key}"
    if len(client.shape) <= 1:
        values = np.asarray(client.read())
        if x_key is not None:
            x = np.asarray(node[x_key].read())
            axes.set_xlabel(x_key)
        else:
            x = np.arange(1, len(values) + 1)
            axes.set_xlabel("event")
        axes.plot(x, values, marker="o")
        axes.set_ylabel(key)
    else:
        count = client.shape[0]
        if not -count <= index < count:
            raise AnalysisStoreError(f"{key!r} has {count} events; index {index} is out of range")
        frame = np.asarray(client[index])
        position = index % count
        title += f" [event {position + 1}]"
        if frame.ndim == 1:
            axes.plot(frame)
            axes.set_xlabel("element")
            axes.set_ylabel(key)
        else:
            image = axes.imshow(frame.reshape(-1, *frame.shape[-2:])[0])
            figure.colorbar(image, ax=axes)
    axes.set_title(title)
    figure.tight_layout()
    path = os.fspath(output)
    figure.savefig(path, format="png")
    return path
