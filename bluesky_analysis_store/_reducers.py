"""Reducers: the user's code that turns raw event data into derived values.

Two forms are accepted. The simple one is a plain function of one event's data (data key ->
value, external data already loaded) returning a dict of derived values; it is applied to
the events of the streams it is given. The rich one subclasses :class:`Reducer`: it sees the
run's start and descriptors, sees the events of every stream (so a ``dark`` stream can feed
a correction), keeps state across the run and may add values when the run ends.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ._provenance import code_identity, code_record

__all__ = ["FunctionReducer", "Reducer", "as_reducer", "code_as_loaded", "reducer_provenance"]

logger = logging.getLogger(__name__)


class Reducer:
    """Base class of a stateful reducer; override the hooks you need.

    A fresh copy of the instance given to the callback (``copy.deepcopy``) serves each raw
    run, so state never leaks from one run into the next, nor between interleaved runs.
    Public attributes (or dataclass fields) are its parameters and are recorded in the
    provenance next to its code identity.
    """

    def start(self, doc: Mapping[str, Any]) -> None:
        """The raw run's start document."""

    def descriptor(self, doc: Mapping[str, Any]) -> None:
        """Each raw descriptor, before its events."""

    def event(
        self, stream: str, data: Mapping[str, Any], doc: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        """Derived values for one raw event of ``stream`` (saved in the child stream of the
        same name), or None for none."""
        return None

    def stop(self, doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """Values known only at the end of the run (saved in the child stream ``summary``)."""
        return None

    @property
    def params(self) -> dict[str, Any]:
        if dataclasses.is_dataclass(self):
            fields = {
                f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)
                if not f.name.startswith("_")
            }
        else:
            fields = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return _jsonable(fields)

    @property
    def code(self) -> Any:
        return type(self)


class FunctionReducer(Reducer):
    """A plain function ``f(data) -> dict`` applied to the events of ``streams``."""

    def __init__(self, func: Callable[[Mapping[str, Any]], Any], streams: Iterable[str]) -> None:
        self._func = func
        self._streams = frozenset(streams)

    def event(
        self, stream: str, data: Mapping[str, Any], doc: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        if stream not in self._streams:
            return None
        return self._func(data)

    @property
    def params(self) -> dict[str, Any]:
        func, keywords, args = self._func, {}, []
        while isinstance(func, functools.partial):
            keywords = {**func.keywords, **keywords}
            args = [*func.args, *args]
            func = func.func
        params: dict[str, Any] = dict(keywords)
        if args:
            params["args"] = list(args)
        return _jsonable(params)

    @property
    def code(self) -> Any:
        return self._func

    @property
    def streams(self) -> frozenset[str]:
        return self._streams

    def __deepcopy__(self, memo: dict[int, Any]) -> FunctionReducer:
        return self  # stateless: the function is shared


def as_reducer(obj: Any, streams: Iterable[str]) -> Reducer:
    """A :class:`Reducer` for ``obj``: itself, or a plain function wrapped for ``streams``."""
    if isinstance(obj, Reducer):
        return obj
    if isinstance(obj, type) and issubclass(obj, Reducer):
        return obj()
    if callable(obj):
        return FunctionReducer(obj, streams)
    raise TypeError(f"a reducer must be a function or a Reducer, not {obj!r}")


def fresh_copy(reducer: Reducer) -> Reducer:
    return copy.deepcopy(reducer)


def reducer_provenance(reducer: Reducer) -> dict[str, Any]:
    """The code record of a reducer with its parameters."""
    record = code_record(reducer.code)
    if params := reducer.params:
        record["params"] = params
    if isinstance(reducer, FunctionReducer):
        record["streams"] = sorted(reducer.streams)
    return record


def code_as_loaded(
    reducers: Sequence[Reducer], recorded: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The code records of ``reducers`` as this process loaded them.

    A worker process gets the reducers pickled: code from an importable module by
    reference, so the worker imports that module anew, and runs whatever its file holds
    now (edited since the callback was made, perhaps). Its record is therefore made again
    here, from what was loaded. Code sent by value (defined in ``__main__``, at a prompt)
    is the very code that was recorded: its record is kept.
    """
    records = []
    for reducer, before in zip(reducers, recorded, strict=True):
        if not before.get("importable") or str(before.get("name", "")).startswith("__main__:"):
            records.append(dict(before))
            continue
        now = reducer_provenance(reducer)
        if code_identity([now]) != code_identity([before]):
            logger.warning(
                "reducer %s loaded here is not the code the callback was made with (sha256 "
                "%s, was %s; version %s, was %s): the child runs record the code loaded here",
                now.get("name"),
                now.get("sha256"),
                before.get("sha256"),
                now.get("version"),
                before.get("version"),
            )
        records.append(now)
    return records


def _jsonable(value: Any) -> Any:
    """``value`` if JSON can hold it, else a summary (arrays by shape and dtype, else repr)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        pass
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape == () and hasattr(value, "item"):  # a numpy scalar: keep its value
        try:
            scalar = value.item()
            json.dumps(scalar)
            return scalar
        except (TypeError, ValueError):
            pass
    if shape is not None and dtype is not None:
        import hashlib

        import numpy as np

        array = np.ascontiguousarray(value)
        return {
            "shape": list(shape),
            "dtype": str(dtype),
            "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
        }
    return repr(value)
