"""Lineage: a three-generation chain read both ways, through ``store.lineage`` and the
``lineage`` command; a run reached twice is listed once more as seen, and a cycle that
hand-made starts draw ends."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import numpy as np
import pytest
from _helpers import run_command

from bluesky_analysis_store import AnalysisStore, RunNotFoundError

pytestmark = pytest.mark.usefixtures("isolated_env")

OUTSIDE_RAW = "c6041c47-1111-4000-8000-000000000000"  # a raw run of another catalog


def child_of(store: AnalysisStore, *parents: Any) -> str:
    return store.save([{"primary": {"y": 1.0}}], {}, parents=list(parents), code=np.mean)


@pytest.fixture(scope="module")
def chain(store: AnalysisStore) -> dict[str, str]:
    """raw (of another catalog) -> first, second -> grandchild (of first) -> merged, whose
    parents are the grandchild and ``second`` (so ``second`` is reached twice going back)."""
    outside = {"uid": OUTSIDE_RAW, "time": 0.0}
    runs = {"first": child_of(store, outside)}
    runs["second"] = child_of(store, outside)
    runs["grandchild"] = child_of(store, store.client[runs["first"]])
    runs["merged"] = child_of(store, store.client[runs["grandchild"]], store.client[runs["second"]])
    return runs


def uids(node: Any) -> Any:
    """A lineage tree as nested ``[uid, [links...]]``, ``seen`` runs as ``(uid, "seen")``."""
    if node.seen:
        return (node.uid, "seen")
    return [node.uid, [uids(link) for link in node.links]]


def test_the_chain_is_read_both_ways(store, chain) -> None:
    first, second, grandchild, merged = (chain[k] for k in ("first", "second", "grandchild",
                                                             "merged"))  # fmt: skip
    found = store.lineage(OUTSIDE_RAW[:8])
    assert found.uid == OUTSIDE_RAW and found.ancestry.run is None  # not in this store
    assert uids(found.descent) == [OUTSIDE_RAW, [
        [second, [[merged, []]]],
        [first, [[grandchild, [(merged, "seen")]]]],
    ]]  # fmt: skip
    assert [link.current for link in found.descent.links] == [True, False]  # same code

    back = store.lineage(merged)
    assert uids(back.ancestry) == [merged, [
        [grandchild, [[first, [[OUTSIDE_RAW, []]]]]],
        [second, [(OUTSIDE_RAW, "seen")]],
    ]]  # fmt: skip
    assert back.ancestry.links[0].links[0].links[0].run is None
    assert uids(back.descent) == [merged, []]


def test_max_depth_stops_the_walk_and_says_so(store, chain) -> None:
    found = store.lineage(chain["merged"], max_depth=1)
    [grandchild, second] = found.ancestry.links
    assert grandchild.truncated and grandchild.links == []
    assert not found.ancestry.truncated


def test_a_cycle_of_hand_made_starts_ends(store) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    for uid, parent in ((a, b), (b, a)):
        start = {"uid": uid, "time": time.time(), "parent_uids": [parent]}
        store("start", start)
        store("stop", {"uid": str(uuid.uuid4()), "time": start["time"], "run_start": uid,
                       "exit_status": "success", "reason": "", "num_events": {}})  # fmt: skip
    store.flush()
    assert uids(store.lineage(a).ancestry) == [a, [[b, [(a, "seen")]]]]
    assert uids(store.lineage(a).descent) == [a, []]  # unsealed runs are not its children


def test_an_unknown_run_has_no_lineage(store) -> None:
    with pytest.raises(RunNotFoundError):
        store.lineage(str(uuid.uuid4()))


def test_the_command_prints_the_chain_both_ways(store, module_store_folder, chain) -> None:
    base = ("--store", str(module_store_folder))
    status, out, err = run_command(*base, "lineage", chain["grandchild"][:8])
    assert (status, err) == (0, ""), err
    lines = out.splitlines()
    back = lines[: lines.index("# what was derived from it (-> its children)")]
    down = lines[len(back):]
    assert back[0] == "# where it came from (<- its parents)"
    assert back[1].startswith(chain["grandchild"])
    assert "derived  numpy._core.fromnumeric:mean" in back[1]
    assert back[2].startswith(f"<- {chain['first']}")
    assert back[3] == f"   <- {OUTSIDE_RAW}  (not in this store)"
    assert down[1].startswith(chain["grandchild"])
    assert down[2].startswith(f"-> {chain['merged']}")
    assert len(down) == 3

    status, out, _ = run_command(*base, "lineage", chain["second"], "--json")
    record = json.loads(out)
    assert [p["uid"] for p in record["parents"]] == [OUTSIDE_RAW]
    assert record["parents"][0]["summary"] is None
    assert [c["uid"] for c in record["children"]] == [chain["merged"]]
    assert record["children"][0]["summary"]["kind"] == "derived"

    status, out, err = run_command(*base, "lineage", "0123456789")
    assert status == 2 and "UID: no run '0123456789'" in err


def test_a_run_with_nothing_derived_says_so(module_store_folder, chain) -> None:
    status, out, _ = run_command("--store", str(module_store_folder), "lineage", chain["merged"])
    assert status == 0
    assert out.splitlines()[-1] == "   (no run derived from it in this store)"
