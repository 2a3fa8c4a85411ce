# ruff: noqa: N803 - ``RE`` is the name every bluesky user knows
"""Live view in the session: child runs re-emitted to local subscribers, one summary per scan.

One callback per background mode serves the whole module (a worker process takes seconds to
start); each test subscribes it to its own RunEngine and adds the subscribers it needs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import matplotlib
import numpy as np
import pytest
from _reducers_for_tests import scaled
from bluesky import RunEngine
from bluesky.callbacks import LivePlot
from bluesky.callbacks.best_effort import BestEffortCallback
from bluesky.plans import scan
from ophyd.sim import SynAxis, SynGauss

from bluesky_analysis_store import AnalysisStore, AnalysisStoreCallback, AnalysisStoreError
from bluesky_analysis_store._run_summary import (
    SUMMARY_LOGGER,
    ReductionOutcome,
    lost_line,
    show_summaries,
    summary_line,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Worker processes open the store again: served by its local server, in a fraction of a
# second each (see conftest's ``store``).
STORE_SERVED = True

BACKGROUNDS = {"process": True, "thread": "thread", "foreground": False}
MODES = pytest.mark.parametrize("mode", list(BACKGROUNDS))
POSITIONS = [-1.0, -0.5, 0.0, 0.5, 1.0]


class Recorder:
    """A live subscriber keeping a copy of what it was given."""

    def __init__(self) -> None:
        self.docs: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.docs.append((name, copy.deepcopy(doc)))

    def of(self, name: str) -> list[dict[str, Any]]:
        return [doc for n, doc in self.docs if n == name]


@pytest.fixture(scope="module")
def callbacks(store: AnalysisStore) -> Iterator[dict[str, AnalysisStoreCallback]]:
    """The module's callbacks, one per background mode, made when first asked for."""
    made: dict[str, AnalysisStoreCallback] = {}

    class Lazy(dict):
        def __missing__(self, mode: str) -> AnalysisStoreCallback:
            made[mode] = self[mode] = AnalysisStoreCallback(
                [scaled], store, background=BACKGROUNDS[mode]
            )
            return made[mode]

    yield Lazy()
    for callback in made.values():
        callback.close(timeout=60)


@pytest.fixture
def det(motor: SynAxis) -> SynGauss:
    """A peak in ``motor``: each position gives another reading."""
    return SynGauss("det", motor, "motor", center=0, Imax=1, sigma=1)


@pytest.fixture
def live(
    RE: RunEngine,
    callbacks: dict[str, AnalysisStoreCallback],
    mode: str,
) -> Iterator[AnalysisStoreCallback]:
    """The mode's callback, subscribed to this test's RunEngine; the live subscribers the
    test adds are removed afterwards."""
    callback = callbacks[mode]
    callback.subscribe(RE)
    known = set(callback._view._subscribers)
    yield callback
    callback.unsubscribe(RE)
    for token in set(callback._view._subscribers) - known:
        callback.unsubscribe(token)


def scan_that_waits_for(recorder: Recorder, det: Any, motor: Any, after: int, seen: list[int]):
    """A scan over POSITIONS that, after ``after`` points, waits (on the RunEngine's loop)
    until ``recorder`` holds that many derived events, and notes how many it holds then."""

    @bpp.run_decorator(md={"plan_name": "scan_that_waits", "motors": ["motor"]})
    def inner():
        for n, position in enumerate(POSITIONS):
            yield from bps.mv(motor, position)
            yield from bps.trigger_and_read([det, motor])
            if n + 1 == after:
                for _ in range(3000):  # at most a minute; the assertion says if it ran out
                    if len(recorder.of("event")) >= after:
                        break
                    yield from bps.sleep(0.02)
                seen.append(len(recorder.of("event")))

    return (yield from inner())


# --- child documents during the scan ---------------------------------------------------


@MODES
def test_a_subscriber_sees_derived_events_during_the_scan_with_the_parent_motor(
    RE,
    live,
    store,
    det,
    motor,
    mode,
):
    recorder = Recorder()
    live.subscribe(recorder)
    raw = Recorder()
    RE.subscribe(raw)
    seen: list[int] = []

    (uid,) = RE(scan_that_waits_for(recorder, det, motor, after=3, seen=seen))

    # Three derived events had arrived before the raw run went on to its fourth point.
    assert seen == [3]
    assert [name for name, _ in recorder.docs] == ["start", "descriptor", *["event"] * 5, "stop"]
    [child_uid] = store.children(uid)
    [start] = recorder.of("start")
    assert start["uid"] == child_uid
    assert start["parent_uids"] == [uid]
    assert start["scan_id"] == raw.of("start")[0]["scan_id"]
    [descriptor] = recorder.of("descriptor")
    raw_keys = raw.of("descriptor")[0]["data_keys"]
    assert descriptor["data_keys"]["motor"] == raw_keys["motor"]
    assert descriptor["data_keys"]["det"] == raw_keys["det"]
    assert descriptor["hints"]["derived"]["fields"] == ["total", "shifted"]
    events = recorder.of("event")
    raw_events = raw.of("event")
    assert [e["data"]["motor"] for e in events] == POSITIONS
    assert [e["data"]["parent_seq_num"] for e in events] == [e["seq_num"] for e in raw_events]
    for event, raw_event in zip(events, raw_events, strict=True):
        assert event["data"]["det"] == raw_event["data"]["det"]
        assert event["data"]["total"] == pytest.approx(10 * raw_event["data"]["det"])
        assert event["timestamps"]["motor"] == raw_event["timestamps"]["motor"]
    assert recorder.of("stop")[0]["run_start"] == child_uid
    # What the store holds is the child run as made: no parent readings joined in.
    saved = store[child_uid]["primary"]
    assert "motor" not in saved and "det" not in saved
    np.testing.assert_allclose(saved["total"].read(), [e["data"]["total"] for e in events])


@MODES
def test_a_live_plot_draws_a_derived_value_against_the_parent_motor(
    RE,
    live,
    store,
    det,
    motor,
    mode,
):
    fig, ax = plt.subplots()
    try:
        plot = LivePlot("total", "motor", ax=ax)
        live.subscribe(plot)
        raw = Recorder()
        RE.subscribe(raw)

        (uid,) = RE(scan([det], motor, POSITIONS[0], POSITIONS[-1], len(POSITIONS)))

        # RE(...) returned once the child run was saved and handed to the plot in full.
        assert list(plot.current_line.get_xdata()) == pytest.approx(POSITIONS)
        totals = [10 * e["data"]["det"] for e in raw.of("event")]
        assert list(plot.current_line.get_ydata()) == pytest.approx(totals)
        assert ax.get_xlabel() == "motor" and ax.get_ylabel() == "total"
        [child_uid] = store.children(uid)
        np.testing.assert_allclose(store[child_uid]["primary"]["total"].read(), totals)
    finally:
        plt.close(fig)


@pytest.mark.parametrize("mode", ["thread"])
def test_best_effort_callback_tables_derived_values_against_the_motor(
    RE,
    live,
    det,
    motor,
    mode,
    capsys,
):
    bec = BestEffortCallback()
    bec.disable_plots()
    live.subscribe(bec)

    @bpp.run_decorator(md={"motors": ["motor"]})  # no dimension hints: BEC guesses from motors
    def unhinted():
        for position in (0.0, 1.0):
            yield from bps.mv(motor, position)
            yield from bps.trigger_and_read([det, motor])

    for plan in (scan([det], motor, -1, 1, 3), unhinted()):
        RE(plan)
        table = capsys.readouterr().out
        header = next(line for line in table.splitlines() if "seq_num" in line)
        columns = [column.strip() for column in header.strip("|").split("|")]
        assert columns == ["seq_num", "time", "motor", "total", "shifted"], table


# --- subscribers that fail, and unsubscribing -------------------------------------------


@MODES
def test_a_raising_subscriber_breaks_neither_the_scan_nor_the_other_subscribers(
    RE,
    live,
    store,
    det,
    motor,
    mode,
    caplog,
):
    calls: list[str] = []

    def broken(name: str, doc: dict[str, Any]) -> None:
        calls.append(name)
        raise RuntimeError("this plot is broken")

    live.subscribe(broken)
    recorder = Recorder()
    live.subscribe(recorder)
    with caplog.at_level(logging.ERROR, logger="bluesky_analysis_store"):
        (uid,) = RE(scan([det], motor, -1, 1, 4))

    assert len(calls) == 7  # start, descriptor, 4 events, stop: every one raised
    assert len(recorder.of("event")) == 4
    [child_uid] = store.children(uid)
    assert store[child_uid].stop["reduction"]["events_reduced"] == 4
    logged = [r for r in caplog.records if "live subscriber" in r.getMessage()]
    assert len(logged) == 1, "logged once per run, with its traceback"
    assert "this plot is broken" in logged[0].exc_text


@MODES
def test_an_unsubscribed_subscriber_gets_no_more_documents(
    RE,
    live,
    det,
    motor,
    mode,
):
    recorder = Recorder()
    token = live.subscribe(recorder)
    RE(scan([det], motor, -1, 1, 2))
    assert len(recorder.of("event")) == 2

    live.unsubscribe(token)
    RE(scan([det], motor, -1, 1, 3))
    assert len(recorder.of("start")) == 1

    live.subscribe(recorder)
    live.unsubscribe(recorder)  # by the subscriber itself
    RE(scan([det], motor, -1, 1, 2))
    assert len(recorder.of("start")) == 1


@pytest.mark.parametrize("mode", ["foreground"])
def test_subscribe_refuses_what_is_neither_a_run_engine_nor_a_callable(live, mode):
    with pytest.raises(AnalysisStoreError, match="callable"):
        live.subscribe(42)
    with pytest.raises(AnalysisStoreError, match="callable"):
        live.subscribe(live)
    with pytest.raises(AnalysisStoreError, match="token"):
        live.unsubscribe("plot")


# --- the summary line ----------------------------------------------------------------


def summary_records(caplog: pytest.LogCaptureFixture, raw_uid: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == SUMMARY_LOGGER and f"(raw {raw_uid[:8]})" in r.getMessage()
    ]


@MODES
def test_one_summary_line_per_scan_with_its_true_counts(
    RE,
    live,
    store,
    det,
    motor,
    mode,
    caplog,
):
    from ophyd.sim import det1  # a detector the reducer cannot use: every event fails

    raw = Recorder()
    RE.subscribe(raw)
    with caplog.at_level(logging.INFO, logger=SUMMARY_LOGGER):
        (good,) = RE(scan([det], motor, -1, 1, 4))
        # Logged before RE(...) returned: no waiting here.
        [line] = summary_records(caplog, good)
        (failed,) = RE(scan([det1], motor, -1, 1, 3))
        [failed_line] = summary_records(caplog, failed)

    [child] = store.children(good)
    scan_id = raw.of("start")[0]["scan_id"]
    assert line.levelno == logging.INFO
    assert line.getMessage() == (
        f"derived run {child[:8]} of scan {scan_id} (raw {good[:8]}): 4 events reduced, "
        f"0 failed; saved in {store.location}"
    )
    [failed_child] = store.children(failed)
    assert failed_line.levelno == logging.ERROR
    assert failed_line.getMessage().startswith(
        f"derived run {failed_child[:8]} of scan {scan_id + 1} (raw {failed[:8]}) FAILED: "
        "0 events reduced, 3 failed; saved in"
    )
    assert store[failed_child].stop["reduction"]["events_failed"] == 3


def test_no_summary_line_with_summary_off(RE, store, det, motor, caplog):
    callback = AnalysisStoreCallback([scaled], store, background=False, summary=False)
    try:
        callback.subscribe(RE)
        with caplog.at_level(logging.INFO, logger=SUMMARY_LOGGER):
            (uid,) = RE(scan([det], motor, -1, 1, 2))
        assert store.children(uid)
        assert summary_records(caplog, uid) == []
    finally:
        callback.close(timeout=60)


def test_the_summary_prints_to_stderr_only_while_no_handler_would_show_it(capsys):
    parent = logging.getLogger("test_live_view_fallback")
    parent.propagate = False  # a logger tree with no handler at all, as in a bare session
    name = "test_live_view_fallback.summary"
    show_summaries(name)
    show_summaries(name)  # a second callback adds no second handler
    summary = logging.getLogger(name)
    try:
        summary.info("derived run 1 of scan 2")
        assert capsys.readouterr().err == "derived run 1 of scan 2\n"

        shown: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: shown.append(record.getMessage())  # type: ignore[method-assign]
        parent.addHandler(handler)  # the user configured logging: that handler shows it
        summary.info("derived run 3 of scan 4")
        assert capsys.readouterr().err == ""
        assert shown == ["derived run 3 of scan 4"]
    finally:
        parent.handlers.clear()
        summary.handlers.clear()


def outcome(**changes: Any) -> ReductionOutcome:
    fields = {
        "raw_uid": "9f8e7d6c-0000",
        "child_uid": "1a2b3c4d-0000",
        "scan_id": 12,
        "events_reduced": 21,
        "events_failed": 0,
        "exit_status": "success",
        "saved": True,
        "store": "/data/analysis-store",
    }
    return ReductionOutcome(**{**fields, **changes})


@pytest.mark.parametrize(
    ("changes", "level", "text"),
    [
        (
            {},
            logging.INFO,
            "derived run 1a2b3c4d of scan 12 (raw 9f8e7d6c): 21 events reduced, 0 failed; "
            "saved in /data/analysis-store",
        ),
        (
            {"events_reduced": 20, "events_failed": 1},
            logging.WARNING,
            "derived run 1a2b3c4d of scan 12 (raw 9f8e7d6c) PARTLY FAILED: 20 events reduced, "
            "1 failed; saved in /data/analysis-store",
        ),
        (
            {"events_reduced": 0, "events_failed": 21, "scan_id": None},
            logging.ERROR,
            "derived run 1a2b3c4d (raw 9f8e7d6c) FAILED: 0 events reduced, 21 failed; "
            "saved in /data/analysis-store",
        ),
        (
            {"exit_status": "abort", "events_reduced": 3},
            logging.WARNING,
            "derived run 1a2b3c4d of scan 12 (raw 9f8e7d6c) (exit status abort): 3 events "
            "reduced, 0 failed; saved in /data/analysis-store",
        ),
        (
            {"exit_status": None},
            logging.ERROR,
            "derived run 1a2b3c4d of scan 12 (raw 9f8e7d6c) INCOMPLETE (no stop): 21 events "
            "reduced, 0 failed; saved in /data/analysis-store",
        ),
        (
            {"saved": False, "journal": "/j/1a2b.journal"},
            logging.WARNING,
            "derived run 1a2b3c4d of scan 12 (raw 9f8e7d6c): 21 events reduced, 0 failed; "
            "NOT SAVED yet: kept in the journal /j/1a2b.journal (the store did not take it; "
            "it is delivered again automatically, or with `bluesky-analysis-store recover`)",
        ),
        (
            {"child_uid": None, "events_reduced": 0},
            logging.ERROR,
            "no derived run of scan 12 (raw 9f8e7d6c): FAILED, it could not be started",
        ),
    ],
    ids=["success", "partly-failed", "all-failed", "aborted", "no-stop", "journal", "none"],
)
def test_summary_line_wording_says_failure_where_there_is_one(changes, level, text):
    assert summary_line(outcome(**changes)) == (level, text)


def test_a_lost_run_reads_as_lost():
    assert lost_line("9f8e7d6c-0000", 12, "the analysis worker process ended") == (
        "derived run of scan 12 (raw 9f8e7d6c) LOST: the analysis worker process ended"
    )
