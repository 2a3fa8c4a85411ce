"""Runs without a stop document, as a crash leaves them, and children that failed.

A SIGKILL of the scan's process leaves its runs in the catalog without a stop document: a raw
run with the events saved before the kill, and a child run that was being written. Here such
runs are made by saving a real run's documents through the store itself and leaving the stop
(and the later events) out: the raw runs come from a real RunEngine, the children from the
real reduction pipeline. Every tool must cope with them, show them as incomplete, and never
count an incomplete or failed child as "already reduced".
"""

from __future__ import annotations

import asyncio
import functools
import json
import pathlib
import sys
from collections.abc import Callable, Iterable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from bluesky import RunEngine  # noqa: E402
from bluesky.plans import count  # noqa: E402
from ophyd.sim import SynAxis  # noqa: E402

from _live import DocumentRecorder  # noqa: E402
from _offline_reducers import scaled_total  # noqa: E402
from bluesky_analysis_store import AnalysisStore, reprocess, reproduce  # noqa: E402
from bluesky_analysis_store._delivery import deliver_documents  # noqa: E402
from bluesky_analysis_store._reduction import ReductionPlan, RunReduction  # noqa: E402
from bluesky_analysis_store._replay import STAND_IN_REASON, replay_run  # noqa: E402
from bluesky_analysis_store._store import ChildRun  # noqa: E402
from bluesky_analysis_store.cli import main  # noqa: E402
from bluesky_analysis_store.sim import spot_camera  # noqa: E402

EVENTS = 5
KEPT = 2  # the events saved before the "crash"
REDUCER = "_offline_reducers:scaled_total"
# The same code for every event, and it fails for every event: the raw run has no such key.
NO_SUCH_KEY = functools.partial(scaled_total, key="no_such_key")
INTERRUPTED = "interrupted: the process died before the run was closed"

Documents = list[tuple[str, dict[str, Any]]]


# --- making runs ----------------------------------------------------------------------------


def up_to(documents: Iterable[tuple[str, dict]], keep: int) -> Documents:
    """A run's documents up to its ``keep``-th event, and never its stop."""
    kept: Documents = []
    events = 0
    for name, doc in documents:
        if name == "stop":
            continue
        if name == "event":
            if events == keep:
                break
            events += 1
        kept.append((name, doc))
    return kept


def save_without_stop(store: AnalysisStore, documents: Iterable[tuple[str, dict]], keep: int):
    """Save a raw run's documents up to its ``keep``-th event, and never its stop: what a
    crash after ``keep`` saved events leaves in the catalog."""
    for name, doc in up_to(documents, keep):
        store(name, doc)
    store.flush()


def deliver_without_stop(store: AnalysisStore, documents: Documents, keep: int) -> None:
    """A child run's documents up to its ``keep``-th event, delivered by the package's own
    write path (sealed, so children() lists it) and never stopped: what a crash leaves."""
    deliver_documents(store, up_to(documents, keep))


def reduced(
    store: AnalysisStore,
    raw_uid: str,
    reducers: list[Any],
    edit_stop: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Documents:
    """The documents of a child run of ``raw_uid``, made by the real reduction pipeline;
    ``edit_stop`` changes the raw stop it is given (a failed raw run)."""
    plan = ReductionPlan.for_store(reducers, store)
    documents: Documents = []
    reduction = RunReduction(plan, lambda name, doc: documents.append((name, doc)))
    for name, doc in replay_run(store[raw_uid]):
        reduction(name, doc)
    assert reduction.done
    if edit_stop is not None:
        (stop,) = [doc for name, doc in documents if name == "stop"]
        stop.update(edit_stop(stop))
    return documents


def recovery_stop(stop: dict[str, Any]) -> dict[str, Any]:
    """What ``recover`` writes into the stop of a child it closes after a crash."""
    return {
        "exit_status": "fail",
        "reason": INTERRUPTED,
        "reduction": {
            "events_reduced": stop["num_events"]["primary"],
            "events_failed": None,
            "failures": [],
            "raw_exit_status": None,
            "interrupted": True,
        },
    }


def save_all(store: AnalysisStore, documents: Documents) -> str:
    """A child run delivered whole by the package's own write path."""
    deliver_documents(store, documents)
    return documents[0][1]["uid"]


@pytest.fixture(scope="module")
def runs(store: AnalysisStore, RE_module, cam_module) -> dict[str, str]:
    """Raw runs and children, complete and not, in the module's store (made once)."""
    recorder = DocumentRecorder()
    RE_module.subscribe(recorder)

    def raw_run() -> str:
        (uid,) = RE_module(count([cam_module], num=EVENTS))
        return uid

    made: dict[str, str] = {}
    # A raw run killed after 2 of its 5 events.
    uid = raw_run()
    save_without_stop(store, recorder.run(uid), KEPT)
    made["raw_incomplete"] = uid
    # One killed right after its descriptor: a stream with no event at all.
    uid = raw_run()
    save_without_stop(store, recorder.run(uid), 0)
    made["raw_no_events"] = uid
    # Complete raw runs, each with children of one kind.
    RE_module.subscribe(store)
    for kind in ("child_incomplete", "child_failed", "child_all_failed", "child_ok"):
        made[f"raw_{kind}"] = raw_run()
    reducers = [scaled_total]
    # A child killed after 2 of its 5 events: its stop never reached the store.
    documents = reduced(store, made["raw_child_incomplete"], reducers)
    deliver_without_stop(store, documents, KEPT)
    made["child_incomplete"] = documents[0][1]["uid"]
    # A child closed later by a recovery tool: exit status "fail", why, and no failure count.
    made["child_failed"] = save_all(
        store, reduced(store, made["raw_child_failed"], reducers, recovery_stop)
    )
    # A child whose every event failed: complete, "success", and no data.
    made["child_all_failed"] = save_all(
        store, reduced(store, made["raw_child_all_failed"], [NO_SUCH_KEY])
    )
    # An incomplete child beside a complete, successful one.
    documents = reduced(store, made["raw_child_ok"], reducers)
    deliver_without_stop(store, documents, KEPT)
    made["child_ok_incomplete"] = documents[0][1]["uid"]
    made["child_ok"] = save_all(store, reduced(store, made["raw_child_ok"], reducers))
    return made


@pytest.fixture(scope="module")
def RE_module():  # noqa: N802 - the name every bluesky user knows
    """One RunEngine for the module's runs (conftest's ``RE`` is made for each test)."""
    loop = asyncio.new_event_loop()
    engine = RunEngine({}, loop=loop)
    yield engine
    loop.call_soon_threadsafe(loop.stop)
    engine._th.join()
    loop.close()


@pytest.fixture(scope="module")
def cam_module(raw_folder: pathlib.Path):
    return spot_camera(SynAxis(name="motor"), str(raw_folder), shape=(16, 16))


def cli(capsys: pytest.CaptureFixture[str], store: AnalysisStore, *args: str) -> tuple[int, str]:
    """The command line, in this process: its exit status and what it printed on stdout."""
    capsys.readouterr()
    status = main(["--store", str(store.location), *args])
    return status, capsys.readouterr().out


# --- ChildRun: how a child ended, and whether it counts --------------------------------------


START = {"uid": "c", "time": 5.0, "provenance": {"code": [{"name": "m:f", "version": "1"}]}}


def stop_with(exit_status: str = "success", reduced: int = 5, failed: int = 0, **extra: Any):
    return {
        "exit_status": exit_status,
        "reduction": {"events_reduced": reduced, "events_failed": failed},
        **extra,
    }


@pytest.mark.parametrize(
    ("stop", "succeeded", "status"),
    [
        (stop_with(), True, "success"),
        ({"exit_status": "success"}, True, "success"),  # saved without a reduction record
        (None, False, "incomplete (no stop)"),
        (stop_with("fail", reason="interrupted"), False, "fail (interrupted)"),
        (stop_with("abort"), False, "abort"),
        (stop_with(reduced=0, failed=5), False, "success, 5 of 5 events failed"),
        (stop_with(reduced=4, failed=1), False, "success, 1 of 5 events failed"),
    ],
)
def test_child_run_says_how_it_ended_and_whether_it_counts(stop, succeeded, status):
    child = ChildRun.from_start("c", START, stop)
    assert child == "c" and isinstance(child, str)
    assert child.time == 5.0 and child.code_versions == "m:f 1"
    assert child.complete is (stop is not None)
    assert child.exit_status == (stop or {}).get("exit_status")
    assert child.succeeded is succeeded
    assert child.status == status
    assert status in repr(child)


def test_children_lists_incomplete_and_failed_children_with_their_state(store, runs):
    [incomplete] = store.children(runs["raw_child_incomplete"])
    assert incomplete == runs["child_incomplete"]
    assert incomplete.complete is False and incomplete.exit_status is None
    assert incomplete.events_reduced is None and incomplete.events_failed is None
    assert incomplete.code_versions.startswith(REDUCER)

    [failed] = store.children(runs["raw_child_failed"])
    assert (failed.complete, failed.exit_status, failed.reason) == (True, "fail", INTERRUPTED)
    assert (failed.events_reduced, failed.events_failed) == (EVENTS, None)

    [all_failed] = store.children(runs["raw_child_all_failed"])
    assert (all_failed.exit_status, all_failed.events_reduced) == ("success", 0)
    assert all_failed.events_failed == EVENTS and not all_failed.succeeded

    assert store.children(runs["raw_child_ok"]) == [runs["child_ok"], runs["child_ok_incomplete"]]
    assert [c.succeeded for c in store.children(runs["raw_child_ok"])] == [True, False]


# --- reprocess: what counts as already reduced ------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "reducer", "status"),
    [
        ("child_incomplete", scaled_total, "incomplete (no stop)"),
        ("child_failed", scaled_total, f"fail ({INTERRUPTED})"),
        ("child_all_failed", NO_SUCH_KEY, f"success, {EVENTS} of {EVENTS} events failed"),
    ],
)
def test_an_incomplete_or_failed_child_does_not_block_reprocess(
    store, runs, kind, reducer, status
):
    raw_uid, earlier = runs[f"raw_{kind}"], runs[kind]

    report = reprocess(store, raw_uid, [reducer], store, progress=False)

    assert report.skipped == {}
    if kind == "child_all_failed":  # the new child fails on every event again: a failure
        new_uid = report.failed_children[raw_uid]
        assert report.saved == {}
        assert f"every event failed ({EVENTS};" in report.failed[raw_uid]
    else:
        assert report.failed == {}
        new_uid = report.saved[raw_uid]
    assert report.not_counted == {raw_uid: {earlier: status}}
    assert f"earlier child {earlier} of {raw_uid} is {status}: not counted" in str(report)
    assert store.children(raw_uid)[:2] == [new_uid, earlier]
    assert store[new_uid].stop["num_events"].get("primary", 0) == (
        EVENTS if reducer is scaled_total else 0
    )


def test_a_complete_successful_child_still_blocks_reprocess(store, runs):
    raw_uid = runs["raw_child_ok"]
    report = reprocess(store, raw_uid, [scaled_total], store, progress=False)
    assert report.skipped == {raw_uid: runs["child_ok"]}
    assert report.saved == {} and report.not_counted == {}
    assert store.children(raw_uid) == [runs["child_ok"], runs["child_ok_incomplete"]]


def test_a_raw_run_without_stop_is_reduced_as_far_as_it_goes(store, runs):
    raw_uid = runs["raw_incomplete"]
    first = reprocess(store, raw_uid, [scaled_total], store, progress=False)

    assert first.failed == {} and first.skipped == {}
    child_uid = first.saved[raw_uid]
    assert f"replayed the {KEPT} events saved so far" in first.incomplete[raw_uid]
    assert f"incomplete raw run {raw_uid}" in str(first)
    child = store[child_uid]
    assert child.stop["exit_status"] == "fail" and child.stop["reason"] == STAND_IN_REASON
    assert child.stop["num_events"] == {"primary": KEPT}
    assert child.stop["reduction"]["events_reduced"] == KEPT
    frames = np.asarray(store[raw_uid]["primary"]["cam"].read(), dtype=np.float64)
    assert frames.shape == (KEPT, 16, 16)
    np.testing.assert_array_equal(child["primary"]["total"].read(), frames.sum(axis=(1, 2)))

    # Its child never counts as reduced: the scan may still be running.
    again = reprocess(store, raw_uid, [scaled_total], store, progress=False)
    assert again.skipped == {} and list(again.saved) == [raw_uid]
    assert child_uid in again.not_counted[raw_uid]

    # It is reproduced from the events the raw run has, and the report says so.
    checked = reproduce(store, child_uid, progress=False)
    assert checked.identical and checked.events_compared == KEPT
    assert any(raw_uid in note for note in checked.incomplete)


def test_a_raw_run_stopped_before_its_first_event_gives_an_empty_child(store, runs):
    raw_uid = runs["raw_no_events"]
    report = reprocess(store, raw_uid, [scaled_total], store, progress=False)
    assert report.failed == {} and "replayed the 0 events" in report.incomplete[raw_uid]
    child = store[report.saved[raw_uid]]
    assert child.stop["exit_status"] == "fail" and child.stop["num_events"] == {}


def test_reproduce_of_an_incomplete_child_is_not_a_crash(store, runs):
    report = reproduce(store, runs["child_incomplete"], progress=False)
    assert report.identical is False  # the re-run makes all 5 events; 2 were saved
    assert report.difference is not None and "only 2 events" in report.difference.detail
    assert "no stop document" in str(report) and "NOT reproduced" in str(report)


# --- the command line, in this process -------------------------------------------------------


def test_ls_lists_every_run_and_marks_the_incomplete(capsys, store, runs):
    status, out = cli(capsys, store, "ls", "--limit", "0")
    assert status == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert f"[incomplete (no stop), {KEPT} events saved]" in lines[runs["raw_incomplete"]]
    assert "[incomplete (no stop), 2 events saved]" in lines[runs["child_incomplete"]]
    assert f"[fail ({INTERRUPTED})]" in lines[runs["child_failed"]]
    assert f"{EVENTS} of {EVENTS} events failed]" in lines[runs["child_all_failed"]]
    assert "[" not in lines[runs["child_ok"]] and "[" not in lines[runs["raw_child_ok"]]
    assert "[incomplete (no stop), 0 events saved]" in lines[runs["raw_no_events"]]

    status, out = cli(capsys, store, "ls", "--json", "--limit", "0")
    summaries = {s["uid"]: s for s in json.loads(out)}
    raw = summaries[runs["raw_incomplete"]]
    assert raw["complete"] is False and raw["exit_status"] is None
    assert raw["status"] == "incomplete (no stop)" and raw["events_saved"] == {"primary": KEPT}
    assert summaries[runs["child_ok"]]["complete"] is True

    status, out = cli(capsys, store, "ls", "--children", runs["raw_child_ok"])
    assert status == 0
    assert [line.split()[0] for line in out.splitlines()] == [
        runs["child_ok"],
        runs["child_ok_incomplete"],
    ]


def test_show_prints_what_an_incomplete_run_has(capsys, store, runs):
    status, out = cli(capsys, store, "show", runs["raw_incomplete"])
    assert status == 0
    assert "  no stop document: the run is incomplete (interrupted?)\n" in out
    assert f"  primary ({KEPT} events saved so far)\n" in out
    assert "    cam  shape (2, 16, 16)  dtype uint16" in out

    status, out = cli(capsys, store, "show", runs["raw_no_events"])
    assert status == 0 and "  primary (0 events saved so far)\n" in out

    status, out = cli(capsys, store, "show", runs["child_incomplete"], "--json")
    record = json.loads(out)
    assert record["complete"] is False and record["stop"] is None
    assert record["streams"]["primary"]["events"] == KEPT
    assert record["provenance"]["parents"][0]["uid"] == runs["raw_child_incomplete"]


def test_show_prints_the_reason_and_the_reduction_record(capsys, store, runs):
    status, out = cli(capsys, store, "show", runs["child_failed"])
    assert status == 0
    assert "  exit status: fail\n" in out and f"  reason: {INTERRUPTED}\n" in out
    assert f"  reduction: {EVENTS} events reduced, ? failed (interrupted)\n" in out

    status, out = cli(capsys, store, "show", runs["child_all_failed"])
    assert f"  reduction: 0 events reduced, {EVENTS} failed\n" in out
    assert (
        f"    failed at stream primary, seq_num 1-{EVENTS} ({EVENTS} events) while "
        "scaled_total.event: KeyError"
    ) in out
    assert f"  exit status: FAILED: {EVENTS} of {EVENTS} events failed" in out


def test_plot_and_reprocess_an_incomplete_raw_run(capsys, store, runs, tmp_path):
    output = tmp_path / "cam.png"
    status, out = cli(capsys, store, "plot", runs["raw_incomplete"], "cam", "-o", str(output))
    assert status == 0 and out.strip() == str(output)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    status, out = cli(capsys, store, "reprocess", runs["raw_incomplete"][:8], "--reducer", REDUCER)
    assert status == 0
    assert out.startswith("1 saved, 0 already reduced, 0 failed")
    assert f"incomplete raw run {runs['raw_incomplete']}: no stop document" in out
