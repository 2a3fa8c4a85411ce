"""Versions of a result: of the children one reducer made of a parent, the most recently
pinned one, else the newest that succeeded, is current; pins are kept in the catalog (a
second store object on the same folder sees them), read as untrusted input, and never make
a child this package did not write current. The command line marks them, and pins."""

from __future__ import annotations

import functools
import json
import math
import pathlib
import sys
import time
import uuid
from typing import Any

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from _helpers import run_command  # noqa: E402
from _offline_reducers import frame_peak, scaled_total  # noqa: E402
from event_model import compose_run  # noqa: E402

from bluesky_analysis_store import (  # noqa: E402
    AnalysisStore,
    AnalysisStoreError,
    RunNotFoundError,
    reprocess,
)
from bluesky_analysis_store._versions import PIN_KEY  # noqa: E402

pytestmark = pytest.mark.usefixtures("isolated_env")

EVENTS = 3


def save_raw_run(store: AnalysisStore) -> str:
    """A raw run of EVENTS events of a 2x2 frame ``x`` (no parents, no provenance)."""
    bundle = compose_run(metadata={"plan_name": "count"})
    store("start", bundle.start_doc)
    stream = bundle.compose_descriptor(
        name="primary",
        data_keys={"x": {"source": "sim", "dtype": "array", "shape": [2, 2]}},
    )
    store("descriptor", stream.descriptor_doc)
    for n in range(EVENTS):
        frame = [[n, n + 1], [n + 2, n + 3]]
        store("event", stream.compose_event(data={"x": frame}, timestamps={"x": time.time()}))
    store("stop", bundle.compose_stop())
    store.flush()
    return bundle.start_doc["uid"]


def reduce_with(store: AnalysisStore, raw_uid: str, reducer: Any) -> str:
    """The child ``reducer`` makes of ``raw_uid``, failed or not."""
    report = reprocess(store, raw_uid, [reducer], store, progress=False)
    [child] = [*report.saved.values(), *report.failed_children.values()]
    return child


@pytest.fixture(scope="module")
def versions(store: AnalysisStore) -> dict[str, str]:
    """A raw run and, oldest first: two versions of ``scaled_total`` (other parameters),
    another reducer, and a third ``scaled_total`` that fails on every event."""
    raw = save_raw_run(store)
    runs = {"raw": raw}
    runs["first"] = reduce_with(store, raw, functools.partial(scaled_total, key="x"))
    runs["second"] = reduce_with(store, raw, functools.partial(scaled_total, key="x", factor=2))
    runs["peak"] = reduce_with(store, raw, functools.partial(frame_peak, key="x"))
    runs["failed"] = reduce_with(store, raw, functools.partial(scaled_total, key="nope"))
    return runs


def current_of(store: AnalysisStore, raw_uid: str) -> list[str]:
    return list(store.children(raw_uid, current=True))


def test_the_newest_child_that_succeeded_is_current_for_each_reducer(store, versions) -> None:
    children = store.children(versions["raw"])
    assert children == [versions[k] for k in ("failed", "peak", "second", "first")]
    by_uid = {child: child for child in children}
    assert not by_uid[versions["failed"]].succeeded  # the newest, but it failed
    assert [c for c in children if c.current] == [versions["peak"], versions["second"]]
    assert by_uid[versions["second"]].reducer == by_uid[versions["first"]].reducer
    assert by_uid[versions["second"]].reducer == ("_offline_reducers:scaled_total",)
    assert current_of(store, versions["raw"]) == [versions["peak"], versions["second"]]
    assert current_of(store, versions["raw"][:8]) == [versions["peak"], versions["second"]]


def test_a_pin_makes_an_older_child_current_for_every_client_until_taken_away(
    store, module_store_folder, versions
) -> None:
    raw, first, second, peak = (versions[k] for k in ("raw", "first", "second", "peak"))
    other_client = AnalysisStore.open(module_store_folder, served=False)
    try:
        pinned = store.pin(first[:8])
        assert pinned == first and pinned.pinned_at is not None
        assert current_of(other_client, raw) == [peak, first]  # kept in the catalog
        store.pin(second)  # the most recent pin wins
        assert current_of(other_client, raw) == [peak, second]
        store.unpin(second)  # the other pin stands
        assert current_of(store, raw) == [peak, first]
        assert store.unpin(first).pinned_at is None
        assert current_of(other_client, raw) == [peak, second]
        assert store.unpin(first).pinned_at is None  # nothing to take away: no change
    finally:
        store.unpin(first)
        store.unpin(second)


def test_only_a_complete_child_this_package_wrote_can_be_pinned(store, versions) -> None:
    with pytest.raises(AnalysisStoreError, match="not a derived run"):
        store.pin(versions["raw"])
    with pytest.raises(RunNotFoundError):
        store.pin(str(uuid.uuid4()))
    forged = hand_made_child(store, versions["raw"])
    with pytest.raises(AnalysisStoreError, match="no valid seal"):
        store.pin(forged)


def hand_made_child(store: AnalysisStore, parent_uid: str, **node_metadata: Any) -> str:
    """A child written by hand (unsealed), claiming the code of ``scaled_total``, with
    ``node_metadata`` added to its node."""
    start = {
        "uid": str(uuid.uuid4()),
        "time": time.time(),
        "parent_uids": [parent_uid],
        "provenance": {"code": [{"name": "_offline_reducers:scaled_total", "version": "9"}]},
    }
    store("start", start)
    store("stop", {"uid": str(uuid.uuid4()), "time": start["time"], "run_start": start["uid"],
                   "exit_status": "success", "reason": "", "num_events": {}})  # fmt: skip
    store.flush()
    if node_metadata:
        store.catalog[start["uid"]].update_metadata(node_metadata)
    return start["uid"]


@pytest.mark.parametrize(
    "record", ["yes", {"time": "now"}, {"time": math.inf}, {"time": True}, {}, [1.0]]
)
def test_a_malformed_pin_is_no_pin(store, versions, record) -> None:
    node = store.catalog[versions["first"]]
    node.update_metadata({PIN_KEY: record})
    try:
        [first] = [c for c in store.children(versions["raw"]) if c == versions["first"]]
        assert first.pinned_at is None and not first.current
        assert current_of(store, versions["raw"]) == [versions["peak"], versions["second"]]
    finally:
        store.unpin(versions["first"])


def test_a_pinned_child_without_the_seal_is_never_current(store, versions) -> None:
    forged = hand_made_child(store, versions["raw"], **{PIN_KEY: {"time": time.time() + 1e6}})
    [listed] = [c for c in store.children(versions["raw"], unverified=True) if c == forged]
    assert listed.pinned_at is not None and not listed.current
    assert current_of(store, versions["raw"]) == [versions["peak"], versions["second"]]
    assert forged not in store.children(versions["raw"], unverified=True, current=True)


# --- the command line ---------------------------------------------------------------------


def test_ls_marks_the_current_and_pinned_children_and_pin_pins(
    store, module_store_folder, versions
) -> None:
    base = ("--store", str(module_store_folder))
    raw, first, second = versions["raw"], versions["first"], versions["second"]

    status, out, err = run_command(*base, "pin", first[:8])
    assert (status, err) == (0, ""), err
    assert out.startswith(f"{first}  pinned: the current _offline_reducers:scaled_total result")
    assert raw in out
    try:
        status, out, _ = run_command(*base, "ls", "--children", raw[:8])
        lines = {line.split()[0]: line for line in out.splitlines()}
        assert lines[first].endswith("(current, pinned)")
        assert "current" not in lines[second] and "current" not in lines[versions["failed"]]
        assert lines[versions["peak"]].endswith("(current)")

        status, out, _ = run_command(*base, "ls", "--children", raw, "--current", "--json")
        listed = json.loads(out)
        assert [r["uid"] for r in listed] == [versions["peak"], first]
        assert [(r["current"], r["pinned"]) for r in listed] == [(True, False), (True, True)]

        status, out, _ = run_command(*base, "ls", "--json")
        assert {r["uid"]: r["pinned"] for r in json.loads(out)}[first] is True
        assert {r["current"] for r in json.loads(out)} == {None}  # not worked out here
    finally:
        status, out, err = run_command(*base, "pin", first, "--clear")
    assert (status, err) == (0, ""), err
    assert out.startswith(f"{first}  unpinned")
    assert current_of(store, raw) == [versions["peak"], second]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("ls", "--current"), "--current lists the current results of one run: add --children"),
        (("pin", "RAW"), "CHILD_UID: run RAW is not a derived run"),
        (("pin", "0123456789"), "CHILD_UID: no run '0123456789'"),
    ],
)
def test_pin_and_ls_current_refuse_what_they_cannot_do(
    module_store_folder, versions, args, message
) -> None:
    args = tuple(versions["raw"] if a == "RAW" else a for a in args)
    status, out, err = run_command("--store", str(module_store_folder), *args)
    assert status == 2 and out == ""
    assert message.replace("RAW", versions["raw"]) in err, err
    assert "Traceback" not in err
