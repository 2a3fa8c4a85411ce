"""Reducers, plans and a document recorder for the offline-reduction tests.

Reducers live at the top level of an importable module: the provenance check refuses code
that cannot be imported again by its recorded ``module:qualname`` (lambdas, closures), and
``reproduce`` imports it again by that name. The code version recorded for these reducers
comes from this file (its sha256, or the commit when git tracks it), so it must not change
while the tests run.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
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


# --- plans --------------------------------------------------------------------------------


def dark_then_positions(cam: Any, motor: Any, positions: list[float], darks: Mapping[int, float]):
    """A run of a ``dark`` stream and a ``primary`` stream, both reading ``cam`` and ``motor``.

    ``darks[n]`` is where the motor goes for a ``dark`` event taken just before the ``n``-th
    primary event (the spot camera's frame depends on the motor, so different positions
    give different dark frames); the two streams interleave in time.
    """

    @bpp.stage_decorator([cam])
    @bpp.run_decorator(md={"plan_name": "dark_then_positions"})
    def inner():
        for n, position in enumerate(positions):
            if n in darks:
                yield from bps.mv(motor, darks[n])
                yield from bps.trigger_and_read([cam, motor], name="dark")
            yield from bps.mv(motor, position)
            yield from bps.trigger_and_read([cam, motor])

    return (yield from inner())


# --- recording what the RunEngine emitted -------------------------------------------------


class Recorder:
    """A RunEngine subscriber keeping a deep copy of every document, in emission order."""

    def __init__(self) -> None:
        self.docs: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.docs.append((name, copy.deepcopy(doc)))

    def run(self, uid: str) -> list[tuple[str, dict[str, Any]]]:
        """Every document of run ``uid`` (start, descriptors, resources, datums, events, stop)."""
        descriptors = {
            d["uid"] for n, d in self.docs if n == "descriptor" and d["run_start"] == uid
        }
        resources = {
            d["uid"] for n, d in self.docs if n == "resource" and d.get("run_start") == uid
        }
        out = []
        for name, doc in self.docs:
            if (
                (name == "start" and doc["uid"] == uid)
                or (name in ("descriptor", "stop", "resource") and doc.get("run_start") == uid)
                or (name == "event" and doc["descriptor"] in descriptors)
                or (name == "datum" and doc["resource"] in resources)
            ):
                out.append((name, doc))
        return out

    def frame_files(self, uid: str, key: str = "cam") -> dict[tuple[str, int], str]:
        """``(stream, seq_num) -> path`` of the NPY file holding ``key`` of each raw event."""
        docs = self.run(uid)
        streams = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
        resources = {d["uid"]: d for n, d in docs if n == "resource"}
        datums = {d["datum_id"]: d for n, d in docs if n == "datum"}
        files = {}
        for name, event in docs:
            if name != "event":
                continue
            datum = datums[event["data"][key]]
            resource = resources[datum["resource"]]
            stem = os.path.join(resource["root"], resource["resource_path"])
            files[(streams[event["descriptor"]], event["seq_num"])] = (
                f"{stem}_{datum['datum_kwargs']['index']}.npy"
            )
        return files
