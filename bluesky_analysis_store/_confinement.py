"""Keeping every file a writer makes, and every file a handler reads, inside its root.

A path is judged by where it really leads: its symlinks are resolved (``os.path.realpath``)
before it is compared with the real path of the root, so a link inside the root that points
outside does not let a file out. Resource paths are also refused by their text: an absolute
path or a ``..`` component is never a path "under a root", even when it happens to lead back
inside, because ``root_map`` relocates roots and the same text would then lead elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ._errors import AssetLocationError

__all__ = [
    "check_handler_path",
    "check_readable",
    "confined_path",
    "has_parent_component",
    "is_inside",
]


def _real(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.fspath(path))


def is_inside(path: str | os.PathLike[str], folders: Iterable[str | os.PathLike[str]]) -> bool:
    """Whether ``path``, symlinks resolved, is one of ``folders`` or below one of them."""
    real = _real(path)
    for folder in folders:
        real_folder = _real(folder)
        if os.path.commonpath([real, real_folder]) == real_folder:
            return True
    return False


def has_parent_component(path: str) -> bool:
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    parts = [path]
    for separator in separators:
        parts = [piece for part in parts for piece in part.split(separator)]
    return ".." in parts


def _checked_text(path: object, what: str) -> str:
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise AssetLocationError(f"{what} must be a non-empty path string, not {path!r}")
    if "\0" in path:
        raise AssetLocationError(f"{what} {path!r} contains a NUL character")
    return path


def confined_path(root: str | os.PathLike[str], resource_path: object, *, what: str) -> str:
    """``os.path.join(root, resource_path)``, refused unless it stays strictly below ``root``.

    Refused with :class:`AssetLocationError` (nothing is created): an absolute
    ``resource_path``, one with a ``..`` component, and one that, with symlinks resolved,
    leads outside ``root`` or to ``root`` itself. ``what`` names the path in the message.
    """
    root = os.path.abspath(os.fspath(root))
    text = _checked_text(resource_path, what)
    if os.path.isabs(text) or (os.altsep is not None and text.startswith(os.altsep)):
        raise AssetLocationError(
            f"{what} {text!r} is absolute; it must be relative to its root {root!r}"
        )
    if has_parent_component(text):
        raise AssetLocationError(
            f"{what} {text!r} has a '..' component; it must stay under {root!r}"
        )
    full_path = os.path.join(root, text)
    real, real_root = _real(full_path), _real(root)
    if real == real_root or os.path.commonpath([real, real_root]) != real_root:
        raise AssetLocationError(
            f"{what} {text!r} leads to {real!r} (symlinks resolved), which is not inside its "
            f"root {root!r} ({real_root!r})"
        )
    return full_path


def check_readable(
    path: str | os.PathLike[str], readable: Iterable[str | os.PathLike[str]], *, what: str
) -> None:
    """Refuse ``path`` with :class:`AssetLocationError` unless it is inside ``readable``."""
    readable = [os.fspath(folder) for folder in readable]
    if not is_inside(path, readable):
        raise AssetLocationError(
            f"{what} points at {os.fspath(path)!r}, outside the folders this store may read "
            f"({', '.join(readable)}); write derived files under the store's asset folder or "
            "open the store with readable=[...]"
        )


def check_handler_path(path: object, roots: Iterable[str | os.PathLike[str]] | None = None) -> str:
    """The path a handler was given, refused if it climbs out of the root it was joined to.

    event-model's ``Filler`` gives a handler ``os.path.join(root, resource_path)``: a ``..``
    component there means the resource climbs out of its root, and is refused. ``roots``,
    when given, are the only folders the handler may read: any other path (an absolute
    ``resource_path`` replaces the root in the join) or a symlink out of them is refused.
    """
    text = _checked_text(path, "the handler's path")
    if has_parent_component(text):
        raise AssetLocationError(
            f"the handler's path {text!r} has a '..' component: its resource path climbs out "
            "of its root"
        )
    if roots is not None:
        roots = [os.fspath(root) for root in roots]
        if not is_inside(text, roots):
            raise AssetLocationError(
                f"the handler's path {text!r} leads to {_real(text)!r} (symlinks resolved), "
                f"outside the folders it may read ({', '.join(roots) or 'none'})"
            )
    return text
