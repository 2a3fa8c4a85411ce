"""The lineage of a run: the runs it was derived from, back to the raw data, and the runs
derived from it, down to the grandchildren and beyond.

Back, each run's start names its parents (``parent_uids``); a parent in another catalog (a
raw run read with ``reprocess --source``) ends the chain there, marked as not in this
store. Down, the children are the sealed runs that name it (:meth:`AnalysisStore.children`),
each marked ``current`` or not among its reducer's versions. Starts are untrusted input: a
run reached twice (two parents with a common ancestor, or a cycle that hand-made starts can
draw) is listed once more, marked ``seen``, and not followed again; and the walk stops at
``max_depth`` generations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._replay import start_document
from ._versions import mark_current

if TYPE_CHECKING:
    from ._store import AnalysisStore

__all__ = ["Lineage", "LineageNode", "lineage"]

DEFAULT_MAX_DEPTH = 20


@dataclass
class LineageNode:
    """One run of a lineage, with the runs one generation further (its parents going back,
    its children going down). ``run`` is its plain tiled node, None when it is not in this
    store; ``seen`` says it was listed before, so its links are not repeated; ``current``
    is, for a child, whether it is its reducer's current result (None going back)."""

    uid: str
    run: Any | None
    links: list[LineageNode] = field(default_factory=list)
    seen: bool = False
    current: bool | None = None
    truncated: bool = False  # ``max_depth`` reached: there may be more beyond

    @property
    def start(self) -> Mapping[str, Any]:
        return start_document(self.run) if self.run is not None else {}


@dataclass
class Lineage:
    """Where a run came from (:attr:`ancestry`, its parents as links) and what was derived
    from it (:attr:`descent`, its children as links); both trees start at the run."""

    uid: str
    ancestry: LineageNode
    descent: LineageNode


def lineage(store: AnalysisStore, uid: str, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Lineage:
    """The lineage of the run ``uid`` names (a uid or its first characters: a run of this
    store, or a parent its runs name)."""
    from tiled.client.container import Container

    full_uid = store.resolve_parent_uid(uid)
    catalog = store.catalog.new_variation()

    def node_of(run_uid: str) -> Any | None:
        try:  # the exact key: the catalog's own lookup would also take scan ids
            return Container.__getitem__(catalog, run_uid)
        except KeyError:
            return None

    def back(run_uid: str, run: Any | None, depth: int, seen: set[str]) -> LineageNode:
        node = LineageNode(run_uid, run)
        if not _first_visit(node, seen):
            return node
        parents = [p for p in node.start.get("parent_uids") or [] if isinstance(p, str)]
        if parents and depth >= max_depth:
            node.truncated = True
            return node
        node.links = [back(p, node_of(p), depth + 1, seen) for p in parents]
        return node

    def down(run_uid: str, run: Any | None, depth: int, seen: set[str]) -> LineageNode:
        node = LineageNode(run_uid, run)
        if not _first_visit(node, seen):
            return node
        # Exact uids here (resolved once, above): no lookup of each as a prefix again.
        children = store._children_of(run_uid) if run is not None or depth == 0 else []
        mark_current(children)
        if children and depth >= max_depth:
            node.truncated = True
            return node
        for child in children:
            link = down(child, node_of(child), depth + 1, seen)
            link.current = child.current
            node.links.append(link)
        return node

    run = node_of(full_uid)
    return Lineage(full_uid, back(full_uid, run, 0, set()), down(full_uid, run, 0, set()))


def _first_visit(node: LineageNode, seen: set[str]) -> bool:
    """Whether ``node``'s run is met for the first time; if not, it is marked ``seen``."""
    if node.uid in seen:
        node.seen = True
        return False
    seen.add(node.uid)
    return True
