"""New stores' catalogs are copies of an empty one made once, and work as tiled's own."""

from __future__ import annotations

import numpy as np

from bluesky_analysis_store import AnalysisStore
from bluesky_analysis_store._catalog_template import CACHE_ENV, copy_empty_catalog


def test_a_new_store_copies_the_empty_catalog_and_works(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert copy_empty_catalog(tmp_path / "first.db")
    (template,) = (tmp_path / "cache").glob("empty-catalog-tiled-*.db")
    made = template.stat().st_mtime_ns
    store = AnalysisStore.open(tmp_path / "store", served=False)
    assert template.stat().st_mtime_ns == made, "the template is made once, then copied"
    uid = store.save(
        [{"primary": {"x": 1.5, "image": np.arange(6.0).reshape(2, 3)}}], {}, strict=False
    )
    reopened = AnalysisStore.open(tmp_path / "store", served=False)
    assert reopened[uid]["primary"]["x"].read().tolist() == [1.5]
    np.testing.assert_array_equal(
        reopened.read(f"{uid}/primary/image")[0], np.arange(6.0).reshape(2, 3)
    )
    assert len(reopened) == 1


def test_without_a_usable_cache_tiled_creates_the_catalog(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    assert not copy_empty_catalog(tmp_path / "x.db")
    assert not list(tmp_path.glob(".x.db.*"))
    store = AnalysisStore.open(tmp_path / "store", served=False)
    uid = store.save([{"primary": {"x": 2.0}}], {}, strict=False)
    assert store[uid]["primary"]["x"].read().tolist() == [2.0]
