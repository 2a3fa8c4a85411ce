"""The store's tiled app: tiled's settings reach every route, and fastapi does not resolve
the dependencies of each request anew (tiled's override is already applied)."""

from __future__ import annotations

import secrets

import fastapi.dependencies.utils
import numpy as np
import pytest
from tiled.client import Context, from_context

from bluesky_analysis_store._store import build_embedded_app

API_KEY = secrets.token_hex(32)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    from tiled.server.settings import get_settings

    settings = get_settings()
    key_before = settings.single_user_api_key
    yield build_embedded_app(tmp_path_factory.mktemp("store"), [], api_key=API_KEY)
    # tiled keeps one settings object per process, which an app's settings change in place:
    # the stores that other tests serve in this process get their key back.
    settings.single_user_api_key = key_before


def test_requests_resolve_no_dependency_anew(app, monkeypatch: pytest.MonkeyPatch):
    with Context.from_app(app, api_key=API_KEY) as context:
        node = from_context(context, structure_clients="numpy").write_array(
            np.arange(5), key="values"
        )
        resolved: list[object] = []
        original = fastapi.dependencies.utils.get_dependant

        def counting(*args, **kwargs):
            resolved.append(kwargs.get("call"))
            return original(*args, **kwargs)

        monkeypatch.setattr(fastapi.dependencies.utils, "get_dependant", counting)
        for _ in range(3):
            np.testing.assert_array_equal(node.read(), np.arange(5))
            node.refresh()
    # While tiled's settings override counted as one, fastapi resolved each dependency of
    # each request again: hundreds of calls for these six requests.
    assert resolved == []


def test_the_settings_of_the_app_are_in_force(app):
    # The API key is one of the settings tiled's override sets: a request without it is
    # refused, one with it answered.
    with Context.from_app(app, api_key=None) as anonymous:
        assert anonymous.http_client.get(f"{anonymous.api_uri}metadata/").status_code == 401
    with Context.from_app(app, api_key=API_KEY) as context:
        client = from_context(context, structure_clients="numpy")
        client.write_array(np.arange(3), key="accepted")
        assert "accepted" in list(client)
