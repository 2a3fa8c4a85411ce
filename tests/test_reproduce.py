"""``reproduce``: re-running a child run's recorded code on its recorded inputs, and comparing.

Raw runs come from a real RunEngine into a real embedded store (frames as NPY files the store
may read); child runs are made live by :class:`AnalysisStoreCallback`. Changing a raw frame,
the code (in a git checkout of its own) or an ingested input file must be found and named.
"""

from __future__ import annotations

import functools
import importlib
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _helpers import users_environment  # noqa: E402
from _live import dark_then_positions  # noqa: E402
from _offline_reducers import ingest_table  # noqa: E402
from bluesky import RunEngine  # noqa: E402
from bluesky.plans import count  # noqa: E402

from bluesky_analysis_store import (  # noqa: E402
    AnalysisStore,
    AnalysisStoreError,
    ProvenanceError,
    Reducer,
    ReproduceReport,
    reprocess,
    reproduce,
)
from bluesky_analysis_store.example_reducers import (  # noqa: E402
    DarkSubtracted,
    normalise_and_sum,
)
from bluesky_analysis_store.sim import spot_image  # noqa: E402

# Each test makes callbacks: the module's store is served, as a user's is (conftest.py).
STORE_SERVED = True

# The RunEngine, the devices and the module's store are fixtures of conftest.py.
pytestmark = pytest.mark.usefixtures("runs_saved_in_store")


REDUCERS = [normalise_and_sum, DarkSubtracted(key="cam")]
POSITIONS = [-2.0, -1.0, 1.0, 2.0]
DARKS = {0: -4.0, 2: 4.0}


def live_child(
    RE: RunEngine, store: AnalysisStore, cam: Any, motor: Any, make_callback: Any  # noqa: N803
) -> tuple[str, str]:
    """A raw run with a ``dark`` and a ``primary`` stream, reduced live: (raw uid, child uid)."""
    make_callback(REDUCERS).subscribe(RE)
    (raw_uid,) = RE(dark_then_positions(cam, motor, POSITIONS, DARKS))
    (child_uid,) = store.children(raw_uid)
    return raw_uid, child_uid


# --- 5. a live child run is reproduced; a changed raw file is found -----------------------


def test_a_live_child_run_is_reproduced_event_for_event(RE, store, cam, motor, make_callback):
    _, child_uid = live_child(RE, store, cam, motor, make_callback)
    child = store[child_uid]
    assert child.stop["num_events"] == {"primary": 4, "summary": 1}

    report = reproduce(store, child_uid, progress=False)

    assert report.child_uid == child_uid
    assert report.identical is True
    assert report.difference is None
    assert report.code_changes == [] and report.file_changes == []
    assert report.events_compared == 5 == sum(len(child[s]["seq_num"]) for s in child)
    assert "reproduced: 5 events identical" in str(report)
    # What was compared, stream by stream and key by key.
    assert {stream: sorted(keys) for stream, keys in report.keys.items()} == {
        "primary": ["corrected", "corrected_total", "normalised", "parent_seq_num", "total"],
        "summary": ["summed"],
    }
    assert all(c.verdict == "identical" for keys in report.keys.values() for c in keys.values())
    assert "  stream 'primary': 4 events compared, 5 keys\n" in str(report)
    assert "    identical: corrected, corrected_total, normalised, parent_seq_num, total" in str(
        report
    )


def test_a_changed_raw_data_file_is_named_by_stream_key_and_seq_num(
    RE, store, cam, motor, recorder, make_callback
):
    raw_uid, child_uid = live_child(RE, store, cam, motor, make_callback)
    path = recorder.frame_files(raw_uid)[("primary", 3)]
    original = np.load(path)
    replacement = spot_image(-4.5, original.shape)  # the spot somewhere else entirely
    assert replacement.dtype == original.dtype and not np.array_equal(replacement, original)
    np.save(path, replacement)

    report = reproduce(store, child_uid, progress=False)

    assert report.identical is False
    assert report.difference is not None
    # The first key of the first event that differs: normalise_and_sum's frame.
    assert (report.difference.stream, report.difference.key, report.difference.seq_num) == (
        "primary",
        "normalised",
        3,
    )
    assert "differ" in report.difference.detail
    assert "seq_num 3" in str(report) and "'normalised'" in str(report)
    # Every key of every event is compared: which differ, and which are identical.
    primary = report.keys["primary"]
    assert (primary["normalised"].verdict, primary["normalised"].detail) == (
        "differ",
        "first at seq_num 3",
    )
    assert primary["parent_seq_num"].verdict == "identical"
    assert primary["parent_seq_num"].events == len(POSITIONS)
    assert "    differ: " in str(report) and "normalised (first at seq_num 3)" in str(report)
    assert "    identical: " in str(report)
    assert report.file_changes == [] and report.code_changes == []

    # Putting the frame back makes the child reproducible again.
    np.save(path, original)
    assert reproduce(store, child_uid, progress=False).identical is True


# --- 5. changed code: refused, or run and compared when allowed ---------------------------

GIT_MODULE = "offline_reducer_in_git"
FIRST_VERSION = textwrap.dedent(
    """
    import numpy as np


    def frame_total(data):
        return {"total": float(np.asarray(data["cam"]).sum(dtype=np.float64))}
    """
)
SECOND_VERSION = textwrap.dedent(
    """
    import numpy as np


    def frame_total(data):
        # Counts are now reported in kilo-counts.
        return {"total": float(np.asarray(data["cam"]).sum(dtype=np.float64)) / 1000.0}
    """
)


def git(folder: pathlib.Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(folder), "-c", "user.name=Test", "-c", "user.email=test@example.org",
         "-c", "commit.gpgsign=false", *args],
        capture_output=True, text=True, check=True,
    )
    return result.stdout.strip()


@pytest.fixture
def code_checkout(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A git checkout holding one committed reducer module, importable for this test only."""
    folder = tmp_path / "checkout"
    folder.mkdir()
    git(folder, "init", "-q")
    (folder / f"{GIT_MODULE}.py").write_text(FIRST_VERSION)
    git(folder, "add", f"{GIT_MODULE}.py")
    git(folder, "commit", "-q", "-m", "first version")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    yield folder
    sys.modules.pop(GIT_MODULE, None)


THIRD_VERSION = FIRST_VERSION.replace(
    'sum(dtype=np.float64))}', 'sum(dtype=np.float64)) * (1 + 1e-12)}'
)


def test_changed_code_runs_and_the_report_names_the_change_and_the_values_verdict(
    RE, store, cam, code_checkout, make_callback
):
    first_commit = git(code_checkout, "rev-parse", "HEAD")
    module = importlib.import_module(GIT_MODULE)
    make_callback([module.frame_total]).subscribe(RE)
    (raw_uid,) = RE(count([cam], num=3))
    (child_uid,) = store.children(raw_uid)
    [code] = store[child_uid].start["provenance"]["code"]
    assert code["name"] == f"{GIT_MODULE}:frame_total"
    assert (code["commit"], code["dirty"], code["version"]) == (first_commit, False, first_commit)
    unchanged = reproduce(store, child_uid, rtol=1e-9, progress=False)
    assert unchanged.values == "identical"
    assert unchanged.identical is True and unchanged.reproduced is True
    assert unchanged.code_loaded == [f"{GIT_MODULE}:frame_total: installed, same identity"]

    def commit(source: str, message: str) -> str:
        (code_checkout / f"{GIT_MODULE}.py").write_text(source)
        git(code_checkout, "commit", "-q", "-am", message)
        importlib.reload(module)
        return git(code_checkout, "rev-parse", "HEAD")

    # Kilo-counts: the code changed, and so do the values.
    second_commit = commit(SECOND_VERSION, "report kilo-counts")
    report = reproduce(store, child_uid, progress=False)
    assert (report.identical, report.reproduced, report.values) == (False, False, "differ")
    assert len(report.code_changes) == 1
    change = report.code_changes[0]
    assert f"{GIT_MODULE}:frame_total" in change
    assert change.index(first_commit) < change.index(second_commit)  # recorded -> current
    assert report.difference is not None
    assert (report.difference.stream, report.difference.key, report.difference.seq_num) == (
        "primary",
        "total",
        1,
    )
    saved_total = float(store[child_uid]["primary"]["total"].read()[0])
    assert repr(saved_total) in report.difference.detail
    assert repr(saved_total / 1000.0) in report.difference.detail
    shown = str(report)
    assert f"code changed: {change}" in shown and "values: differ" in shown

    # A change in the last digits: the values differ exactly, not within a tolerance.
    commit(THIRD_VERSION, "round differently")
    exact = reproduce(store, child_uid, progress=False)
    assert exact.values == "differ" and "total" in str(exact.difference)
    tolerant = reproduce(store, child_uid, rtol=1e-9, progress=False)
    assert (tolerant.values, tolerant.reproduced, tolerant.difference) == (
        "within tolerance",
        False,  # the code still changed
        None,
    )
    assert "key 'total'" in tolerant.largest_deviation
    assert "code changed:" in str(tolerant)
    assert "values: within tolerance (rtol=1e-09, atol=0)" in str(tolerant)
    assert reproduce(store, child_uid, atol=1e-3, progress=False).values == "within tolerance"
    with pytest.raises(AnalysisStoreError, match="rtol must be"):
        reproduce(store, child_uid, rtol=-1.0, progress=False)

    # The former refusal is still there for whoever asks for it, with a warning.
    with pytest.warns(DeprecationWarning, match="allow_changed_code"):
        with pytest.raises(ProvenanceError, match=first_commit[:12]):
            reproduce(store, child_uid, allow_changed_code=False, progress=False)


# --- 6. an ingested run: its input files are checked --------------------------------------


def test_an_ingested_run_is_checked_against_its_input_file(store, tmp_path):
    path = tmp_path / "table.txt"
    path.write_text("1.5\n2.5\n4.0\n")
    uid = store.save(
        ingest_table(str(path)), {"purpose": "ingested"}, files=[path], code=ingest_table
    )
    [record] = store[uid].start["provenance"]["files"]
    assert record["path"] == str(path)

    unchanged = reproduce(store, uid, progress=False)
    assert unchanged.identical is True
    assert unchanged.file_changes == [] and unchanged.code_changes == []

    path.write_text("1.5\n2.5\n4.5\n")
    changed = reproduce(store, uid, progress=False)
    assert changed.identical is False
    assert len(changed.file_changes) == 1 and str(path) in changed.file_changes[0]
    assert str(path) in str(changed)

    path.unlink()
    missing = reproduce(store, uid, progress=False)
    assert missing.identical is False
    assert missing.file_changes == [f"{path} is missing"]


# --- 7. reducers of __main__: a script, an IPython profile, the prompt ---------------------
# Each session's top level appends a line to a marker file; reproducing its reducer must
# leave the marker as it was: only the recorded definition runs, never the file around it.

SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np

    from bluesky_analysis_store import AnalysisStore, reprocess

    with open(sys.argv[3], "a") as marks:
        marks.write("script ran\\n")

    GAIN = 2.5


    def _scaled(value):
        return GAIN * value


    def scaled_total(data):
        return {"scaled_total": _scaled(float(np.asarray(data["cam"]).sum(dtype=np.float64)))}


    store = AnalysisStore.open(sys.argv[1])
    report = reprocess(store, sys.argv[2], [scaled_total], store, progress=False)
    print("CHILD", report.saved[sys.argv[2]])
    """
)

STARTUP = textwrap.dedent(
    """
    import os

    import numpy as np

    from bluesky_analysis_store import AnalysisStore, Reducer, reprocess

    with open(os.environ["MARKS"], "a") as marks:
        marks.write("profile ran\\n")


    def profile_peak(data):
        return {"peak": float(np.asarray(data["cam"]).max())}


    store = AnalysisStore.open(os.environ["STORE"])
    """
)

SESSION = """
with open(os.environ["MARKS"], "a") as marks:
    marks.write("prompt ran\\n")
class ColumnProfile(Reducer):
    scale = 0.5
    def event(self, stream, data, doc):
        return {"columns": self.scale * np.asarray(data["cam"], dtype=np.float64).sum(axis=0)}
raw = os.environ["RAW"]
for reducer in (profile_peak, ColumnProfile()):
    print("CHILD", reprocess(store, raw, [reducer], store, progress=False).saved[raw])
"""


def marker_lines(marks: pathlib.Path) -> list[str]:
    return marks.read_text().splitlines()


def run_session(args: list[str], cwd: pathlib.Path, **env: str) -> list[str]:
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=users_environment(**env),
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [line.split()[1] for line in result.stdout.splitlines() if line.startswith("CHILD ")]


def assert_needs_trust_then_reproduces(store, child_uid, marks, code_name) -> ReproduceReport:
    before = marker_lines(marks)
    with pytest.raises(ProvenanceError, match="trust_recorded_code=True") as refused:
        reproduce(store, child_uid, progress=False)
    assert code_name in str(refused.value)
    report = reproduce(store, child_uid, trust_recorded_code=True, progress=False)
    assert report.identical is True, str(report)
    assert report.events_compared == 2
    assert "recorded source" in report.code_loaded[0] and "checked" in report.code_loaded[0]
    assert marker_lines(marks) == before  # nothing else of the session ran
    return report


@pytest.mark.slow
def test_a_script_reducer_is_reproduced_without_running_the_script(
    RE, store, cam, module_store_folder, tmp_path
):
    (raw_uid,) = RE(count([cam], num=2))
    script, marks = tmp_path / "reduce.py", tmp_path / "marks.txt"
    script.write_text(SCRIPT)
    (child_uid,) = run_session(
        [sys.executable, str(script), str(module_store_folder), raw_uid, str(marks)], tmp_path
    )
    assert marker_lines(marks) == ["script ran"]
    [code] = store[child_uid].start["provenance"]["code"]
    assert code["name"] == "__main__:scaled_total"
    assert code["recorded_code"]["constants"] == {"GAIN": "2.5"}
    assert "store = AnalysisStore" not in "".join(code["recorded_code"]["definitions"])

    assert_needs_trust_then_reproduces(store, child_uid, marks, "__main__:scaled_total")
    # The script edited afterwards changes nothing: its file is never read again.
    script.write_text(SCRIPT.replace("GAIN = 2.5", "GAIN = 3.0"))
    assert reproduce(store, child_uid, trust_recorded_code=True, progress=False).identical


@pytest.mark.slow
def test_profile_and_prompt_reducers_are_reproduced_without_running_the_session(
    RE, store, cam, module_store_folder, tmp_path
):
    (raw_uid,) = RE(count([cam], num=2))
    profile, marks = tmp_path / "profile", tmp_path / "marks.txt"
    (profile / "startup").mkdir(parents=True)
    (profile / "startup" / "00-reduce.py").write_text(STARTUP)
    ipython = pathlib.Path(sys.executable).with_name("ipython")
    children = run_session(
        [str(ipython), f"--profile-dir={profile}", "--no-banner", "-c", SESSION],
        tmp_path,
        MARKS=str(marks),
        STORE=str(module_store_folder),
        RAW=raw_uid,
    )
    assert marker_lines(marks) == ["profile ran", "prompt ran"]
    from_profile, from_prompt = children

    [code] = store[from_profile].start["provenance"]["code"]
    assert code["name"] == "__main__:profile_peak"
    assert code["file"].endswith("00-reduce.py") and code["recorded_code"]["imports"] == {
        "np": "numpy"
    }
    assert_needs_trust_then_reproduces(store, from_profile, marks, "__main__:profile_peak")

    [code] = store[from_prompt].start["provenance"]["code"]
    assert code["name"] == "__main__:ColumnProfile" and "params" not in code
    assert code["version"] == "source-sha256:" + code["source_sha256"]
    assert code["recorded_code"]["definitions"][0].startswith("class ColumnProfile(Reducer):")
    assert_needs_trust_then_reproduces(store, from_prompt, marks, "__main__:ColumnProfile")


# --- 8. a crafted code record: refused, and nothing runs ----------------------------------


class ClaimsToBe(Reducer):
    """A reducer whose code record says it is some other code: how a crafted provenance
    record gets into a child run made through the real pipeline."""

    def __init__(self, record: dict[str, Any]) -> None:
        self._record = record

    @property
    def code(self) -> Any:
        return self._record

    def event(self, stream: str, data: Any, doc: Any) -> Any:
        return {"twice": 2.0 * float(np.asarray(data["cam"]).sum(dtype=np.float64))}


LEGACY_SCRIPT = textwrap.dedent(
    """
    import numpy as np

    with open({marks!r}, "a") as marks:
        marks.write("top level ran\\n")


    def twice(data):
        return {{"twice": 2.0 * float(np.asarray(data["cam"]).sum(dtype=np.float64))}}
    """
)


def crafted_child(store, raw_uid: str, record: dict[str, Any]) -> str:
    report = reprocess(
        store, raw_uid, [ClaimsToBe(record)], store, strict=False, force=True, progress=False
    )
    return report.saved[raw_uid]


def test_crafted_code_records_are_refused_before_anything_runs(RE, store, cam, tmp_path):
    from bluesky_analysis_store._recorded_code import source_sha256

    (raw_uid,) = RE(count([cam], num=2))
    marks = tmp_path / "marks.txt"
    evil = f'def twice(data, _=open({str(marks)!r}, "a").write("ran\\n")):\n    return {{}}\n'
    recorded = {
        "format": "python-source/1",
        "defines": "twice",
        "definitions": [evil],
        "imports": {},
        "constants": {},
    }
    wrong_hash = {"name": "__main__:twice", "recorded_code": recorded, "source_sha256": "0" * 64}
    child_uid = crafted_child(store, raw_uid, wrong_hash)
    with pytest.raises(ProvenanceError, match="does not match its sha256"):
        reproduce(store, child_uid, trust_recorded_code=True, progress=False)
    with pytest.raises(ProvenanceError, match="trust_recorded_code"):
        reproduce(store, child_uid, progress=False)

    # A matching hash but more than one definition statement: refused as well.
    smuggled = {**recorded, "definitions": [f"import os\n{evil}"]}
    child_uid = crafted_child(
        store,
        raw_uid,
        {
            "name": "__main__:twice",
            "recorded_code": smuggled,
            "source_sha256": source_sha256(smuggled),
        },
    )
    with pytest.raises(ProvenanceError, match="other statements than one definition"):
        reproduce(store, child_uid, trust_recorded_code=True, progress=False)

    # A record that names a script file (as made before source was recorded), with a
    # sha256 the file does not have: the file is refused unread.
    script = tmp_path / "legacy.py"
    script.write_text(LEGACY_SCRIPT.format(marks=str(marks)))
    legacy = {"name": "__main__:twice", "file": str(script), "sha256": "f" * 64}
    child_uid = crafted_child(store, raw_uid, legacy)
    with pytest.raises(ProvenanceError, match="does not match the sha256.*nothing was run"):
        reproduce(store, child_uid, trust_recorded_code=True, progress=False)
    assert not marks.exists()

    # With the file's true sha256 its definition is taken alone: the top level never runs.
    from bluesky_analysis_store._provenance import sha256_of_file

    child_uid = crafted_child(store, raw_uid, {**legacy, "sha256": sha256_of_file(script)})
    with pytest.raises(ProvenanceError, match="trust_recorded_code"):
        reproduce(store, child_uid, progress=False)
    report = reproduce(store, child_uid, trust_recorded_code=True, progress=False)
    assert report.identical is True, str(report)
    assert "its definition alone from" in report.code_loaded[0]
    assert not marks.exists()


# --- a child on which every event failed: nothing was reproduced ---------------------------


def test_an_all_failed_child_is_not_reproduced(RE, store, cam):  # noqa: N803
    from _offline_reducers import scaled_total

    (raw_uid,) = RE(count([cam], num=3))
    no_such_key = functools.partial(scaled_total, key="no_such_key")
    child_uid = reprocess(store, raw_uid, [no_such_key], store, progress=False).failed_children[
        raw_uid
    ]

    report = reproduce(store, child_uid, progress=False)

    assert report.values == "nothing compared"
    assert (report.reproduced, report.identical, report.events_compared) == (False, False, 0)
    assert (report.events_saved, report.events_failed_saved, report.events_failed) == (0, 3, 3)
    assert report.difference is None  # it failed again the same way: not a difference
    shown = str(report)
    assert shown.startswith(f"child run {child_uid} NOT reproduced: nothing was compared")
    assert "the saved child holds 0 events; 3 failed when it was made" in shown
    assert "the re-run failed on 3 events (the child records 3 failed)" in shown
    assert "scaled_total.event: KeyError: 'no_such_key'" in shown
