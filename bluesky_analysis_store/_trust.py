"""The seal: how the store tells a child run this package wrote from one that only claims to be.

A start document is the writer's word: anyone can put ``parent_uids`` and ``provenance`` in
one and send it to ``store(name, doc)``, to a TiledWriter, or replay it from a file. So the
package's own write path (the journal, then delivery: ``_delivery.py``) adds a seal to each
run node it creates, in the node's metadata beside ``start`` and ``stop`` (never in a
document, so no stream of documents can carry one), holding the sha256 of the start document
as stored. :func:`is_sealed` checks the seal against the start read back: a start edited
after it was saved breaks it. A seal is no signature: a client with write access to the
catalog can write one too (see docs/decisions/0007-trusted-provenance.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping
from importlib import metadata
from typing import Any

__all__ = ["SEAL_KEY", "claims_derivation", "is_sealed", "seal_for", "start_sha256"]

SEAL_KEY = "analysis_store_seal"
"""The key of the seal in a run node's metadata."""

SEALED_BY = "bluesky-analysis-store"

# Keys of a start document the plugin's run writer takes out before it stores the start.
_NOT_STORED = ("tiled_access_tags", "tiled_specs")


def claims_derivation(start: Mapping[str, Any]) -> bool:
    """Whether a start document says it is derived data (it names parents or provenance)."""
    return "parent_uids" in start or "provenance" in start


def start_sha256(start: Mapping[str, Any], *, stored: bool = False) -> str:
    """The sha256 of a start document in the form the catalog keeps it, so that the start
    given to the writer and the start read back (``stored=True``) give the same digest."""
    if not stored:
        # What the plugin's run writer does to a start (idempotent, so a start read back
        # need not go through it again, nor import the plugin: a second).
        from bluesky_tiled_plugins.utils import truncate_json_overflow

        start = truncate_json_overflow({k: v for k, v in start.items() if k not in _NOT_STORED})
    text = json.dumps(_finite(start), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def seal_for(start: Mapping[str, Any]) -> dict[str, Any]:
    """The seal of a run whose start is ``start``, written by this package."""
    return {"sealed_by": SEALED_BY, "version": _version(), "start_sha256": start_sha256(start)}


def is_sealed(node_metadata: Mapping[str, Any]) -> bool:
    """Whether a run node's metadata holds this package's seal, and the seal matches the
    start document stored beside it."""
    seal = node_metadata.get(SEAL_KEY)
    start = node_metadata.get("start")
    if not isinstance(seal, Mapping) or not isinstance(start, Mapping):
        return False
    return seal.get("sealed_by") == SEALED_BY and seal.get("start_sha256") == start_sha256(
        start, stored=True
    )


def _finite(value: Any) -> Any:
    """NaN and infinities as JSON's tiled transport gives them back (null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@functools.cache
def _version() -> str:
    try:
        return metadata.version(SEALED_BY)
    except metadata.PackageNotFoundError:
        return "unknown"
