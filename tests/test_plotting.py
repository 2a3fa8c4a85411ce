"""Plots for a logbook: titles with the sample, the scan and the run, units from the
descriptor, event numbers as whole numbers, a derived value against the raw run's motor
joined on ``parent_seq_num``, images with labelled colorbars, non-numeric keys refused.

The raw run is a real scan (a RunEngine moving an ophyd-async soft motor that declares its
units, reading ``ophyd.sim.det``) saved into the session's store; its child is saved with
``store.save(..., parents=[raw_uid])`` and names only some raw events, out of order, so an x
axis taken by position would differ from one taken by the join. The figures are checked
through matplotlib's objects (:func:`make_figure`), the PNGs for their pixel size, and the
command line through ``main`` in this process.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import event_model
import numpy as np
import pytest
from _helpers import PROVENANCE
from bluesky import RunEngine
from bluesky.plans import count, scan
from ophyd.sim import det
from ophyd_async.core import soft_signal_rw
from ophyd_async.plan_stubs import ensure_connected

from bluesky_analysis_store import AnalysisStore, AnalysisStoreError, RunNotFoundError
from bluesky_analysis_store._errors import PlotError
from bluesky_analysis_store._plotting import make_figure, plot_key
from bluesky_analysis_store.cli import main

SCAN_ID = 42
POINTS = 5
# The raw events the child names, in the child's order: not 1, 2, 3.
PARENT_SEQ_NUMS = [4, 2, 5]
ROI_TOTALS = [30.0, 10.0, 50.0]
FRAME_SHAPE = (3, 4)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def frame(i: int) -> np.ndarray:
    return np.arange(np.prod(FRAME_SHAPE), dtype=float).reshape(FRAME_SHAPE) * (i + 1)


@pytest.fixture(scope="module")
def engine() -> Iterator[RunEngine]:
    """One RunEngine for the module's scans, on an event loop of its own."""
    loop = asyncio.new_event_loop()
    RE = RunEngine({}, loop=loop)  # noqa: N806 - the name every bluesky user knows
    RE.md["scan_id"] = SCAN_ID - 1  # the next scan is SCAN_ID
    yield RE
    loop.call_soon_threadsafe(loop.stop)
    RE._th.join()
    loop.close()


@pytest.fixture(scope="module")
def runs(engine: RunEngine, shared_store: AnalysisStore) -> dict[str, str]:
    """A raw scan of a motor in mm, its child, a child whose parent the store lacks, a raw
    run with a plain-text sample and a raw image run whose descriptor gives units."""
    motor = soft_signal_rw(float, 0.0, units="mm", name="motor")
    engine(ensure_connected(motor))
    token = engine.subscribe(shared_store)
    try:
        (raw,) = engine(scan([det], motor, -1.0, 1.0, POINTS), sample={"name": "Fe2O3"})
        (text_sample,) = engine(count([det], 2), sample="quartz")
    finally:
        engine.unsubscribe(token)
    events = [
        {
            "primary": {
                "roi_total": total,
                "parent_seq_num": seq_num,
                "frame": frame(i),
                "label": f"spot {i}",
                "ok": i % 2 == 1,
                "cube": np.zeros((2, 2, 2)),
            }
        }
        for i, (seq_num, total) in enumerate(zip(PARENT_SEQ_NUMS, ROI_TOTALS, strict=True))
    ]
    child = shared_store.save(events, {"purpose": "plot test"}, parents=[raw], code=np.mean)
    orphan = shared_store.save(  # its second event names a raw event the scan did not take
        [{"primary": {"roi_total": 1.0, "parent_seq_num": s}} for s in (1, POINTS + 4)],
        {"purpose": "orphan"},
        **PROVENANCE,
    )
    return {
        "raw": raw,
        "child": child,
        "orphan": orphan,
        "text_sample": text_sample,
        "image": save_image_run(shared_store),
    }


def save_image_run(store: AnalysisStore) -> str:
    """A raw run of two 2-D frames inline, declared in counts (as a detector would)."""
    bundle = event_model.compose_run(metadata={"sample": "silicon", "plan_name": "count"})
    data_keys = {
        "image": {
            "source": "sim:image",
            "dtype": "array",
            "shape": list(FRAME_SHAPE),
            "dtype_numpy": "<f8",
            "units": "counts",
        }
    }
    descriptor = bundle.compose_descriptor(name="primary", data_keys=data_keys)
    store("start", bundle.start_doc)
    store("descriptor", descriptor.descriptor_doc)
    for i in range(2):
        event = descriptor.compose_event(data={"image": frame(i)}, timestamps={"image": 0.0})
        store("event", event)
    store("stop", bundle.compose_stop())
    return bundle.start_doc["uid"]


def integer_ticks(axis: Any) -> bool:
    ticks = np.asarray(axis.get_ticklocs())
    return len(ticks) > 0 and bool(np.all(ticks == np.round(ticks)))


def drawn(figure: Any) -> Any:
    figure.canvas.draw()  # ticks are placed when the figure is drawn
    return figure.axes[0]


# --- titles, labels and ticks ------------------------------------------------------------


def test_child_title_names_sample_scan_plan_and_child(shared_store, runs):
    axes = drawn(make_figure(shared_store[runs["child"]], "roi_total"))
    assert axes.get_title() == (
        f"sample Fe2O3 · scan {SCAN_ID} (scan) · child {runs['child'][:8]}\nprimary/roi_total"
    )


def test_raw_run_title_and_units_from_its_descriptor(shared_store, runs):
    axes = drawn(make_figure(shared_store[runs["raw"]], "motor"))
    assert axes.get_title().splitlines()[0] == (
        f"sample Fe2O3 · scan {SCAN_ID} (scan) · run {runs['raw'][:8]}"
    )
    assert axes.get_ylabel() == "motor (mm)"
    assert axes.get_xlabel() == "event (seq_num)"


def test_a_plain_text_sample(shared_store, runs):
    axes = drawn(make_figure(shared_store[runs["text_sample"]], "det"))
    assert axes.get_title().startswith(f"sample quartz · scan {SCAN_ID + 1} (count) · run ")
    assert axes.get_ylabel() == "det"  # det declares no units: none are made up


def test_event_axis_is_the_stream_seq_num_with_integer_ticks(shared_store, runs):
    child = shared_store[runs["child"]]
    axes = drawn(make_figure(child, "roi_total"))
    (line,) = axes.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), child["primary"]["seq_num"].read())
    np.testing.assert_array_equal(line.get_ydata(), ROI_TOTALS)
    assert axes.get_xlabel() == "event (seq_num)"
    assert axes.get_ylabel() == "roi_total"
    # Three events: matplotlib's default locator would tick at 1.25, 1.5, ...
    assert integer_ticks(axes.xaxis), axes.get_xticks()


# --- x from the parent run -----------------------------------------------------------------


def test_x_from_the_parent_run_follows_parent_seq_num(shared_store, runs):
    raw_motor = np.asarray(shared_store[runs["raw"]]["primary"]["motor"].read())
    raw_seq_nums = np.asarray(shared_store[runs["raw"]]["primary"]["seq_num"].read())
    expected = [raw_motor[list(raw_seq_nums).index(s)] for s in PARENT_SEQ_NUMS]
    assert not np.array_equal(expected, raw_motor[: len(PARENT_SEQ_NUMS)])  # join != position

    axes = drawn(make_figure(shared_store[runs["child"]], "roi_total", x_key="motor"))
    (line,) = axes.get_lines()
    np.testing.assert_allclose(line.get_xdata(), expected)
    np.testing.assert_array_equal(line.get_ydata(), ROI_TOTALS)
    assert axes.get_xlabel() == "motor (mm)"


def test_x_from_the_child_stream_first(shared_store, runs):
    axes = drawn(make_figure(shared_store[runs["child"]], "roi_total", x_key="parent_seq_num"))
    (line,) = axes.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), PARENT_SEQ_NUMS)
    assert axes.get_xlabel() == "parent_seq_num"
    assert integer_ticks(axes.xaxis), axes.get_xticks()


def test_x_key_in_neither_run_lists_what_both_have(shared_store, runs):
    with pytest.raises(PlotError, match="no_such_motor") as caught:
        make_figure(shared_store[runs["child"]], "roi_total", x_key="no_such_motor")
    message = str(caught.value)
    assert "roi_total" in message and "'motor'" in message and "'det'" in message


def test_x_key_when_the_parent_run_is_not_in_the_store(shared_store, runs):
    with pytest.raises(RunNotFoundError, match="not in the store"):
        make_figure(shared_store[runs["orphan"]], "roi_total", x_key="motor")


def test_x_from_a_parent_given_names_the_raw_events_it_lacks(shared_store, runs):
    orphan, raw = shared_store[runs["orphan"]], shared_store[runs["raw"]]
    with pytest.raises(PlotError, match=rf"no event with seq_num \[{POINTS + 4}\]"):
        make_figure(orphan, "roi_total", x_key="motor", parent=raw)


def test_x_key_of_a_raw_run_without_it(shared_store, runs):
    with pytest.raises(PlotError, match="no parent run"):
        make_figure(shared_store[runs["raw"]], "det", x_key="not_here")


# --- images --------------------------------------------------------------------------------


def test_frame_of_a_child_with_a_labelled_colorbar(shared_store, runs):
    figure = make_figure(shared_store[runs["child"]], "frame", index=1)
    axes = drawn(figure)
    (image,) = axes.get_images()
    np.testing.assert_array_equal(image.get_array(), frame(1))
    assert image.colorbar.ax.get_ylabel() == "frame"
    assert axes.get_title().splitlines()[1] == "primary/frame · event 2 (seq_num)"
    assert integer_ticks(axes.xaxis) and integer_ticks(axes.yaxis)


def test_colorbar_label_carries_the_descriptor_units(shared_store, runs):
    axes = drawn(make_figure(shared_store[runs["image"]], "image"))  # the last event
    (image,) = axes.get_images()
    np.testing.assert_array_equal(image.get_array(), frame(1))
    assert image.colorbar.ax.get_ylabel() == "image (counts)"
    assert axes.get_title() == (
        f"sample silicon · plan count · run {runs['image'][:8]}\nprimary/image · event 2 (seq_num)"
    )


def test_events_of_three_dimensions_are_refused(shared_store, runs):
    with pytest.raises(PlotError, match=r"3-D events of shape \(2, 2, 2\)"):
        make_figure(shared_store[runs["child"]], "cube")


def test_x_key_with_a_frame_is_refused(shared_store, runs):
    with pytest.raises(PlotError, match="scalar keys only"):
        make_figure(shared_store[runs["child"]], "frame", x_key="motor")


def test_event_index_out_of_range(shared_store, runs):
    with pytest.raises(PlotError, match="index 3 is out of range"):
        make_figure(shared_store[runs["child"]], "frame", index=3)


# --- values that are not numbers ---------------------------------------------------------------


def test_strings_are_refused_not_drawn(shared_store, runs):
    with pytest.raises(PlotError, match="'label' holds strings"):
        make_figure(shared_store[runs["child"]], "label")


def test_booleans_are_drawn_as_false_and_true(shared_store, runs):
    axes = drawn(make_figure(shared_store[runs["child"]], "ok"))
    (line,) = axes.get_lines()
    np.testing.assert_array_equal(line.get_ydata(), [0, 1, 0])
    assert [t.get_text() for t in axes.get_yticklabels()] == ["False", "True"]


def test_unknown_key_lists_the_stream_keys(shared_store, runs):
    with pytest.raises(AnalysisStoreError, match="no key 'nope'") as caught:
        make_figure(shared_store[runs["child"]], "nope")
    assert "roi_total" in str(caught.value) and "ts_roi_total" not in str(caught.value)


# --- the PNG and the command line ----------------------------------------------------------------


def test_png_has_the_pixel_size_asked_for(shared_store, runs, tmp_path):
    output = tmp_path / "roi.png"
    path = plot_key(
        shared_store[runs["child"]], "roi_total", output, x_key="motor", size=(5, 4), dpi=80
    )
    assert path == str(output)
    assert png_size(output) == (400, 320)


def cli(capsys: pytest.CaptureFixture[str], store_folder: Path, *args: str) -> tuple[int, str, str]:
    """The command line, in this process: its exit status, stdout and stderr."""
    capsys.readouterr()
    try:
        status = main(["--store", str(store_folder), *args])
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_plot_against_the_parent_motor(capsys, store_folder, runs, tmp_path):
    output = tmp_path / "roi-vs-motor.png"
    status, out, err = cli(
        capsys,
        store_folder,
        "plot",
        runs["child"][:8],
        "roi_total",
        "--x",
        "motor",
        "-o",
        str(output),
    )
    assert status == 0, err
    assert out.strip() == str(output)
    assert png_size(output) == (640, 480)


def test_cli_plot_x_key_in_neither_run(capsys, store_folder, runs, tmp_path):
    output = tmp_path / "never.png"
    status, _, err = cli(
        capsys,
        store_folder,
        "plot",
        runs["child"],
        "roi_total",
        "--x",
        "nothing",
        "-o",
        str(output),
    )
    assert status == 2
    (line,) = err.splitlines()
    assert line.startswith("bluesky-analysis-store: error:") and "nothing" in line
    assert "'motor'" in line  # what the parent run has
    assert not output.exists()


def test_cli_plot_refuses_strings(capsys, store_folder, runs, tmp_path):
    output = tmp_path / "label.png"
    status, _, err = cli(capsys, store_folder, "plot", runs["child"], "label", "-o", str(output))
    assert status == 2 and "strings" in err
    assert not output.exists()
