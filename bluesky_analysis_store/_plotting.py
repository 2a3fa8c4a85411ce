"""Plots of derived data that say what they show: a line over the run for scalars, an image
for a frame, titled with the sample, the scan and the run, and labelled with units.

A derived value can be drawn against any key of its parent run: each child event names, in
its ``parent_seq_num`` column, the ``seq_num`` of the raw event it was made from, so the raw
key's value for that event is found by that number (not by position: a raw event may have no
child event). Units come from the descriptor's data keys, as ``run[stream].metadata
["data_keys"]`` holds them (what bluesky-tiled-plugins' TiledWriter saves from the
descriptor). Only numbers are plotted (booleans as 0 and 1); strings, bytes, objects and
complex values are refused, and so are events of more than two dimensions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import PlotError, RunNotFoundError
from ._reduction import PARENT_EVENT_KEYS
from ._replay import start_document
from ._stream_reading import StreamReader

__all__ = ["make_figure", "plot_key"]

# The child column that names the raw event each child event came from.
_PARENT_SEQ_NUM = PARENT_EVENT_KEYS[0]
# numpy kinds drawn as numbers: booleans, signed and unsigned integers, floats.
_PLOTTABLE_KINDS = "biuf"
_INTEGER_KINDS = "biu"
_SHORT_UID = 8
_SEPARATOR = " · "


@dataclass(frozen=True)
class _Axis:
    """Values for one axis, the label that names them and whether they are whole numbers."""

    values: np.ndarray
    label: str
    integer: bool


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
    x_stream: str | None = None,
    parent: Any = None,
) -> str:
    """Write a PNG of ``key`` from ``run[stream]`` (``size`` inches at ``dpi``) and return
    its path. See :func:`make_figure` for what is drawn."""
    figure = make_figure(
        run,
        key,
        stream=stream,
        index=index,
        x_key=x_key,
        size=size,
        dpi=dpi,
        x_stream=x_stream,
        parent=parent,
    )
    path = os.fspath(output)
    figure.savefig(path, format="png")
    return path


def make_figure(
    run: Any,
    key: str,
    *,
    stream: str = "primary",
    index: int = -1,
    x_key: str | None = None,
    size: tuple[float, float] = (6.4, 4.8),
    dpi: int = 100,
    x_stream: str | None = None,
    parent: Any = None,
) -> Any:
    """The matplotlib ``Figure`` of ``key`` from ``run[stream]``, drawn on an Agg canvas
    (no pyplot, no change to the session's backend).

    A scalar key is a line against the event number (the stream's ``seq_num``), or against
    ``x_key``: a key of the same stream, else of the parent run's stream ``x_stream``
    (default: the stream of the same name, as reduction names child streams), joined on
    the child's ``parent_seq_num``. An array key is one event, ``index`` (from 0; negative
    counts from the end): 1-D as a line, 2-D as an image with a colorbar. ``parent`` is the
    parent run's client; by default it is looked up by ``start["parent_uids"]`` in the
    catalog holding ``run``. Raises :class:`PlotError` for a key that cannot be plotted and
    :class:`RunNotFoundError` when an x key must come from a parent run that is not there.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    data = _stream(run, stream, "run")
    _require_key(data, key)
    if data.is_value_table(key):
        raise PlotError(
            f"{key!r} holds tables or variable-length arrays, of no one shape to plot; read "
            "them with AnalysisStore.read_stream"
        )
    event_shape = data.event_shape(key)
    if len(event_shape) > 2:
        raise PlotError(
            f"{key!r} holds {len(event_shape)}-D events of shape {event_shape}; only scalars, "
            "1-D and 2-D events can be plotted"
        )
    if x_key is not None and event_shape:
        raise PlotError(
            f"an x key applies to scalar keys only; {key!r} holds {len(event_shape)}-D events "
            f"of shape {event_shape}, drawn against their own indices"
        )
    parent_run = parent if parent is not None else _find_parent(run)

    figure = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(figure)  # savefig and draw without a pyplot backend
    axes = figure.add_subplot()
    second_line = f"{stream}/{key}"
    if not event_shape:
        if x_key is None:
            (values,) = data.columns(key)
            _check_numeric(key, values)
            x = _Axis(data.seq_nums(len(values)), "event (seq_num)", integer=True)
        else:
            x, values = _x_axis(run, data, key, x_key, x_stream, parent_run)
        count = min(len(x.values), len(values))  # an incomplete run may lag in one column
        axes.plot(x.values[:count], _as_numbers(values[:count]), marker="o")
        axes.set_xlabel(x.label)
        axes.set_ylabel(data.label(key))
        if x.integer:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        _label_booleans(axes.yaxis, values.dtype)
    else:
        client = data.array(key)
        _check_numeric(key, np.empty(0, dtype=client.dtype))
        count = client.shape[0]
        if not -count <= index < count:
            raise PlotError(f"{key!r} has {count} events; index {index} is out of range")
        position = index % count
        frame = _as_numbers(np.asarray(client[position]))
        second_line += f"{_SEPARATOR}event {data.seq_nums(count)[position]} (seq_num)"
        if frame.ndim == 1:
            axes.plot(np.arange(len(frame)), frame, marker=".")
            axes.set_xlabel("element")
            axes.set_ylabel(data.label(key))
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            image = axes.imshow(frame, interpolation="nearest")
            axes.set_xlabel("column")
            axes.set_ylabel("row")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.yaxis.set_major_locator(MaxNLocator(integer=True))
            colorbar = figure.colorbar(image, ax=axes)
            colorbar.set_label(data.label(key))
    axes.set_title(f"{_title(run, parent_run)}\n{second_line}", fontsize="medium")
    figure.tight_layout()
    return figure


# --- finding the data -----------------------------------------------------------------------


def _stream(run: Any, name: str, whose: str) -> StreamReader:
    try:
        node = run[name]
    except KeyError:
        raise PlotError(f"the {whose} has no stream {name!r}; it has {sorted(run)}") from None
    return StreamReader(node, name)


def _require_key(stream: StreamReader, key: str) -> None:
    if not stream.has_data_key(key):
        raise PlotError(f"stream {stream.name!r} has no key {key!r}; it has {stream.keys()}")


def _find_parent(run: Any) -> Any:
    """The first parent run of ``run`` in the catalog holding it, or None."""
    from tiled.client.container import Container

    parent_uids = start_document(run).get("parent_uids") or []
    if not parent_uids:
        return None
    try:  # the exact key: the catalog's own lookup would also take scan ids and prefixes
        return Container.__getitem__(run.parent, parent_uids[0])
    except KeyError:
        return None


def _x_axis(
    run: Any,
    data: StreamReader,
    key: str,
    x_key: str,
    x_stream: str | None,
    parent_run: Any,
) -> tuple[_Axis, np.ndarray]:
    """The x values of each event of ``data``, and its values of ``key``: x is its own
    column ``x_key``, or the parent run's, taken at the raw event each child event names."""
    if data.has_data_key(x_key):
        x_values, values = data.columns(x_key, key)
        _check_numeric(key, values)
        _check_numeric(x_key, x_values, axis="x ")
        _check_scalar(x_key, x_values)
        integer = x_values.dtype.kind in _INTEGER_KINDS
        return _Axis(_as_numbers(x_values), data.label(x_key), integer), values

    parent_stream = x_stream or data.name
    parent_uids = start_document(run).get("parent_uids") or []
    if not parent_uids:
        raise PlotError(
            f"no x key {x_key!r}: stream {data.name!r} has {data.keys()}, and the run has "
            "no parent run to look in"
        )
    if parent_run is None:
        raise RunNotFoundError(
            f"the x key {x_key!r} is not in stream {data.name!r} (it has {data.keys()}), "
            f"and the parent run {parent_uids[0]} is not in the store to look it up there"
        )
    raw = _stream(parent_run, parent_stream, "parent run")
    if not raw.has_data_key(x_key):
        raise PlotError(
            f"no x key {x_key!r}: stream {data.name!r} has {data.keys()}, and stream "
            f"{parent_stream!r} of the parent run has {raw.keys()}"
        )
    if _PARENT_SEQ_NUM not in data:
        raise PlotError(
            f"stream {data.name!r} has no {_PARENT_SEQ_NUM!r} column naming the raw event of "
            f"each child event, so {x_key!r} of the parent run cannot be matched to them"
        )
    values, wanted = data.columns(key, _PARENT_SEQ_NUM)
    _check_numeric(key, values)
    (raw_values,) = raw.columns(x_key)
    _check_numeric(x_key, raw_values, axis="x ")
    _check_scalar(x_key, raw_values)
    raw_seq_nums = raw.seq_nums(len(raw_values))[: len(raw_values)]
    position_of = {int(seq_num): i for i, seq_num in enumerate(raw_seq_nums)}
    missing = [int(s) for s in wanted if int(s) not in position_of]
    if missing:
        raise PlotError(
            f"the parent run's stream {parent_stream!r} has no event with seq_num "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, named by the child's "
            f"{_PARENT_SEQ_NUM!r}; it has {len(raw_values)} events"
        )
    joined = raw_values[[position_of[int(s)] for s in wanted]]
    integer = raw_values.dtype.kind in _INTEGER_KINDS
    return _Axis(_as_numbers(joined), raw.label(x_key), integer), values


# --- checking and labelling ------------------------------------------------------------------


def _check_numeric(key: str, values: np.ndarray, *, axis: str = "") -> None:
    kind = values.dtype.kind
    if kind not in _PLOTTABLE_KINDS:
        what = {"U": "strings", "S": "bytes", "O": "objects", "c": "complex numbers"}
        raise PlotError(
            f"{axis}key {key!r} holds {what.get(kind, f'values of dtype {values.dtype}')}, "
            "not numbers: it cannot be plotted"
        )


def _check_scalar(key: str, values: np.ndarray) -> None:
    if values.ndim != 1:
        raise PlotError(
            f"x key {key!r} holds arrays of shape {values.shape[1:]} an event; "
            "an x axis needs one number an event"
        )


def _as_numbers(values: np.ndarray) -> np.ndarray:
    return values.astype(np.int8) if values.dtype.kind == "b" else values


def _label_booleans(axis: Any, dtype: Any) -> None:
    if np.dtype(dtype).kind == "b":
        axis.set_ticks([0, 1], ["False", "True"])


def _sample_name(start: Mapping[str, Any]) -> str | None:
    sample = start.get("sample")
    if isinstance(sample, Mapping):
        sample = sample.get("name")
    if sample is None or sample == "":
        return None
    return str(sample)


def _title(run: Any, parent_run: Any) -> str:
    """``sample S · scan N (plan) · child UID``: the sample and the scan are the run's own
    for a raw run, else its parent's (a child run has neither of its own)."""
    start = start_document(run)
    parent_start = start_document(parent_run) if parent_run is not None else {}
    parts = []
    sample = _sample_name(start) or _sample_name(parent_start)
    if sample:
        parts.append(f"sample {sample}")
    scan_start = parent_start if "scan_id" in parent_start else start
    scan_id, plan_name = scan_start.get("scan_id"), scan_start.get("plan_name")
    if scan_id is not None:
        parts.append(f"scan {scan_id}" + (f" ({plan_name})" if plan_name else ""))
    elif plan_name:
        parts.append(f"plan {plan_name}")
    kind = "child" if start.get("parent_uids") else "run"
    parts.append(f"{kind} {start['uid'][:_SHORT_UID]}")
    return _SEPARATOR.join(parts)
