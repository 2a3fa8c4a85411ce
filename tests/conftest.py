"""Fixtures shared by the foundation tests.

Creating an embedded store runs tiled's catalog initialisation in a subprocess (seconds), so
one store is made per session and shared by every test that does not need a fresh one; tests
that share it use uids of their own and never count the runs of others. ``reader`` is a
second store object opened on the same folder: what it reads came from the disk, not from a
cache of the writing object.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bluesky_analysis_store import DATA_ROOT_ENV, STORE_ENV, AnalysisStore


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the default data root and store at ``tmp_path``: nothing lands in the checkout."""
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "default-data"))
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "default-store"))
    return tmp_path


@pytest.fixture(scope="session")
def store_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared") / "store"


@pytest.fixture(scope="session")
def shared_store(store_folder: Path) -> AnalysisStore:
    """The session's embedded store (created once)."""
    return AnalysisStore.open(store_folder)


@pytest.fixture(scope="session")
def reader(shared_store: AnalysisStore, store_folder: Path) -> AnalysisStore:
    """A separate store object on the same folder, for reading back."""
    return AnalysisStore.open(store_folder)
