"""Versions of a result: which child of a parent is the current one of its reducer.

A parent run often has several children made by the same reducer: run again with new code,
new parameters, or after a failure. Children are grouped by their reducer, the names
(``module:qualname``) of the code records in their provenance, whatever its versions and
parameters. In each group the current child is the one a user pinned most recently, else
the newest child that :attr:`~bluesky_analysis_store.ChildRun.succeeded`.

A pin is kept in the catalog, in the child node's metadata beside its start and stop
(``{"analysis_store_pin": {"time": ...}}``), so every client of the store sees it. It is
read as untrusted input: a record that is not a mapping with a finite time is no pin, and a
child without the package's seal is never current (a run that only claims a parent cannot
replace a result). Whoever may write the catalog's metadata may pin, as they may edit it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._store import ChildRun

__all__ = ["PIN_KEY", "mark_current", "pin_record", "pin_time", "reducer_of"]

PIN_KEY = "analysis_store_pin"
"""The key of a pin in a child run node's metadata."""


def pin_record(when: float) -> dict[str, Any]:
    """What :meth:`AnalysisStore.pin` writes under :data:`PIN_KEY`."""
    return {"time": float(when)}


def pin_time(node_metadata: Mapping[str, Any]) -> float | None:
    """When the child whose node metadata this is was pinned, or None if it is not."""
    record = node_metadata.get(PIN_KEY)
    if not isinstance(record, Mapping):
        return None
    when = record.get("time")
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        return None
    return float(when)


def reducer_of(start: Mapping[str, Any]) -> tuple[str, ...]:
    """The reducer a child was made by: the names of its provenance's code records."""
    code = (start.get("provenance") or {}).get("code") or []
    if not isinstance(code, list):
        return ()
    return tuple(str(c.get("name")) for c in code if isinstance(c, Mapping))


def mark_current(children: Iterable[ChildRun]) -> None:
    """Set ``current`` on each of one parent's ``children``: per reducer, the most recently
    pinned sealed child, else the newest sealed child that succeeded; no other."""
    groups: dict[tuple[str, ...], list[ChildRun]] = {}
    for child in children:
        child.current = False
        if child.verified:
            groups.setdefault(child.reducer, []).append(child)
    for group in groups.values():
        pinned = [c for c in group if c.pinned_at is not None]
        if pinned:
            max(pinned, key=lambda c: (c.pinned_at, c.time)).current = True
            continue
        succeeded = [c for c in group if c.succeeded]
        if succeeded:
            max(succeeded, key=lambda c: c.time).current = True
