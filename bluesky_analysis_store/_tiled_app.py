"""tiled's server app for a store, without fastapi resolving its dependencies per request.

tiled's ``build_app`` hands its settings to the routes with
``app.dependency_overrides[get_settings]``. While an app has any override, fastapi resolves
the dependencies of every request anew (``get_dependant``, which inspects the signature of
each dependency): that was about half of the processor time of a store server's requests.
tiled's override updates the process's one settings object (``get_settings()``, cached) in
place and returns it, so once the override has run, the dependency it replaces returns the
very same object. The app then keeps the override, which tiled's own code looks up, in a
mapping that fastapi takes for empty. Where tiled's override returns another object, the
app is left as tiled built it: slower, never different.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_store_app"]


class _OverridesAlreadyApplied(dict):
    """The app's dependency overrides, each of which returns what the dependency it
    overrides now returns: fastapi, which skips its per-request resolution for an empty
    mapping, need not apply them; lookups still find them."""

    def __bool__(self) -> bool:
        return False


def _serialization_registry() -> Any:
    """tiled's exporters plus bluesky's document stream, so that ``run.documents()`` works."""
    import copy

    from bluesky_tiled_plugins.exporters import json_seq_exporter
    from tiled.media_type_registration import default_serialization_registry

    registry = copy.copy(default_serialization_registry)
    registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)
    return registry


def build_store_app(adapter: Any, *, api_key: str | None = None) -> Any:
    """tiled's app serving ``adapter`` with the store's serializers, requiring ``api_key``
    when one is given."""
    from tiled.server.app import build_app
    from tiled.server.settings import get_settings

    authentication = None
    if api_key is not None:
        from tiled.config import Authentication

        authentication = Authentication(single_user_api_key=api_key)
    app = build_app(
        adapter, authentication=authentication, serialization_registry=_serialization_registry()
    )
    overrides = app.dependency_overrides
    if set(overrides) == {get_settings} and overrides[get_settings]() is get_settings():
        app.dependency_overrides = _OverridesAlreadyApplied(overrides)
    return app
