"""A child run's provenance as PROV links in tiled's graph of entities and links.

Tiled serves a graph beside its catalog (GraphQL at ``/api/graphql``): entities, bound to a
catalog node or not, and predicate-labelled links between them, with CURIEs expanded
through a namespace registry. Once a child run is complete in the store (its stop written,
what it holds checked against its journal), the facts of its start document are written
there too:

- the child's node ``prov:wasDerivedFrom`` each parent run (an entity bound to the parent's
  node when the parent is in this catalog, else one named by its uid);
- the child ``prov:wasGeneratedBy`` an activity (``prov:Activity``) whose properties hold the
  code records (names, versions, commits, source digests, parameters) and the time;
- that activity ``prov:used`` each parent run and each input file (an entity with the file's
  ``file://`` URI and sha256).

The start document stays the record of truth: the links are written after the run is
durable, a store whose tiled has no graph (or refuses a write) keeps the same facts in the
start only, and the failure is logged, never raised into the delivery of the run. Two
requests per child (one creating the entities, one the links), and one per process and
store to register the ``prov`` namespace.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urljoin

__all__ = ["PROV_NAMESPACE", "provenance_links", "write_provenance_links"]

logger = logging.getLogger(__name__)

PROV_NAMESPACE = "http://www.w3.org/ns/prov#"
_registered: set[str] = set()  # stores (API URIs) whose prov namespace is known to be there
_registered_lock = threading.Lock()


class GraphUnavailableError(Exception):
    """The store's tiled has no graph, or refused a request to it."""


def write_provenance_links(catalog: Any, uid: str, start: Mapping[str, Any]) -> bool:
    """Write the PROV links of the complete child run ``uid`` whose start is ``start``;
    whether they were written (False, logged, when the store cannot take them)."""
    if not start.get("parent_uids") and not (start.get("provenance") or {}).get("files"):
        return False  # not derived data: nothing to link
    try:
        _ensure_namespace(catalog)
        entities = _entities_of(catalog, uid, start)
        created = _graphql(catalog, *_create_entities(entities))
        ids = {alias: record["id"] for alias, record in created.items()}
        _graphql(catalog, *_create_links(_links_of(entities), ids))
    except GraphUnavailableError as error:
        logger.info("child run %s: provenance links not written (%s)", uid, error)
        return False
    except Exception:  # the run is saved; its start keeps these facts
        logger.warning("child run %s: provenance links not written", uid, exc_info=True)
        return False
    return True


def provenance_links(catalog: Any, uid: str) -> list[dict[str, Any]]:
    """The links out of the entities bound to run ``uid``'s node, and out of the activity
    that generated it: ``{"subject", "predicate", "object"}`` with each entity's ``name``,
    ``uri`` and whether it is bound to a node. Raises :class:`GraphUnavailableError` where the
    store has no graph."""
    data = _graphql(
        catalog,
        """query($path: [String!]) {
          entities(nodePathParts: $path) {
            name entityType uri isNodeBound properties
            outgoingLinks {
              predicate
              object { name entityType uri isNodeBound properties
                       outgoingLinks { predicate
                                       object { name entityType uri isNodeBound properties } } }
            }
          }
        }""",
        {"path": [uid]},
    )
    links = []
    for entity in data["entities"]:
        for link in entity["outgoingLinks"]:
            links.append({"subject": _plain(entity), "predicate": link["predicate"],
                          "object": _plain(link["object"])})  # fmt: skip
            for inner in link["object"].get("outgoingLinks") or []:
                links.append({"subject": _plain(link["object"]), "predicate": inner["predicate"],
                              "object": _plain(inner["object"])})  # fmt: skip
    return links


# --- what is written --------------------------------------------------------------------


def _entities_of(catalog: Any, uid: str, start: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The entities to create, by alias: the child, its activity, its parents, its files."""
    provenance = start.get("provenance") or {}
    code = [c for c in provenance.get("code") or [] if isinstance(c, Mapping)]
    entities: dict[str, dict[str, Any]] = {
        "child": {"entityType": "prov:Entity", "name": uid, "nodePathParts": [uid]},
        "activity": {
            "entityType": "prov:Activity",
            "name": f"reduction that generated {uid}",
            "properties": json.loads(json.dumps({
                "code": [{k: c[k] for k in ("name", "version", "commit", "dirty", "sha256",
                                            "params") if k in c} for c in code],
                "prov:startedAtTime": start.get("time"),
            }, default=str)),
        },
    }  # fmt: skip
    for n, parent in enumerate(p for p in start.get("parent_uids") or [] if isinstance(p, str)):
        record: dict[str, Any] = {"entityType": "prov:Entity", "name": parent}
        if parent in catalog:
            record["nodePathParts"] = [parent]
        else:  # a run of another catalog
            record["uri"] = f"urn:bluesky:run:{parent}"
        entities[f"parent{n}"] = record
    files = [f for f in provenance.get("files") or [] if isinstance(f, Mapping) and f.get("path")]
    for n, file in enumerate(files):
        entities[f"file{n}"] = {
            "entityType": "prov:Entity",
            "name": str(file["path"]),
            "uri": "file://" + str(file["path"]),
            "properties": {"sha256": str(file.get("sha256", ""))},
        }
    return entities


def _links_of(entities: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    links = [("child", "prov:wasGeneratedBy", "activity")]
    for alias in entities:
        if alias.startswith("parent"):
            links += [("child", "prov:wasDerivedFrom", alias), ("activity", "prov:used", alias)]
        elif alias.startswith("file"):
            links.append(("activity", "prov:used", alias))
    return links


def _create_entities(entities: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """One mutation creating every entity, each under its alias."""
    arguments = ", ".join(f"${alias}: CreateEntityInput!" for alias in entities)
    fields = " ".join(f"{alias}: createEntity(input: ${alias}) {{ id }}" for alias in entities)
    return f"mutation({arguments}) {{ {fields} }}", dict(entities)


def _create_links(
    links: list[tuple[str, str, str]], ids: Mapping[str, str]
) -> tuple[str, dict[str, Any]]:
    variables = {
        f"l{n}": {"subjectId": ids[subject], "predicate": predicate, "objectId": ids[object_]}
        for n, (subject, predicate, object_) in enumerate(links)
    }
    arguments = ", ".join(f"${alias}: CreateLinkInput!" for alias in variables)
    fields = " ".join(f"{alias}: createLink(input: ${alias}) {{ id }}" for alias in variables)
    return f"mutation({arguments}) {{ {fields} }}", variables


# --- the transport ----------------------------------------------------------------------


def _ensure_namespace(catalog: Any) -> None:
    key = str(catalog.context.api_uri)
    with _registered_lock:
        if key in _registered:
            return
    data = _graphql(catalog, "{ namespaces { prefix uri } }")
    if {"prefix": "prov", "uri": PROV_NAMESPACE} not in data["namespaces"]:
        _graphql(
            catalog,
            'mutation($uri: String!) { upsertNamespace(prefix: "prov", uri: $uri) { prefix } }',
            {"uri": PROV_NAMESPACE},
        )
    with _registered_lock:
        _registered.add(key)


def _graphql(catalog: Any, query: str, variables: Mapping[str, Any] | None = None) -> Any:
    """The ``data`` of a GraphQL request to the store's tiled; :class:`GraphUnavailableError`
    for a tiled without the graph, or for errors it answers."""
    context = catalog.context
    # Beside the API, at the same root: https://host/ROOT/api/v1/ -> https://host/ROOT/api/graphql
    url = urljoin(str(context.api_uri).rstrip("/") + "/", "../graphql")
    response = context.http_client.post(
        url, json={"query": query, "variables": dict(variables or {})}
    )
    if response.status_code in (404, 405):
        raise GraphUnavailableError(f"the store's tiled has no graph ({response.status_code})")
    response.raise_for_status()
    body = response.json()
    if body.get("errors"):
        raise GraphUnavailableError("; ".join(str(e.get("message")) for e in body["errors"]))
    return body["data"]


def _plain(entity: Mapping[str, Any]) -> dict[str, Any]:
    return {k: entity.get(k) for k in ("name", "entityType", "uri", "isNodeBound", "properties")}
