"""Access follows the data: a derived run is tagged as its parents, under tiled's tag-based
access policy, with real users of a real ``tiled serve`` process."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from _tag_policy import TagPolicyServer
from bluesky import RunEngine
from bluesky.plans import count
from ophyd.sim import SynAxis, SynGauss

from bluesky_analysis_store import (
    AnalysisStore,
    AnalysisStoreCallback,
    MetadataError,
    RunNotFoundError,
)
from bluesky_analysis_store._access_tags import inherit_access_tags

pytestmark = pytest.mark.usefixtures("isolated_env")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TagPolicyServer]:
    server = TagPolicyServer(tmp_path_factory.mktemp("tag-policy"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stores(server: TagPolicyServer) -> dict[str, AnalysisStore]:
    """One store client per user; the beamline's writes files the server may read."""
    return {
        user: AnalysisStore.from_uri(
            server.uri, api_key=server.api_key(user), asset_root=server.assets
        )
        for user in ("beamline", "alice", "bob")
    }


def total(data: dict) -> dict:
    return {"total": float(data["det"]) * 2}


@pytest.fixture(scope="module")
def runs(stores: dict[str, AnalysisStore]) -> dict[str, str]:
    """A raw run tagged ``proposal_a``, a child saved from it live (the callback) and one
    saved offline (``store.save`` naming it)."""
    beamline = stores["beamline"]
    RE = RunEngine()  # noqa: N806
    motor = SynAxis(name="motor")
    det = SynGauss("det", motor, "motor", center=0, Imax=1, sigma=1)
    RE.subscribe(beamline)  # the raw run, as a beamline records it
    callback = AnalysisStoreCallback([total], beamline, background=False, on_error="raise")
    callback.subscribe(RE)
    (raw,) = RE(count([det], num=2), tiled_access_tags=["proposal_a"])
    assert callback.flush(timeout=60)
    callback.close(timeout=60)
    (live,) = beamline.children(raw)
    offline = beamline.save([{"primary": {"x": 1.0}}], {"purpose": "offline"},
                            parents=[raw], code=np.mean)  # fmt: skip
    return {"raw": raw, "live": str(live), "offline": offline}


def test_children_get_the_tags_of_their_parent(stores, runs) -> None:
    catalog = stores["beamline"].catalog
    assert list(catalog[runs["raw"]].access_tags) == ["proposal_a"]
    for child in ("live", "offline"):
        assert list(catalog[runs[child]].access_tags) == ["proposal_a"], child
    # The tags are the node's, not a key of the saved start; the seal still holds.
    assert "tiled_access_tags" not in catalog[runs["live"]].metadata["start"]
    assert stores["beamline"].children(runs["raw"])[0].verified


def test_a_user_who_may_read_the_parent_reads_its_children(stores, runs) -> None:
    alice = stores["alice"]
    assert {str(c) for c in alice.children(runs["raw"])} == {runs["live"], runs["offline"]}
    np.testing.assert_array_equal(alice.read_stream(runs["offline"])["x"], [1.0])
    assert len(alice.read_stream(runs["live"])["total"]) == 2


def test_a_user_who_cannot_read_the_parent_cannot_read_its_children(stores, runs) -> None:
    bob = stores["bob"]
    for uid in runs.values():
        assert uid not in bob
        with pytest.raises(RunNotFoundError):
            bob[uid]
    with pytest.raises(RunNotFoundError):
        bob.children(runs["raw"])


def test_tags_given_in_md_win(stores, runs) -> None:
    beamline = stores["beamline"]
    child = beamline.save([{"primary": {"x": 2.0}}], {"tiled_access_tags": ["proposal_b"]},
                          parents=[runs["raw"]], code=np.mean)  # fmt: skip
    assert list(beamline.catalog[child].access_tags) == ["proposal_b"]
    assert child in stores["bob"] and child not in stores["alice"]


def test_parents_sharing_no_tag_leave_the_choice_to_the_user() -> None:
    a, b = frozenset({"proposal_a"}), frozenset({"proposal_b", "staff"})
    with pytest.raises(MetadataError, match="share no access tag"):
        inherit_access_tags({}, [a, b])
    assert inherit_access_tags({}, [a | {"staff"}, b]) == {"tiled_access_tags": ["staff"]}
    assert inherit_access_tags({}, [None, a]) == {"tiled_access_tags": ["proposal_a"]}
    assert inherit_access_tags({}, [None]) == {}  # a catalog without access control


def test_principal_tags_and_malformed_tags_are_not_copied() -> None:
    from bluesky_analysis_store._access_tags import start_access_tags

    assert start_access_tags({"tiled_access_tags": ["user:alice", "proposal_a"]}) == {
        "proposal_a"
    }
    assert start_access_tags({"tiled_access_tags": "proposal_a"}) is None  # not a list
    assert start_access_tags({"tiled_access_tags": [""]}) is None
    assert start_access_tags({}) is None
