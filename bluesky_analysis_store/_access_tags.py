"""A derived run is tagged as the raw data it came from (tiled's tag-based access control).

bluesky-tiled-plugins' TiledWriter tags a run's nodes with the start document's
``tiled_access_tags`` (and keeps the key out of the saved start). A child run gets, by
default, the tags its parents have in common, so that whoever may read it through a tag
may read every parent through the same tag: a user who cannot read a parent cannot read
its child. Parents that share no tag leave no safe default; the caller must choose the
child's tags (``md={"tiled_access_tags": [...]}``). Tags naming a principal (``user:...``,
``service:...``) are the policy's own, never copied: tiled refuses them from a writer.

Tags come from a catalog or a document stream, so they are checked here: anything but a
list of non-empty strings is no tags at all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ._errors import MetadataError

__all__ = ["ACCESS_TAGS_KEY", "inherit_access_tags", "node_access_tags", "start_access_tags"]

logger = logging.getLogger(__name__)

ACCESS_TAGS_KEY = "tiled_access_tags"
_PRINCIPAL_PREFIXES = ("user:", "service:")


def _checked(tags: Any, where: str) -> frozenset[str] | None:
    if tags is None:
        return None
    if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) and t for t in tags):
        logger.warning("ignoring the access tags of %s: %r is not a list of tags", where, tags)
        return None
    kept = frozenset(t for t in tags if not t.startswith(_PRINCIPAL_PREFIXES))
    return kept or None


def start_access_tags(start: Mapping[str, Any]) -> frozenset[str] | None:
    """The tags a start document asks its run to have (None: none)."""
    return _checked(start.get(ACCESS_TAGS_KEY), f"run {start.get('uid')}")


def node_access_tags(node: Any) -> frozenset[str] | None:
    """The tags a run's node has in the catalog (None: none, or no access control)."""
    item = getattr(node, "item", None) or {}
    tags = (item.get("attributes") or {}).get("access_tags")
    return _checked(tags, f"node {item.get('id')}")


def inherit_access_tags(
    md: Mapping[str, Any], parent_tags: Iterable[frozenset[str] | None]
) -> dict[str, Any]:
    """``md`` with the tags the parents share, unless it names tags of its own.

    Parents without tags (a catalog without access control) constrain nothing. Parents
    with tags but none in common raise :class:`MetadataError`.
    """
    md = dict(md)
    if ACCESS_TAGS_KEY in md:
        return md
    tagged = [tags for tags in parent_tags if tags]
    if not tagged:
        return md
    shared = frozenset.intersection(*tagged)
    if not shared:
        raise MetadataError(
            f"the parent runs share no access tag ({sorted(map(sorted, tagged))}): a child "
            "tagged with all of them could be read by users who cannot read every parent; "
            f"give the child's tags, md={{{ACCESS_TAGS_KEY!r}: [...]}}"
        )
    md[ACCESS_TAGS_KEY] = sorted(shared)
    return md
