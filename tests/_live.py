"""Helpers of the tests that run a real RunEngine: a recorder of what it emitted, raw-run plans.

The RunEngine itself, the simulated devices and the module's store are fixtures (conftest.py).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp

# --- recording what the RunEngine emitted -------------------------------------------------


class DocumentRecorder:
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

    def stop(self, uid: str) -> dict[str, Any]:
        """The stop document of run ``uid``."""
        [stop] = [d for n, d in self.docs if n == "stop" and d["run_start"] == uid]
        return stop

    def events(self, uid: str, stream: str = "primary") -> list[dict[str, Any]]:
        """The events of ``stream`` of run ``uid``, by ``seq_num``."""
        descriptors = {
            d["uid"]
            for n, d in self.docs
            if n == "descriptor" and d["run_start"] == uid and d["name"] == stream
        }
        events = [d for n, d in self.docs if n == "event" and d["descriptor"] in descriptors]
        return sorted(events, key=lambda e: e["seq_num"])

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


# --- reading back -------------------------------------------------------------------------


def eventually(condition: Any, what: str, timeout: float = 60.0) -> None:
    """Wait for ``condition()`` (a background thread or process makes it true); fail after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.05)


def children_of(store: Any, raw_uid: str) -> list[str]:
    """The child runs of ``raw_uid``: none when the store holds neither it (a raw run the
    test did not save there) nor any run derived from it."""
    from bluesky_analysis_store import RunNotFoundError

    try:
        return store.children(raw_uid)
    except RunNotFoundError:
        return []


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


# --- reducers -----------------------------------------------------------------------------


def slow_scaled(data: Mapping[str, Any], *, seconds: float = 0.03) -> dict[str, float]:
    """``10 * det``, after sleeping ``seconds``: a reduction that falls behind the scan."""
    time.sleep(seconds)
    return {"total": 10.0 * float(data["det"])}
