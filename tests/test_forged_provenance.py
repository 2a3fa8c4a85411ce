"""Provenance that cannot lie: unknown parents refused, hand-made children not listed.

A real embedded store of the module's own. A child run counts as derived data only when the
package's write path saved it (its node carries the seal, matching its start document); a
start document that merely claims ``parent_uids``/``provenance`` is kept as an unverified run.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import numpy as np
import pytest
from bluesky_tiled_plugins import TiledWriter

from bluesky_analysis_store import (
    AnalysisStore,
    ProvenanceError,
    compose_documents,
    make_provenance,
)
from bluesky_analysis_store._trust import SEAL_KEY, is_sealed

pytestmark = pytest.mark.usefixtures("isolated_env")

FORGED_CODE = {"name": "trusted_lab.pipeline:integrate", "version": "9.9", "importable": True}


@pytest.fixture(scope="module")
def raw_uid(store: AnalysisStore, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A run of the store that children name as their parent (an ingested file)."""
    source = tmp_path_factory.mktemp("input") / "counts.txt"
    source.write_text("1\n2\n")
    return store.save([{"primary": {"x": 1.0}}], {"kind": "raw"}, files=[source], code=np.mean)


def forged_start(parent_uid: str) -> dict[str, Any]:
    """A start document written by hand, claiming to be a child made by some code."""
    return {
        "uid": str(uuid.uuid4()),
        "time": 1.0e9,
        "parent_uids": [parent_uid],
        "provenance": {"parents": [{"uid": parent_uid}], "code": [FORGED_CODE], "strict": True},
    }


def stop_of(start: dict[str, Any]) -> dict[str, Any]:
    return {
        "uid": str(uuid.uuid4()),
        "time": start["time"] + 1,
        "run_start": start["uid"],
        "exit_status": "success",
        "reason": "",
        "num_events": {},
    }


def entries(folder: str | None) -> set[str]:
    return set(os.listdir(folder)) if folder and os.path.isdir(folder) else set()


# --- parents ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parents",
    [["no-such-run"], [{"uid": "no-such-run", "streams": ["primary"]}]],
    ids=["uid", "record"],
)
def test_save_refuses_a_parent_the_store_does_not_hold(store, raw_uid, parents) -> None:
    runs, files = len(store), entries(store.asset_root)
    with pytest.raises(ProvenanceError, match="no-such-run.*not in the catalog"):
        store.save([{"primary": {"img": np.ones((2, 2))}}], {}, {"img": "TIFF"},
                   parents=[raw_uid, *parents], code=np.mean)
    assert len(store) == runs  # nothing reached the catalog
    assert entries(store.asset_root) == files  # and no file was written


def test_each_parent_says_whether_and_how_it_was_verified(store, raw_uid) -> None:
    # Without a catalog, a bare uid cannot be checked: recorded as unverified.
    _, provenance = make_provenance(parents=["elsewhere"], code=np.mean)
    assert provenance["parents"] == [{"uid": "elsewhere", "verified": False}]
    # A catalog given to make_provenance checks it (and refuses what it lacks).
    _, provenance = make_provenance(parents=[raw_uid], code=np.mean, catalog=store)
    assert provenance["parents"] == [
        {"uid": raw_uid, "verified": True, "verified_by": "catalog"}
    ]
    with pytest.raises(ProvenanceError, match="elsewhere"):
        make_provenance(parents=["elsewhere"], code=np.mean, catalog=store)

    run = store[raw_uid]
    by_client = store.save([{"primary": {"y": 1}}], {}, parents=[run], code=np.mean)
    by_start = store.save([{"primary": {"y": 2}}], {}, parents=[run.start], code=np.mean)
    by_uid = store.save([{"primary": {"y": 3}}], {}, parents=[raw_uid], code=np.mean)
    recorded = {uid: store[uid].start["provenance"]["parents"] for uid in
                (by_client, by_start, by_uid)}
    assert recorded[by_client] == [
        {"uid": raw_uid, "streams": ["primary"], "verified": True, "verified_by": "run client"}
    ]
    assert recorded[by_start] == [
        {"uid": raw_uid, "verified": True, "verified_by": "start document"}
    ]
    assert recorded[by_uid] == [{"uid": raw_uid, "verified": True, "verified_by": "catalog"}]
    assert set(store.children(raw_uid)) >= {by_client, by_start, by_uid}
    assert all(child.verified for child in store.children(raw_uid))


# --- hand-made children -------------------------------------------------------------------


def test_a_hand_made_child_given_to_the_store_is_not_listed(store, raw_uid, caplog) -> None:
    start = forged_start(raw_uid)
    with caplog.at_level(logging.WARNING, logger="bluesky_analysis_store._store"):
        store("start", start)
        store("stop", stop_of(start))
    store.flush()
    assert "saved unsealed, as an unverified run" in caplog.text

    forged = start["uid"]
    assert forged in store  # kept: nothing a user saves is thrown away
    assert forged not in store.children(raw_uid)
    listed = {child: child for child in store.children(raw_uid, unverified=True)}
    assert forged in listed
    assert listed[forged].verified is False
    assert listed[forged].code_versions == "trusted_lab.pipeline:integrate 9.9"
    assert SEAL_KEY not in store.client[forged].metadata


def test_documents_composed_by_the_package_but_not_saved_by_it_are_not_listed(
    store, raw_uid
) -> None:
    """compose_documents makes genuine documents; written by a plain TiledWriter or through
    ``store(name, doc)`` they still lack the seal: only the store's own saving seals."""
    through_call = list(compose_documents([{"primary": {"z": 1}}], {}, parents=[raw_uid],
                                          code=np.mean))
    for name, doc in through_call:
        store(name, doc)
    store.flush()
    through_writer = list(compose_documents([{"primary": {"z": 2}}], {}, parents=[raw_uid],
                                            code=np.mean))
    writer = TiledWriter(store.client)
    for name, doc in through_writer:
        writer(name, doc)

    unsealed = {through_call[0][1]["uid"], through_writer[0][1]["uid"]}
    assert all(uid in store for uid in unsealed)
    assert not unsealed & set(store.children(raw_uid))
    assert unsealed <= set(store.children(raw_uid, unverified=True))


def test_a_start_edited_after_saving_breaks_the_seal(store, raw_uid) -> None:
    child = store.save([{"primary": {"w": 1}}], {"note": "kept"}, parents=[raw_uid],
                       code=np.mean)
    node = store.client[child]
    assert is_sealed(node.metadata) and child in store.children(raw_uid)

    code = node.metadata["start"]["provenance"]["code"]
    edited_code = [{**code[0], "version": "1.0-edited"}]
    node.update_metadata({"start": {"provenance": {"code": edited_code}}})

    assert store.client[child].metadata["start"]["provenance"]["code"] == edited_code
    assert not is_sealed(store.client[child].metadata)
    assert child not in store.children(raw_uid)
    [listed] = [c for c in store.children(raw_uid, unverified=True) if c == child]
    assert listed.verified is False


def test_a_copied_seal_does_not_match_another_start(store, raw_uid) -> None:
    """A seal is bound to its start: copying one onto a forged run does not verify it."""
    genuine = store.save([{"primary": {"v": 1}}], {}, parents=[raw_uid], code=np.mean)
    start = forged_start(raw_uid)
    store("start", start)
    store("stop", stop_of(start))
    store.flush()
    seal = store.client[genuine].metadata[SEAL_KEY]
    store.client[start["uid"]].update_metadata({SEAL_KEY: dict(seal)})
    assert start["uid"] not in store.children(raw_uid)


def test_raw_runs_through_the_store_are_kept_as_they_are(store, caplog) -> None:
    """A raw run (no parent_uids, no provenance) goes through store(name, doc) unchanged and
    without a warning: the seal is only about derived data."""
    start = {"uid": str(uuid.uuid4()), "time": 2.0e9, "plan_name": "count"}
    with caplog.at_level(logging.WARNING, logger="bluesky_analysis_store._store"):
        store("start", start)
        store("stop", stop_of(start))
    store.flush()
    assert dict(store[start["uid"]].start) == start
    assert "unverified" not in caplog.text
