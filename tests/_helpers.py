"""Small shared helpers of the foundation tests: test data, document checks, comparisons."""

from __future__ import annotations

import contextlib
import io
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import event_model
import numpy as np

# The matrix every format is round-tripped over: integer, float and wide integer frames,
# as 2-D images and as 1-D patterns.
DTYPES = ("uint16", "float32", "int64")
FRAME_SHAPES = ((6, 5), (7,))
FORMAT_NAMES = ("TIFF", "HDF5", "NPY")
HANDLER_SPECS = frozenset({"BAS_TIFF_SERIES", "BAS_HDF5", "BAS_NPY_SERIES", "BAS_PARQUET_TABLE"})

# Provenance that satisfies the strict check: a parent run and importable, installed code.
PARENT_UID = "00000000-0000-4000-8000-000000000001"
# The parent as a start document: a bare uid that the store does not hold is refused.
PARENT_START = {"uid": PARENT_UID, "time": 0.0}
PROVENANCE = {"parents": [PARENT_START], "code": np.mean}


def make_frames(
    dtype: str, shape: tuple[int, ...], count: int = 3, seed: int = 0
) -> list[np.ndarray]:
    """``count`` different frames whose values need the full width of ``dtype``.

    uint16 values above 255 catch a silent narrowing to 8 bits, negative int64 values beyond
    2**32 a narrowing to 32 bits, float32 fractions a conversion to integers.
    """
    rng = np.random.default_rng(seed)
    kind = np.dtype(dtype)
    frames = []
    for n in range(count):
        if kind == np.uint16:
            frame = rng.integers(0, 65535, size=shape, dtype=np.uint16, endpoint=True)
            frame.flat[0] = 65535 - n
        elif kind == np.int64:
            frame = rng.integers(-(2**40), 2**40, size=shape, dtype=np.int64)
            frame.flat[0] = -(2**40) - n
        else:
            frame = (rng.standard_normal(size=shape) * 1000).astype(kind)
            frame.flat[0] = np.float32(0.125) + n
        assert frame.dtype == kind and frame.shape == tuple(shape)
        frames.append(frame)
    return frames


def validate(documents: Iterable[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, dict]]:
    """Check every document against event-model's schema; return them as a list."""
    documents = list(documents)
    for name, doc in documents:
        event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)
    return documents


def names(documents: Iterable[tuple[str, Any]]) -> list[str]:
    return [name for name, _ in documents]


def docs_named(documents: Iterable[tuple[str, Any]], name: str) -> list[dict]:
    return [doc for n, doc in documents if n == name]


def count_names(documents: Iterable[tuple[str, Any]]) -> Counter:
    return Counter(name for name, _ in documents)


def files_under(folder: str | os.PathLike[str]) -> list[Path]:
    """Every file below ``folder`` (none when it does not exist)."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_empty_or_missing(folder: str | os.PathLike[str]) -> None:
    """Nothing at all was written under ``folder``."""
    root = Path(folder)
    assert not root.exists() or list(root.iterdir()) == [], sorted(root.rglob("*"))


def assert_same_array(read: Any, expected: Any, what: str = "") -> None:
    """Equal values, and the very same dtype and shape; ``what`` names the array in a failure."""
    read, expected = np.asarray(read), np.asarray(expected)
    assert read.dtype == expected.dtype, (what, read.dtype, expected.dtype)
    assert read.shape == expected.shape, (what, read.shape, expected.shape)
    np.testing.assert_array_equal(read, expected, err_msg=what)


class _ArraySnapshot:
    def __init__(self, array: np.ndarray) -> None:
        self.copy = array.copy()
        self.writeable = array.flags.writeable


def snapshot(value: Any) -> Any:
    """A deep copy that also remembers each array's dtype, shape and ``writeable`` flag."""
    if isinstance(value, np.ndarray):
        return _ArraySnapshot(value)
    if isinstance(value, Mapping):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


def assert_unchanged(value: Any, before: Any) -> None:
    """``value`` still equals its :func:`snapshot` ``before``, arrays flag for flag."""
    if isinstance(before, _ArraySnapshot):
        assert isinstance(value, np.ndarray)
        assert_same_array(value, before.copy)
        assert value.flags.writeable == before.writeable
        return
    if isinstance(before, Mapping):
        assert isinstance(value, Mapping) and list(value) == list(before)
        for key in before:
            assert_unchanged(value[key], before[key])
        return
    if isinstance(before, (list, tuple)):
        assert type(value) is type(before) and len(value) == len(before)
        for item, item_before in zip(value, before, strict=True):
            assert_unchanged(item, item_before)
        return
    assert type(value) is type(before) and value == before, (value, before)


def run_command(*argv: str) -> tuple[int, str, str]:
    """``bluesky-analysis-store ARGV`` through ``main`` in this process: its exit status,
    stdout and stderr."""
    from bluesky_analysis_store.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = main(list(argv))
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
    return status, stdout.getvalue(), stderr.getvalue()


def users_environment(**extra: str) -> dict[str, str]:
    """This process's environment for a subprocess that stands for a user's session: its
    stores are served by their folders' servers, as a user's are (the suite's in-process
    default, set in conftest for the tests' own process, is dropped), plus ``extra``."""
    from bluesky_analysis_store._local_server import SERVED_ENV

    environment = {k: v for k, v in os.environ.items() if k != SERVED_ENV}
    environment.update(extra)
    return environment
