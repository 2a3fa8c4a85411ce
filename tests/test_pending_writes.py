"""A store handed documents before its run writer is imported keeps them and writes them
from a thread (``_pending_writes``): nothing lost, reordered or silently refused.

Each case runs in a fresh interpreter, the only place where the writer is not imported yet
(the test session has imported it long before).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bluesky_analysis_store import AnalysisStore

_SCAN = textwrap.dedent(
    """
    import sys
    from bluesky import RunEngine
    from bluesky.plans import scan
    from ophyd.sim import SynAxis
    from bluesky_analysis_store import AnalysisStore
    from bluesky_analysis_store._pending_writes import writer_importable_now
    from bluesky_analysis_store.sim import spot_camera

    folder, raw, served, read_back = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
    motor = SynAxis(name="motor")
    cam = spot_camera(motor, raw, shape=(6, 5))
    RE = RunEngine({})
    store = AnalysisStore.open(folder, readable=[raw], served=served)
    importable_at_start = []
    # Subscribed before the store: what the store found when the start reached it (nothing
    # else here imports the writer; after the store, its own import thread might have).
    RE.subscribe(
        lambda name, doc: name == "start" and importable_at_start.append(writer_importable_now())
    )
    RE.subscribe(store)
    [uid] = RE(scan([cam], motor, -1, 1, 7))
    print("importable at start", importable_at_start)
    print("uid", uid)
    if read_back == "1":  # through the same store, at once
        run = store[uid]
        print("stop", run.metadata["stop"]["exit_status"])
        print("rows", len(run["primary"]["motor"].read()))
    """
)


def _run(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _said(lines: list[str], what: str) -> str:
    [line] = [line for line in lines if line.startswith(what + " ")]
    return line.removeprefix(what + " ")


@pytest.fixture(scope="module")
def served_scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One scan into a served store, read back through the same store at once."""
    base = tmp_path_factory.mktemp("pending")
    (base / "raw").mkdir()
    lines = _run(_SCAN, str(base / "store"), str(base / "raw"), "1", "1")
    return base / "store", lines


def test_a_first_scan_is_saved_whole_and_read_back_at_once(
    served_scan: tuple[Path, list[str]],
) -> None:
    _, lines = served_scan
    # The start went on while the writer was still importing: the pending path was taken.
    assert _said(lines, "importable at start") == "[False]"
    assert _said(lines, "stop") == "success"
    assert _said(lines, "rows") == "7"


def test_documents_kept_at_exit_are_written_before_the_interpreter_ends(
    tmp_path: Path,
) -> None:
    """No read after the scan: the in-process server closes at exit, after the writes."""
    store_folder, raw = tmp_path / "store", tmp_path / "raw"
    raw.mkdir()
    lines = _run(_SCAN, str(store_folder), str(raw), "0", "0")
    assert _said(lines, "importable at start") == "[False]"
    store = AnalysisStore.open(store_folder, readable=[raw], served=False)
    run = store[_said(lines, "uid")]
    assert run.metadata["stop"]["exit_status"] == "success"
    assert run.metadata["stop"]["num_events"] == {"primary": 7}
    primary = store.read_stream(run.start["uid"], "primary", ["motor", "cam"])
    np.testing.assert_allclose(primary["motor"], np.linspace(-1, 1, 7))
    frames = primary["cam"]
    assert frames.shape == (7, 6, 5)


_REFUSED = textwrap.dedent(
    """
    import sys
    from bluesky_analysis_store import AnalysisStore

    store = AnalysisStore.open(sys.argv[1])
    uid = next(iter(store.catalog))
    start = dict(store.catalog[uid].metadata["start"])
    store("start", start)  # a uid the catalog has: refused, later, by the writing thread
    try:
        store.flush()
    except Exception as error:
        print("flush raised", type(error).__name__, "409" in str(error))
    else:
        print("flush raised nothing")
    store.flush()
    print("second flush raised nothing")
    """
)


def test_a_document_refused_while_kept_is_raised_by_the_next_call(
    served_scan: tuple[Path, list[str]],
) -> None:
    store_folder, _ = served_scan
    lines = _run(_REFUSED, str(store_folder))
    assert "flush raised ClientError True" in lines
    assert "second flush raised nothing" in lines  # raised once, not on every later call
