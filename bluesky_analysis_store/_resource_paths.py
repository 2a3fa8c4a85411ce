"""Where the files of a raw run's resources are, after ``root_map``, and whether they stay
inside their root.

A filler opens whatever paths the documents name, so a crafted or mistaken document
(``root/../../etc``, an absolute ``resource_path``, a symlink pointing elsewhere) must be
refused before any file is opened. The root of a path is:

- for a legacy ``resource``: its ``root`` after ``root_map`` (event-model's ``Filler`` joins
  ``resource_path`` to it); a resource without a root may not use ``..``;
- for a ``stream_resource``: the ``root_map`` target its URI was mapped to, or else the folder
  its URI names (a URI ending in ``/``) or lies in. Every file the consolidator derives from
  the URI (one per frame for a template) must stay inside that root.

A ``root_map`` for stream resources maps a path prefix, whole components only:
``{"/old/det": "/new/det"}`` turns ``file://localhost/old/det/scan.h5`` into
``file://localhost/new/det/scan.h5``; the longest matching prefix wins. URI paths are taken
as tiled takes them (``tiled.utils.path_from_uri``: no percent-decoding), so both read the
same file.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlparse, urlunparse

from ._confinement import has_parent_component, is_inside
from ._errors import AssetLocationError

__all__ = [
    "check_legacy_resource",
    "check_stream_paths",
    "map_stream_uri",
    "stream_uri_root",
]


def _file_path(uri: str) -> str:
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise AssetLocationError(f"{uri!r} is not a file:// URI; only local files can be read")
    return parsed.path


def map_stream_uri(uri: str, root_map: Mapping[str, str]) -> tuple[str, str | None]:
    """``uri`` with ``root_map`` applied, and the root it was mapped to (None if unmapped)."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return uri, None
    path = parsed.path
    for old in sorted(root_map, key=len, reverse=True):
        prefix = old.rstrip("/") or "/"
        if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
            new = root_map[old].rstrip("/") or "/"
            mapped = new.rstrip("/") + path[len(prefix.rstrip("/")) :]
            return urlunparse(parsed._replace(path=mapped)), new
    return uri, None


def stream_uri_root(uri: str, mapped_root: str | None) -> str:
    """The folder every file of a stream resource with this (mapped) URI must stay in."""
    if mapped_root is not None:
        return mapped_root
    path = _file_path(uri)
    return path if path.endswith("/") else posixpath.dirname(path)


def check_stream_paths(uris: Iterable[str], roots: Sequence[str], *, what: str) -> None:
    """Refuse any of ``uris`` that names ``..`` or resolves (symlinks too) outside every
    one of ``roots``."""
    for uri in uris:
        path = _file_path(uri)
        if has_parent_component(path) or not is_inside(path, roots):
            raise AssetLocationError(
                f"{what}: {uri!r} leaves its root ({', '.join(roots)}); refusing to read it"
            )


def check_legacy_resource(resource: Mapping[str, Any], root_map: Mapping[str, str]) -> None:
    """Refuse a legacy ``resource`` whose files would leave their root once event-model's
    ``Filler`` has applied ``root_map`` and joined ``resource_path`` to the root."""
    resource_path = str(resource.get("resource_path", ""))
    original_root = resource.get("root", "") or ""
    root = root_map.get(original_root, original_root)
    what = f"resource {resource.get('uid')!r}"
    # Handlers derive file names from these too (a template, a file name): no way up.
    for name, value in (resource.get("resource_kwargs") or {}).items():
        if isinstance(value, str) and has_parent_component(value):
            raise AssetLocationError(f"{what}: resource_kwargs {name!r}={value!r} names '..'")
    if has_parent_component(resource_path):
        raise AssetLocationError(f"{what}: resource_path {resource_path!r} names '..'")
    if not root:
        return
    if not is_inside(os.path.join(root, resource_path), [root]):
        raise AssetLocationError(
            f"{what}: {os.path.join(root, resource_path)!r} resolves outside its root {root!r}"
        )
