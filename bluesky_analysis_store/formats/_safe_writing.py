"""Writing frames so that a crash or a full disk never leaves a damaged or partial file.

Three rules the writers share:

- Before a frame is written, the file system must have room for it and a margin
  (:func:`ensure_free_space`); a full disk is met with :class:`DiskFullError` before any byte
  is written, not inside a C library: HDF5 that runs out of space in the middle of a write can
  crash the process when it later tries to flush its metadata.
- A write that fails anyway (the disk filled up between the check and the write, an I/O
  error) is re-raised as :class:`FrameWriteError` (:class:`DiskFullError` for ``ENOSPC``),
  after the writer has put its files back as they were (:func:`frame_write_error`).
- A frame of its own file appears under its final name whole or not at all
  (:func:`write_frame_file`): it is written to a hidden temporary name in the same folder
  and renamed. The rename is atomic on POSIX file systems, so a reader never sees half a
  frame and a killed writer leaves no truncated frame under a final name (at most a hidden
  ``.*.part`` file). There is no ``fsync``: this protects against the writing process dying,
  not against the machine losing power.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import IO

from .._errors import AssetExistsError, DiskFullError, FrameWriteError

__all__ = [
    "MARGIN_BYTES",
    "MARGIN_FRACTION",
    "ensure_free_space",
    "frame_write_error",
    "free_bytes",
    "needed_bytes",
    "remove_frame_files",
    "write_frame_file",
]

logger = logging.getLogger(__name__)

# Room asked for beyond the frame's own bytes. Frames are stored uncompressed, one chunk per
# frame in HDF5, so a frame takes its ``nbytes`` plus metadata: HDF5's chunk index grows by a
# block of a few KiB now and then and its object headers by less; a TIFF or NPY header is
# well under a KiB. 1 MiB covers that metadata many times over, and 5 % of the frame absorbs
# file-system allocation rounding (blocks, extents) for large frames. Leaving that much free
# also leaves the other writers of the disk (the catalog's SQLite files) a little room.
MARGIN_BYTES = 1 << 20
MARGIN_FRACTION = 0.05

_NO_SPACE_TEXT = (os.strerror(errno.ENOSPC), f"errno = {errno.ENOSPC},")


def needed_bytes(nbytes: int) -> int:
    """The free space a frame of ``nbytes`` asks for: itself plus the margin."""
    return nbytes + MARGIN_BYTES + int(nbytes * MARGIN_FRACTION)


def free_bytes(path: str) -> int:
    """Bytes available to unprivileged users on the file system holding ``path``."""
    stats = os.statvfs(_existing_ancestor(path))
    return stats.f_bavail * stats.f_frsize


def ensure_free_space(path: str, nbytes: int) -> None:
    """Raise :class:`DiskFullError` unless a frame of ``nbytes`` fits where ``path`` is."""
    needed = needed_bytes(nbytes)
    free = free_bytes(path)
    if free < needed:
        raise _disk_full(path, needed, free)


def frame_write_error(error: BaseException, path: str, nbytes: int) -> FrameWriteError:
    """The clean error for an ``OSError`` (or an h5py ``RuntimeError``) raised by a write.

    The libraries do not always say ENOSPC: h5py raises ``OSError`` or ``RuntimeError`` with
    ``errno`` unset and the C library's errno only in the message, numpy's ``tofile`` (used
    by ``np.save`` and tifffile) an ``OSError`` "N requested and M written" without errno.
    So a failure without errno while the frame no longer fits counts as a full disk too.
    """
    code = getattr(error, "errno", None)
    text = str(error)
    needed = needed_bytes(nbytes)
    free = _free_or_none(path)
    if (
        code == errno.ENOSPC
        or any(marker in text for marker in _NO_SPACE_TEXT)
        or (code is None and free is not None and free < needed)
    ):
        return _disk_full(path, needed, free if free is not None else 0)
    return FrameWriteError(code, f"could not write a frame to {path!r}: {text}", path)


def write_frame_file(final_path: str, nbytes: int, write: Callable[[IO[bytes]], None]) -> None:
    """Write one frame file with ``write(file)``: whole under ``final_path``, or not at all.

    An existing ``final_path`` is refused with :class:`AssetExistsError`; on any failure
    the temporary file is removed and nothing is left under ``final_path``.
    """
    if os.path.lexists(final_path):
        raise AssetExistsError(
            errno.EEXIST, f"refusing to replace the existing frame file {final_path!r}", final_path
        )
    ensure_free_space(final_path, nbytes)
    folder, name = os.path.split(final_path)
    # Hidden and with another ending, so no template or glob of frame files matches it.
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.part")
    try:
        with open(temporary, "wb") as file:
            write(file)
        os.replace(temporary, final_path)
    except BaseException as error:
        _remove_quietly(temporary)
        if isinstance(error, OSError):
            raise frame_write_error(error, final_path, nbytes) from error
        raise


def remove_frame_files(paths: list[str]) -> None:
    """Remove frame files (a rewind); files already missing are fine."""
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _disk_full(path: str, needed: int, free: int) -> DiskFullError:
    return DiskFullError(
        errno.ENOSPC,
        f"not enough free space to write a frame to {path!r}: {needed} bytes needed "
        f"(the frame and a margin of {needed_bytes(0)} bytes + {MARGIN_FRACTION:.0%}), "
        f"{free} bytes free",
        path,
    )


def _free_or_none(path: str) -> int | None:
    try:
        return free_bytes(path)
    except OSError:
        return None


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError:
        logger.warning("could not remove the temporary frame file %s", path, exc_info=True)
