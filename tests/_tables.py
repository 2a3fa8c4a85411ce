"""Tables and variable-length arrays for the tests: values, a reducer, checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from bluesky_analysis_store import AnalysisStore


def spectrum(data: dict[str, Any]) -> dict[str, Any]:
    """An interpolated spectrum per event, as DBEP 6's first prototype saved: a DataFrame
    whose length follows the detector's reading."""
    rows = 3 + int(abs(float(data["det"])) * 10) % 4
    energy = np.linspace(7000.0, 7100.0, rows)
    return {
        "spectrum": pd.DataFrame(
            {"energy": energy, "mu": energy * float(data["det"]), "edge": ["K"] * rows}
        ),
        "peaks": energy[: rows - 2],
    }


def spectra(count: int = 3) -> list[pd.DataFrame]:
    """Tables of every column dtype the store keeps, of a different length each event."""
    tables = []
    for n in range(count):
        rows = 4 + n
        tables.append(
            pd.DataFrame(
                {
                    "energy": np.linspace(7000.0, 7100.0, rows),
                    "mu": np.linspace(0.0, 1.0, rows, dtype="f4"),
                    "counts": np.arange(rows, dtype="i2") * (n + 1),
                    "flag": np.arange(rows) % 2 == 0,
                    "channel": np.arange(rows, dtype="u4"),
                    "at": pd.date_range("2026-12-03", periods=rows, freq="s", unit="us"),
                    "edge": [f"K{j}" for j in range(rows)],
                }
            )
        )
    return tables


def peak_lists(count: int = 3) -> list[np.ndarray]:
    """Peak positions, none in the first event."""
    return [np.arange(n, dtype="f8") * 2.5 + 0.25 for n in range(count)]


def events(tables: list[pd.DataFrame], peaks: list[np.ndarray]) -> list[dict[str, Any]]:
    return [
        {"primary": {"spectrum": table, "peaks": found, "total": float(table["mu"].sum())}}
        for table, found in zip(tables, peaks, strict=True)
    ]


def rows_of(table: pd.DataFrame, seq_num: int) -> pd.DataFrame:
    rows = table[table["seq_num"] == seq_num].drop(columns="seq_num")
    return rows.reset_index(drop=True)


def assert_read_back(store: AnalysisStore, uid: str, tables, peaks) -> None:
    read = store.read_stream(uid)
    assert set(read) == {"spectrum", "peaks", "total"}
    table = read["spectrum"]
    assert list(table.columns) == ["seq_num", *tables[0].columns]
    assert table["seq_num"].tolist() == [n + 1 for n, t in enumerate(tables) for _ in range(len(t))]
    for n, original in enumerate(tables):
        pd.testing.assert_frame_equal(rows_of(table, n + 1), original)  # dtypes and order too
    assert len(read["peaks"]) == len(peaks)
    for got, original in zip(read["peaks"], peaks, strict=True):
        assert got.dtype == original.dtype
        np.testing.assert_array_equal(got, original)
    np.testing.assert_array_equal(read["total"], [float(t["mu"].sum()) for t in tables])


def edge_step(data: dict[str, Any]) -> dict[str, Any]:
    """A reducer of a table-valued input: the spectrum's step and the number of peaks."""
    table = data["spectrum"]
    return {"step": float(table["mu"].iloc[-1] - table["mu"].iloc[0]),
            "npeaks": len(data["peaks"])}  # fmt: skip
