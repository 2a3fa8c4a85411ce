"""Ingesting a scientist's files (TIFF, NPY, HDF5, CSV) as a run of the analysis store.

Data that never came from a scan still deserves a run with its origin recorded. :func:`ingest`
reads the files, lays their contents out as events and hands them to
:meth:`AnalysisStore.save`, which composes, checks and saves the run and records the absolute
path and sha256 of every input file in ``start["provenance"]["files"]``.

How files become a run:

* **Frames** go to one stream (``stream``), one event per frame, files one after another.
  A TIFF gives one frame per page, an NPY file one frame, both under the data key
  ``image``. An HDF5 file gives every numeric dataset in it (or the ones named as
  ``"file.h5::/entry/data"``), each under its last path component, and axis 0 of every
  dataset is the event axis: a ``(N, H, W)`` dataset gives N frames of ``(H, W)``, a ``(N,)``
  dataset N scalars, a 0-d dataset one scalar. All datasets taken from one file must have the
  same length along axis 0, and every frame file of a call must give the same data keys, each
  with one frame shape and dtype.
* **Tables**: each CSV file becomes its own stream, named after the file's stem, with one
  event per row and one data key per column (a header row, then values; a column of integers
  is int64, of numbers float64 with empty cells as NaN, anything else strings).
* Every event also carries ``source_file`` (the input's absolute path, as in the provenance)
  and ``source_index`` (the page, frame or row within that file, from 0).

Frames with one or more dimensions are written through the format ``writer`` into the store's
asset folder; scalars and strings go inline. Inline numbers are stored as int64, float64 or
bool (the event table's types), so a ``(N,)`` float32 dataset comes back as float64.

Names become stream names and data keys of ASCII letters, digits and ``_`` that start with a
letter, because the store's event tables refuse other column names: each run of other
characters becomes one ``_`` (``"intensity (a.u.)"`` gives ``intensity_a_u``), a name that
starts with a digit gains a prefix (``column_``, ``data_`` or ``table_``: ``"2theta"`` gives
``column_2theta``), and names are cut at 60 characters. ``time``, ``seq_num``,
``source_file`` and ``source_index`` gain a trailing ``_``. Every rename is logged.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import h5py
import numpy as np
import tifffile

from ._errors import DataKeyError, DataValueError, IngestError
from ._store import AnalysisStore
from .formats import formats

__all__ = [
    "DATASET_SEPARATOR",
    "IMAGE_KEY",
    "SOURCE_FILE_KEY",
    "SOURCE_INDEX_KEY",
    "SUPPORTED_SUFFIXES",
    "ingest",
]

logger = logging.getLogger(__name__)

SOURCE_FILE_KEY = "source_file"
"""Data key holding, in every event, the absolute path of the file the event came from."""
SOURCE_INDEX_KEY = "source_index"
"""Data key holding, in every event, the page, frame or row within that file (from 0)."""
IMAGE_KEY = "image"
"""Data key of the frames read from TIFF and NPY files."""

FileKind = Literal["tiff", "npy", "hdf5", "csv"]

SUPPORTED_SUFFIXES: Mapping[str, FileKind] = {
    ".tif": "tiff",
    ".tiff": "tiff",
    ".npy": "npy",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".nxs": "hdf5",
    ".csv": "csv",
}
"""File suffixes :func:`ingest` reads (case-insensitive), and how it reads them."""

DATASET_SEPARATOR = "::"
"""Separates an HDF5 file from the dataset to take from it: ``"scan.h5::/entry/data"``."""

# Kinds of numpy dtype that are taken as data: bool, signed, unsigned, floating.
_NUMERIC_KINDS = "biuf"
# Names the store's event tables use, or that ingest fills itself (compared lower-cased:
# the tables' columns are case-insensitive).
_TAKEN_NAMES = frozenset({"time", "seq_num", SOURCE_FILE_KEY, SOURCE_INDEX_KEY})
_NOT_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9]+")
# tiled's SQL tables allow 63 bytes a column name and add "ts_<key>" columns.
_MAX_NAME_LENGTH = 60
_STREAM_NAME = re.compile(r"^[^./]+$")
# Cells read as integers: ASCII digits only (int() would also take "2023_01" and other scripts'
# digits, so sample names like that would silently become numbers).
_INTEGER_CELL = re.compile(r"\s*[+-]?[0-9]+\s*")

# Values of one data key along the event axis: an array indexed on axis 0, or a list.
_Frames = Sequence[Any]


@dataclass
class _Input:
    """One input file and, for HDF5, the datasets asked for (``None``: every numeric one)."""

    path: str
    kind: FileKind
    datasets: list[str] | None = None


@dataclass
class _FrameFile:
    """The frames read from one file: data key -> values along the event axis."""

    path: str
    frames: dict[str, _Frames]

    def __len__(self) -> int:
        return len(next(iter(self.frames.values())))


@dataclass
class _Table:
    """The columns read from one CSV file, already named as data keys."""

    path: str
    stream: str
    columns: dict[str, np.ndarray]


def ingest(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    md: Mapping[str, Any] | None = None,
    store: AnalysisStore | None = None,
    *,
    stream: str = "primary",
    writer: str = "HDF5",
    parents: Any = (),
    code: Callable[..., Any] | Mapping[str, Any] | Iterable[Any] | None = None,
    strict: bool = True,
) -> str:
    """Save the contents of files as a new run in ``store`` and return the run's uid.

    ``paths`` is a file, a folder (its supported files, sorted by name, not recursive) or a
    list of them; an HDF5 file may name datasets, ``"scan.h5::/entry/data"``, several times
    to take several. See the module documentation for how files map to streams, events and
    data keys. ``md`` goes into the start document. Arrays are written in the format named
    ``writer`` (``"HDF5"``, ``"TIFF"``, ``"NPY"`` or any registered format) under the
    store's asset folder. ``parents``, ``code`` (your own code, recorded after ``ingest``
    itself) and ``strict`` are recorded as :meth:`AnalysisStore.save` records them; the input
    files always are. ``store`` defaults to ``AnalysisStore.open()``.

    Every file is read and checked before the store is opened or anything is written:
    :class:`IngestError` for a path that is missing, of an unsupported type, an empty folder or
    an HDF5 dataset that is not there; :class:`DataValueError` for contents that cannot be
    stored (unreadable, non-numeric frames, changing frame shapes, a ragged CSV row);
    :class:`DataKeyError` when names clash.
    """
    formats[writer]  # an unknown format is refused before any file is read
    check_ingest_stream(stream)
    inputs = _resolve_inputs(paths)
    frame_files: list[_FrameFile] = []
    tables: list[_Table] = []
    for item in inputs:
        if item.kind == "csv":
            tables.append(_read_csv(item.path))
        else:
            frame_files.append(_read_frames(item))
    data_dicts, writers_dict = _lay_out(frame_files, tables, stream, writer)

    if store is None:
        store = AnalysisStore.open()
    uid = store.save(
        data_dicts,
        md,
        writers_dict,
        files=[item.path for item in inputs],
        parents=parents,
        code=[ingest, *_code_list(code)],
        strict=strict,
    )
    logger.info("ingested %d file(s) as run %s in %r", len(inputs), uid, store)
    return uid


# --- finding the files --------------------------------------------------------------------


def _resolve_inputs(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
) -> list[_Input]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise IngestError("no paths given to ingest")
    inputs: dict[str, _Input] = {}
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise IngestError(f"a path to ingest must be a str or os.PathLike, not {item!r}")
        text = os.fspath(item)
        file_part, separator, dataset = text.partition(DATASET_SEPARATOR)
        path = expand_input_path(file_part)
        if not os.path.exists(path):
            raise IngestError(f"cannot ingest {path!r}: no such file or folder")
        if os.path.isdir(path):
            if separator:
                raise IngestError(f"{text!r}: only an HDF5 file can name a dataset with '::'")
            for name in _supported_files(path):
                _add_input(inputs, os.path.join(path, name), None)
            continue
        kind = _kind_of(path)
        if separator:
            if kind != "hdf5":
                raise IngestError(f"{text!r}: only an HDF5 file can name a dataset with '::'")
            if not dataset.strip("/"):
                raise IngestError(f"{text!r} names no dataset after '::'")
            _add_input(inputs, path, "/" + dataset.strip("/"))
        else:
            _add_input(inputs, path, None)
    return list(inputs.values())


def check_ingest_stream(stream: object) -> None:
    """Refuse a stream name that cannot name a stream (:class:`IngestError`)."""
    if not isinstance(stream, str) or not _STREAM_NAME.match(stream):
        raise IngestError(f"stream name {stream!r} must be a non-empty string without '/' or '.'")


def expand_input_path(text: str) -> str:
    """The absolute path ``text`` names, with ``~`` and ``~user`` expanded, and ``$VAR`` /
    ``${VAR}`` too, unless a file of that very name exists (a name may hold a ``$``)."""
    path = os.path.expanduser(text)
    if "$" in path and not os.path.exists(path):
        path = os.path.expandvars(path)
    return os.path.abspath(path)


def _kind_of(path: str) -> FileKind:
    suffix = os.path.splitext(path)[1].lower()
    kind = SUPPORTED_SUFFIXES.get(suffix)
    if kind is None:
        raise IngestError(
            f"cannot ingest {path!r}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    return kind


def _supported_files(folder: str) -> list[str]:
    names = sorted(
        name
        for name in os.listdir(folder)
        if os.path.splitext(name)[1].lower() in SUPPORTED_SUFFIXES
        and os.path.isfile(os.path.join(folder, name))
    )
    if not names:
        raise IngestError(
            f"folder {folder!r} holds no file ingest can read "
            f"({', '.join(SUPPORTED_SUFFIXES)}); subfolders are not searched"
        )
    return names


def _add_input(inputs: dict[str, _Input], path: str, dataset: str | None) -> None:
    known = inputs.get(path)
    if known is None:
        inputs[path] = _Input(path, _kind_of(path), [dataset] if dataset else None)
    elif dataset is not None and known.datasets is not None:
        if dataset not in known.datasets:
            known.datasets.append(dataset)
    else:
        raise IngestError(f"{path!r} is given more than once; its data would be saved twice")


# --- reading the files --------------------------------------------------------------------


def _read_frames(item: _Input) -> _FrameFile:
    if item.kind == "tiff":
        frames: dict[str, _Frames] = {IMAGE_KEY: _read_tiff(item.path)}
    elif item.kind == "npy":
        frames = {IMAGE_KEY: _read_npy(item.path)[np.newaxis]}
    else:
        frames = _read_hdf5(item.path, item.datasets)
    for key, values in frames.items():
        if len(values) and np.asarray(values[0]).dtype.kind not in _NUMERIC_KINDS:
            raise DataValueError(
                f"{item.path!r}: {key!r} has dtype {np.asarray(values[0]).dtype}; "
                "frames must be numbers or booleans"
            )
    result = _FrameFile(item.path, frames)
    if len(result) == 0:
        raise DataValueError(f"{item.path!r} holds no frames (its data has length 0)")
    first = np.asarray(next(iter(frames.values()))[0])
    logger.info(
        "read %s: %d frame(s) of %s %s under %s",
        item.path,
        len(result),
        first.shape,
        first.dtype,
        sorted(frames),
    )
    return result


def _read_tiff(path: str) -> list[np.ndarray]:
    try:
        with tifffile.TiffFile(path) as tif:
            pages = [page.asarray() for page in tif.pages]
    except (OSError, ValueError) as error:  # tifffile.TiffFileError is a ValueError
        raise DataValueError(f"cannot read {path!r} as TIFF: {error}") from error
    for index, page in enumerate(pages[1:], start=1):
        if page.shape != pages[0].shape or page.dtype != pages[0].dtype:
            raise DataValueError(
                f"{path!r}: page {index} is {page.shape} {page.dtype}, page 0 is "
                f"{pages[0].shape} {pages[0].dtype}; every page must have the same shape and dtype"
            )
    return pages


def _read_npy(path: str) -> np.ndarray:
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as error:
        raise DataValueError(f"cannot read {path!r} as NPY: {error}") from error


def _is_numeric_dataset(dataset: h5py.Dataset) -> bool:
    return dataset.shape is not None and dataset.dtype.kind in _NUMERIC_KINDS


def _read_hdf5(path: str, selected: list[str] | None) -> dict[str, _Frames]:
    try:
        with h5py.File(path, "r", locking=False) as file:
            names = _hdf5_dataset_names(path, file, selected)
            arrays = {name: np.asarray(file[name][()]) for name in names}
    except OSError as error:
        raise DataValueError(f"cannot read {path!r} as HDF5: {error}") from error

    frames: dict[str, _Frames] = {}
    origin: dict[str, str] = {}
    for name, array in arrays.items():
        key = _name_for(name.rsplit("/", 1)[-1], prefix="data", where=f"{path}::{name}")
        clash = _clashing_name(key, frames)
        if clash is not None:
            raise DataKeyError(
                f"{path!r}: dataset {name!r} would be stored as {key!r}, which clashes with "
                f"dataset {origin[clash]!r}; choose one with '{os.path.basename(path)}::{name}'"
            )
        origin[key] = name
        frames[key] = array[np.newaxis] if array.ndim == 0 else array
    lengths = {origin[key]: len(values) for key, values in frames.items()}
    if len(set(lengths.values())) > 1:
        raise DataValueError(
            f"{path!r}: the datasets have different lengths along axis 0 (the event axis), "
            f"{lengths}; choose datasets of one length with "
            f"'{os.path.basename(path)}::/path/to/dataset'"
        )
    return frames


def _hdf5_dataset_names(path: str, file: h5py.File, selected: list[str] | None) -> list[str]:
    if selected is not None:
        for name in selected:
            found = file.get(name)
            if not isinstance(found, h5py.Dataset):
                what = "no such dataset" if found is None else "it is a group, not a dataset"
                raise IngestError(f"cannot ingest {path}::{name}: {what}")
            if not _is_numeric_dataset(found):
                raise DataValueError(
                    f"{path}::{name} has dtype {found.dtype}; only numeric datasets are ingested"
                )
        return list(selected)

    names: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            if _is_numeric_dataset(obj):
                names.append("/" + name)
            else:
                logger.info("%s: skipping non-numeric dataset /%s (%s)", path, name, obj.dtype)

    file.visititems(visit)
    if not names:
        raise DataValueError(f"{path!r} holds no numeric dataset")
    return names


def _read_csv(path: str) -> _Table:
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header: list[str] | None = None
            rows: list[list[str]] = []
            for row in reader:
                if not row:
                    continue  # a blank line
                if header is None:
                    header = row
                elif len(row) != len(header):
                    raise DataValueError(
                        f"{path!r}, line {reader.line_num}: {len(row)} values, but the header "
                        f"has {len(header)} columns"
                    )
                else:
                    rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataValueError(f"cannot read {path!r} as CSV: {error}") from error
    if header is None:
        raise DataValueError(f"{path!r} is empty: a CSV needs a header row and data rows")
    if not rows:
        raise DataValueError(f"{path!r} has a header but no data rows")

    stem = os.path.splitext(os.path.basename(path))[0]
    stream = _name_for(stem, prefix="table", where=path, reserved=frozenset())
    columns: dict[str, np.ndarray] = {}
    for number, title in enumerate(header):
        where = f"column {number} ({title!r}) of {path}"
        key = _name_for(title, prefix="column", fallback=f"column_{number}", where=where)
        clash = _clashing_name(key, columns)
        if clash is not None:
            raise DataKeyError(
                f"{where} would be stored as {key!r}, which clashes with column {clash!r}; "
                "rename one of them"
            )
        columns[key] = _parse_column([row[number] for row in rows])
    logger.info(
        "read %s: %d row(s), columns %s, as stream %r", path, len(rows), list(columns), stream
    )
    return _Table(path, stream, columns)


def _parse_column(cells: list[str]) -> np.ndarray:
    """int64 if every cell is an integer, float64 if every cell is a number or empty, else str."""
    if all(_INTEGER_CELL.fullmatch(cell) for cell in cells):
        try:
            return np.array([int(cell) for cell in cells], dtype=np.int64)
        except OverflowError:
            pass  # beyond int64: read as floats
    if any(cell.strip() for cell in cells) and all(_is_number_or_empty(cell) for cell in cells):
        return np.array(
            [float(cell) if cell.strip() else np.nan for cell in cells], dtype=np.float64
        )
    return np.array(cells, dtype=str)


def _is_number_or_empty(cell: str) -> bool:
    if not cell.strip():
        return True
    if "_" in cell or not cell.isascii():  # float() takes "1_0" and other scripts' digits
        return False
    try:
        float(cell)
    except ValueError:
        return False
    return True


# --- naming -------------------------------------------------------------------------------


def _name_for(
    original: str,
    *,
    prefix: str,
    fallback: str | None = None,
    where: str,
    reserved: frozenset[str] = _TAKEN_NAMES,
) -> str:
    """A stream name or data key the store's tables accept, made from ``original``.

    Runs of characters other than ASCII letters and digits become one ``_``; a name that
    would not start with a letter is prefixed with ``prefix`` (an empty one becomes
    ``fallback``, by default ``prefix``); names in ``reserved`` gain a trailing ``_``.
    """
    name = "_".join(part for part in _NOT_NAME_CHARACTERS.split(original) if part)
    if not name:
        name = fallback or prefix
    elif not name[0].isalpha():
        name = f"{prefix}_{name}"
    name = name[:_MAX_NAME_LENGTH].rstrip("_")
    while name.lower() in reserved:
        name += "_"
    if name != original:
        logger.info("%s is stored under the name %r", where, name)
    return name


def _clashing_name(key: str, known: Iterable[str]) -> str | None:
    """An existing key that ``key`` clashes with in one table: same name ignoring case, or
    a name the table's ``ts_<key>`` timestamp columns take."""
    lowered = key.lower()
    for other in known:
        low = other.lower()
        if lowered in (low, "ts_" + low) or low == "ts_" + lowered:
            return other
    return None


# --- laying the data out as events --------------------------------------------------------


def _lay_out(
    frame_files: list[_FrameFile], tables: list[_Table], stream: str, writer: str
) -> tuple[list[dict[str, dict[str, Any]]], dict[str, str]]:
    """``(data_dicts, writers_dict)`` for :meth:`AnalysisStore.save`."""
    data_dicts: list[dict[str, dict[str, Any]]] = []
    writers_dict: dict[str, str] = {}
    if frame_files:
        frame_keys = _check_frame_files(frame_files)
        writers_dict = {key: writer for key, (shape, _) in frame_keys.items() if len(shape) >= 1}
        for frame_file in frame_files:
            for index in range(len(frame_file)):
                event = {key: values[index] for key, values in frame_file.frames.items()}
                event[SOURCE_FILE_KEY] = frame_file.path
                event[SOURCE_INDEX_KEY] = index
                data_dicts.append({stream: event})

    streams = {stream: "the frames"} if frame_files else {}
    for table in tables:
        if table.stream in streams:
            raise IngestError(
                f"{table.path!r} would be saved as stream {table.stream!r}, already taken by "
                f"{streams[table.stream]}; rename the file or pass another stream="
            )
        streams[table.stream] = repr(table.path)
        if taken := sorted(writers_dict.keys() & table.columns.keys()):
            raise DataKeyError(
                f"{table.path!r} has columns {taken}, which are also the names of frames "
                "written to files; rename the columns"
            )
        for index in range(len(next(iter(table.columns.values())))):
            event = {key: column[index] for key, column in table.columns.items()}
            event[SOURCE_FILE_KEY] = table.path
            event[SOURCE_INDEX_KEY] = index
            data_dicts.append({table.stream: event})
    return data_dicts, writers_dict


def _check_frame_files(
    frame_files: list[_FrameFile],
) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
    """Every frame file gives the same keys, each key one frame shape and dtype."""
    first = frame_files[0]
    known: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
    for key, values in first.frames.items():
        frame = np.asarray(values[0])
        known[key] = (frame.shape, frame.dtype)
    for frame_file in frame_files[1:]:
        if frame_file.frames.keys() != known.keys():
            raise DataKeyError(
                f"{frame_file.path!r} gives data keys {sorted(frame_file.frames)}, but "
                f"{first.path!r} gives {sorted(known)}; the frame files of one run must give "
                "the same keys (ingest them as separate runs, or choose HDF5 datasets with '::')"
            )
        for key, values in frame_file.frames.items():
            frame = np.asarray(values[0])
            if (frame.shape, frame.dtype) != known[key]:
                shape, dtype = known[key]
                raise DataValueError(
                    f"{frame_file.path!r}: {key!r} frames are {frame.shape} {frame.dtype}, but "
                    f"those of {first.path!r} are {shape} {dtype}; frames of one key must all "
                    "have the same shape and dtype"
                )
    return known


def _code_list(code: Any) -> list[Any]:
    if code is None:
        return []
    if callable(code) or isinstance(code, Mapping):
        return [code]
    return list(code)
