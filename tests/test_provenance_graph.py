"""PROV links in tiled's graph: a saved child run is linked to its parents
(``prov:wasDerivedFrom``), to the activity that generated it (``prov:wasGeneratedBy``, with
the code records), and that activity to the parents and input files it used; read back
through tiled's GraphQL API. A tiled without the graph keeps the facts in the start only."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np
import pytest

from bluesky_analysis_store import AnalysisStore
from bluesky_analysis_store._provenance_graph import provenance_links, write_provenance_links

pytestmark = pytest.mark.usefixtures("isolated_env")

OUTSIDE = "c6041c47-2222-4000-8000-000000000000"  # a raw run of another catalog


def triples(links: list[dict]) -> set[tuple[str, str, str]]:
    """Each link as (subject, predicate, object), an entity named by its uri, else name."""
    def name(entity: dict) -> str:
        return entity["uri"] or entity["name"]
    return {(name(link["subject"]), link["predicate"], name(link["object"])) for link in links}


def save_linked_child(store: AnalysisStore, tmp_path: Path) -> tuple[str, str, Path]:
    data = tmp_path / "counts.txt"
    data.write_text("1\n2\n")
    raw = store.save([{"primary": {"x": 1.0}}], {}, files=[data], code=np.mean)
    parents = [store.client[raw], {"uid": OUTSIDE, "time": 0.0}]
    child = store.save([{"primary": {"y": 2.0}}], {}, parents=parents, code=np.mean)
    return raw, child, data


def assert_child_links(store: AnalysisStore, raw: str, child: str, data: Path) -> None:
    activity = f"reduction that generated {child}"
    links = provenance_links(store.catalog, child)
    assert triples(links) == {
        (child, "prov:wasGeneratedBy", activity),
        (child, "prov:wasDerivedFrom", raw),
        (child, "prov:wasDerivedFrom", f"urn:bluesky:run:{OUTSIDE}"),
        (activity, "prov:used", raw),
        (activity, "prov:used", f"urn:bluesky:run:{OUTSIDE}"),
    }
    by_object = {link["object"]["uri"] or link["object"]["name"]: link["object"] for link in links}
    assert by_object[raw]["isNodeBound"] is True  # the parent's own node, in this catalog
    assert by_object[f"urn:bluesky:run:{OUTSIDE}"]["isNodeBound"] is False
    [code] = by_object[activity]["properties"]["code"]
    assert code["name"] == store[child].start["provenance"]["code"][0]["name"]
    assert code["version"] == store[child].start["provenance"]["code"][0]["version"]

    raw_links = triples(provenance_links(store.catalog, raw))
    assert (f"reduction that generated {raw}", "prov:used", f"file://{data}") in raw_links


def test_a_saved_child_is_linked_to_its_parents_code_and_files(store, tmp_path) -> None:
    raw, child, data = save_linked_child(store, tmp_path)
    assert_child_links(store, raw, child, data)


def doubled(data: dict) -> dict:
    return {"double": 2 * data["det"]}


def test_a_live_child_is_linked_to_its_raw_run(store, tmp_path) -> None:
    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd.sim import det

    from bluesky_analysis_store import AnalysisStoreCallback

    RE = RunEngine({})  # noqa: N806
    RE.subscribe(store)
    callback = AnalysisStoreCallback([doubled], store, background=False)
    RE.subscribe(callback)
    (raw,) = RE(count([det], num=2))
    callback.close(timeout=60)
    [child] = store.children(raw)
    found = triples(provenance_links(store.catalog, child))
    assert (child, "prov:wasDerivedFrom", raw) in found
    assert (child, "prov:wasGeneratedBy", f"reduction that generated {child}") in found


def test_a_tiled_without_the_graph_keeps_the_facts_in_the_start_only(caplog) -> None:
    from tiled.adapters.mapping import MapAdapter
    from tiled.client import Context, from_context
    from tiled.server.app import build_app

    no_graph = from_context(Context.from_app(build_app(MapAdapter({}))))
    start = {"uid": str(uuid.uuid4()), "parent_uids": [OUTSIDE], "provenance": {"code": []}}
    with caplog.at_level(logging.INFO, logger="bluesky_analysis_store._provenance_graph"):
        assert write_provenance_links(no_graph, start["uid"], start) is False
    assert "provenance links not written (the store's tiled has no graph" in caplog.text
