"""The command line: ``demo``, ``--help``, ``--version`` and the installed script run as users
run them, ``python -m bluesky_analysis_store`` in a subprocess; every other command calls
:func:`bluesky_analysis_store.cli.main` in this process (the same parser, commands, output and
exit status, without an interpreter and tiled's imports to start each time).

One store per module is made by the ``demo`` subcommand itself (a simulated scan, its raw run
and the child run reduced live); the other subcommands read it, plot from it, reprocess and
reproduce its runs and ingest a file into it. Tests that add runs to it only add: none counts
the runs of another.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import struct
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bluesky_analysis_store import DATA_ROOT_ENV, STORE_ENV
from bluesky_analysis_store._local_server import SERVED_ENV
from bluesky_analysis_store.cli import main

PROG = "bluesky-analysis-store"
ERROR_PREFIX = f"{PROG}: error:"
REDUCER = "bluesky_analysis_store.example_reducers:spot_statistics"
POINTS = 7
FRAME_SHAPE = [64, 64]  # the simulated camera's frames (bluesky_analysis_store.sim)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SUBCOMMANDS = {
    "demo": ["--store", "--plot", "--points"],
    "ls": ["--children", "--limit", "--json", "--store"],
    "show": ["UID", "--json", "--store"],
    "plot": ["UID", "KEY", "--output", "--stream", "--index", "--x", "--size", "--dpi"],
    "reprocess": [
        "RAW_UID", "--reducer", "--source", "--stream", "--writer", "--force", "--derived", "--md"
    ],
    "ingest": ["PATH", "--md", "--stream", "--writer"],
    "reproduce": ["CHILD_UID", "--source", "--trust-recorded-code", "--rtol", "--atol"],
    "recover": ["--journal"],
    "serve": ["--database", "--read", "--host", "--port", "--streaming"],
    "worker": ["--zmq", "--reducers", "--root-map", "--writer", "--stream", "--run-timeout"],
    "watch": ["--children", "--json", "--plot", "--output", "--runs"],
}


def _environment(cwd: Path, env: dict[str, str] | None) -> dict[str, str]:
    """The process's environment with no store setting but ``env``'s."""
    environment = {k: v for k, v in os.environ.items() if k not in (STORE_ENV, DATA_ROOT_ENV)}
    environment[DATA_ROOT_ENV] = str(cwd / "default-data")  # nothing lands in the checkout
    environment.update(env or {})
    return environment


def run_cli_process(
    *args: str | os.PathLike[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The command, with ``args``, in a subprocess whose store setting is only ``env``'s.
    Its stores are served as a user's are (the suite's in-process default is dropped)."""
    environment = _environment(cwd, env)
    if SERVED_ENV not in (env or {}):
        environment.pop(SERVED_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "bluesky_analysis_store", *map(str, args)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )


def run_cli(
    *args: str | os.PathLike[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The command, with ``args``, through ``main`` in this process, in ``cwd`` with only
    ``env``'s store setting; its stdout, stderr and exit status as a subprocess gives them."""
    argv = [str(arg) for arg in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_environment, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(_environment(cwd, env))
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = main(argv)
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_environment)
    return subprocess.CompletedProcess(
        [PROG, *argv], status, stdout.getvalue(), stderr.getvalue()
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


def assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit status 2 and one line on stderr, ``bluesky-analysis-store: error: ...``."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, chunk_type = struct.unpack(">I4s", data[8:16])
    assert chunk_type == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def demo(workdir: Path) -> dict[str, Any]:
    """The demo, run by ``bluesky-analysis-store demo``, into a new store (about 10-30 s)."""
    store = workdir / "store"
    plot = workdir / "demo-centroid.png"
    result = run_cli_process(
        "--store", store, "demo", "--plot", plot, "--points", POINTS, cwd=workdir
    )
    out = assert_ok(result)
    raw = re.search(rf"^raw run:\s+({UID.pattern})$", out, re.MULTILINE)
    child = re.search(rf"^child run:\s+({UID.pattern})", out, re.MULTILINE)
    assert raw and child, out
    return {
        "store": store,
        "plot": plot,
        "raw_uid": raw.group(1),
        "child_uid": child.group(1),
        "result": result,
    }


@pytest.fixture(scope="module")
def code_version() -> str:
    """The version the demo's reducer is recorded with: that of the installed distribution."""
    return metadata.version("bluesky-analysis-store")


# --- help -------------------------------------------------------------------------------------


def test_help_lists_every_subcommand(workdir: Path) -> None:
    out = assert_ok(run_cli_process("--help", cwd=workdir))
    for name in SUBCOMMANDS:
        assert name in out
    for option in ("--store", "--api-key", "--verbose", "--version", STORE_ENV, "TILED_API_KEY"):
        assert option in out
    version = assert_ok(run_cli_process("--version", cwd=workdir))
    assert version.strip() == f"{PROG} {metadata.version('bluesky-analysis-store')}"


@pytest.mark.parametrize("subcommand", sorted(SUBCOMMANDS))
def test_subcommand_help(workdir: Path, subcommand: str) -> None:
    out = assert_ok(run_cli(subcommand, "--help", cwd=workdir))
    assert out.startswith(f"usage: {PROG} {subcommand}")
    for option in SUBCOMMANDS[subcommand]:
        assert option in out, option
    example = re.search(rf"^examples?:\n\s+{PROG} {subcommand}\b", out, re.MULTILINE)
    assert example, out


def test_script_is_installed() -> None:
    script = Path(sys.executable).parent / PROG
    assert script.is_file()
    result = subprocess.run([script, "--help"], capture_output=True, text=True, check=False)
    assert_ok(result)
    assert result.stdout.startswith(f"usage: {PROG}")


# --- demo, ls, show ------------------------------------------------------------------------------


def test_demo(demo: dict[str, Any], code_version: str) -> None:
    out = demo["result"].stdout
    assert f"code:      {REDUCER} version {code_version}" in out
    assert f"{POINTS} events reduced, 0 failed" in out
    assert (demo["store"] / "catalog.db").is_file()
    assert png_size(demo["plot"]) == (640, 480)
    assert demo["result"].stderr == ""  # tiled's start-up log and warnings stay out


def test_reproduce_demo_child(demo: dict[str, Any], workdir: Path) -> None:
    # Right after the demo: the reducer's record holds the checkout's git commit, and a
    # commit made in between would (rightly) count as changed code.
    result = run_cli("--store", demo["store"], "reproduce", demo["child_uid"][:8], cwd=workdir)
    out = assert_ok(result)
    assert f"child run {demo['child_uid']} reproduced: {POINTS} events identical" in out


def test_ls_lists_both_runs_newest_first(
    demo: dict[str, Any], workdir: Path, code_version: str
) -> None:
    # The store named by the environment variable.
    out = assert_ok(run_cli("ls", cwd=workdir, env={STORE_ENV: str(demo["store"])}))
    lines = out.splitlines()
    (raw_line,) = [line for line in lines if line.startswith(demo["raw_uid"])]
    (child_line,) = [line for line in lines if line.startswith(demo["child_uid"])]
    assert lines.index(child_line) < lines.index(raw_line)  # the child was started later
    assert " raw " in raw_line and "scan" in raw_line
    assert " derived " in child_line
    assert f"{REDUCER} {code_version}" in child_line
    assert demo["raw_uid"][:8] in child_line  # its parent


def test_ls_json_with_store_after_subcommand(
    demo: dict[str, Any], workdir: Path, code_version: str
) -> None:
    result = run_cli("ls", "--json", "--store", demo["store"], cwd=workdir)
    runs = {run["uid"]: run for run in json.loads(assert_ok(result))}  # stdout is only JSON
    raw, child = runs[demo["raw_uid"]], runs[demo["child_uid"]]
    assert raw["kind"] == "raw" and raw["plan_name"] == "scan" and raw["code"] == []
    assert child["kind"] == "derived"
    assert child["parent_uids"] == [demo["raw_uid"]]
    assert [(c["name"], c["version"]) for c in child["code"]] == [(REDUCER, code_version)]
    assert child["num_events"] == {"primary": POINTS}
    times = [run["time"] for run in runs.values()]
    assert times == sorted(times, reverse=True)


def test_ls_limit(demo: dict[str, Any], workdir: Path) -> None:
    result = run_cli("--store", demo["store"], "ls", "--limit", "1", "--json", cwd=workdir)
    assert len(json.loads(assert_ok(result))) == 1


def test_ls_children(demo: dict[str, Any], workdir: Path, code_version: str) -> None:
    result = run_cli("--store", demo["store"], "ls", "--children", demo["raw_uid"][:8], cwd=workdir)
    lines = assert_ok(result).splitlines()
    (child_line,) = [line for line in lines if line.startswith(demo["child_uid"])]
    assert f"{REDUCER} {code_version}" in child_line
    assert not any(line.startswith(demo["raw_uid"]) for line in lines)
    assert all(" derived " in line for line in lines)


def test_show_text(demo: dict[str, Any], workdir: Path, code_version: str) -> None:
    result = run_cli("--store", demo["store"], "show", demo["child_uid"][:8], cwd=workdir)
    out = assert_ok(result)
    assert out.startswith(f"run {demo['child_uid']} (derived)")
    for section in ("start metadata:", "provenance:", "  environment:", "streams:"):
        assert f"\n{section}\n" in out, section
    assert "purpose: demo" in out
    assert f"    {REDUCER}\n      version {code_version}" in out
    assert f"    {demo['raw_uid']}" in out  # the parent
    assert f"  primary ({POINTS} events)" in out
    assert re.search(rf"normalised\s+shape \({POINTS}, 64, 64\)\s+dtype float32", out)
    assert re.search(rf"centroid_x\s+shape \({POINTS},\)\s+dtype float64", out)


def test_show_json(demo: dict[str, Any], workdir: Path, code_version: str) -> None:
    result = run_cli("--store", demo["store"], "show", demo["child_uid"], "--json", cwd=workdir)
    record = json.loads(assert_ok(result))
    assert record["uid"] == demo["child_uid"] and record["kind"] == "derived"
    assert record["start"]["purpose"] == "demo"
    provenance = record["provenance"]
    assert provenance == record["start"]["provenance"]
    assert provenance["parents"][0]["uid"] == demo["raw_uid"]
    (code,) = provenance["code"]
    assert code["name"] == REDUCER and code["version"] == code_version
    assert re.fullmatch(r"[0-9a-f]{64}", code["sha256"])
    assert "numpy" in provenance["environment"]["packages"]
    keys = record["streams"]["primary"]["keys"]
    assert keys["normalised"] == {"shape": [POINTS, *FRAME_SHAPE], "dtype": "float32"}
    assert keys["centroid_x"] == {"shape": [POINTS], "dtype": "float64"}
    assert "seq_num" not in keys and "ts_total" not in keys
    assert record["streams"]["primary"]["events"] == POINTS
    assert record["stop"]["exit_status"] == "success"


def test_show_raw_run(demo: dict[str, Any], workdir: Path) -> None:
    result = run_cli("--store", demo["store"], "show", demo["raw_uid"], "--json", cwd=workdir)
    record = json.loads(assert_ok(result))
    assert record["kind"] == "raw" and record["provenance"] is None
    assert record["streams"]["primary"]["keys"]["cam"]["shape"] == [POINTS, *FRAME_SHAPE]


# --- plot ----------------------------------------------------------------------------------------


def test_plot_scalar_default_size(demo: dict[str, Any], workdir: Path) -> None:
    output = workdir / "centroid.png"
    result = run_cli(
        "--store",
        demo["store"],
        "plot",
        demo["child_uid"][:8],
        "centroid_x",
        "-o",
        output,
        cwd=workdir,
    )
    assert assert_ok(result).strip() == str(output)
    assert png_size(output) == (640, 480)  # 6.4 x 4.8 inches at 100 dpi


def test_plot_frame_with_size_and_dpi(demo: dict[str, Any], workdir: Path) -> None:
    output = workdir / "frame.png"
    result = run_cli(
        "--store",
        demo["store"],
        "plot",
        demo["child_uid"],
        "normalised",
        "--index",
        "2",
        "--size",
        "5x4",
        "--dpi",
        "80",
        "--output",
        output,
        cwd=workdir,
    )
    assert_ok(result)
    assert png_size(output) == (400, 320)


def test_plot_against_another_key(demo: dict[str, Any], workdir: Path) -> None:
    output = workdir / "motor.png"
    result = run_cli(
        "--store",
        demo["store"],
        "plot",
        demo["raw_uid"],
        "motor_setpoint",
        "--x",
        "motor",
        "-o",
        output,
        cwd=workdir,
    )
    assert_ok(result)
    assert png_size(output) == (640, 480)


# --- reprocess, reproduce, ingest ----------------------------------------------------------------


def test_reprocess_skips_a_run_the_same_code_reduced(demo: dict[str, Any], workdir: Path) -> None:
    # The demo's live reduction used the same reducer: reprocessing it again is not needed.
    result = run_cli(
        "--store",
        demo["store"],
        "reprocess",
        demo["raw_uid"][:8],
        "--reducer",
        REDUCER,
        cwd=workdir,
    )
    out = assert_ok(result)
    assert out.startswith("0 saved, 1 already reduced, 0 failed")
    assert f"already reduced {demo['raw_uid']}: child run {demo['child_uid']}" in out


def test_reprocess_into_another_store(demo: dict[str, Any], workdir: Path) -> None:
    store = workdir / "reprocessed"  # made by the first reprocess
    command = [
        "--store",
        store,
        "reprocess",
        demo["raw_uid"],
        "--source",
        demo["store"],
        "--reducer",
        REDUCER,
        "--md",
        "operator=jane",
        "--md",
        "attempt=1",
    ]
    first = assert_ok(run_cli(*command, cwd=workdir))
    assert first.startswith("1 saved, 0 already reduced, 0 failed")
    (new_child,) = re.findall(rf"saved {demo['raw_uid']}: child run ({UID.pattern})", first)

    again = assert_ok(run_cli(*command, cwd=workdir))
    assert again.startswith("0 saved, 1 already reduced, 0 failed")
    assert f"already reduced {demo['raw_uid']}: child run {new_child}" in again

    forced = assert_ok(run_cli(*command, "--force", "--writer", "normalised=TIFF", cwd=workdir))
    assert forced.startswith("1 saved, 0 already reduced, 0 failed")
    (another,) = re.findall(rf"saved {demo['raw_uid']}: child run ({UID.pattern})", forced)
    assert another != new_child

    listing = run_cli(
        "--store", store, "ls", "--children", demo["raw_uid"][:8], "--json", cwd=workdir
    )
    children = json.loads(assert_ok(listing))
    assert [c["uid"] for c in children] == [another, new_child]  # newest first
    shown = run_cli("--store", store, "show", another, "--json", cwd=workdir)
    start = json.loads(assert_ok(shown))["start"]
    assert start["operator"] == "jane" and start["attempt"] == 1  # JSON values are parsed


def test_ingest_then_show(demo: dict[str, Any], workdir: Path) -> None:
    frame = np.arange(12, dtype=np.uint16).reshape(3, 4)
    path = workdir / "frame.npy"
    np.save(path, frame)
    result = run_cli(
        "--store",
        demo["store"],
        "ingest",
        path,
        "--md",
        "sample=LaB6",
        "--writer",
        "NPY",
        cwd=workdir,
    )
    uid = assert_ok(result).strip()
    assert UID.fullmatch(uid), uid

    shown = run_cli("--store", demo["store"], "show", uid, "--json", cwd=workdir)
    record = json.loads(assert_ok(shown))
    assert record["start"]["sample"] == "LaB6"
    (file_record,) = record["provenance"]["files"]
    assert file_record["path"] == str(path)
    assert re.fullmatch(r"[0-9a-f]{64}", file_record["sha256"])
    image = record["streams"]["primary"]["keys"]["image"]
    assert image == {"shape": [1, 3, 4], "dtype": "uint16"}

    # The input file changes after it was ingested: the run no longer follows from it.
    np.save(path, frame + 1)
    checked = run_cli(
        "--store", demo["store"], "reproduce", uid[:8], "--allow-changed-code", cwd=workdir
    )
    assert checked.returncode == 1, checked.stderr
    assert "Traceback" not in checked.stderr
    assert checked.stdout.startswith(f"child run {uid} NOT reproduced")
    assert f"input file changed: {path}: sha256 {file_record['sha256'][:12]}" in checked.stdout


# --- errors: one line on stderr, exit status 2, no traceback --------------------------------------


def test_error_unknown_uid(demo: dict[str, Any], workdir: Path) -> None:
    result = run_cli("--store", demo["store"], "show", "0123abcd-no-such-run", cwd=workdir)
    assert_user_error(result, "no run '0123abcd-no-such-run'")


def test_error_uid_prefix_too_short(demo: dict[str, Any], workdir: Path) -> None:
    result = run_cli("--store", demo["store"], "show", demo["child_uid"][:5], cwd=workdir)
    assert_user_error(result, "at least 8 characters")


def test_error_ingest_bad_path(demo: dict[str, Any], workdir: Path) -> None:
    result = run_cli("--store", demo["store"], "ingest", workdir / "missing.npy", cwd=workdir)
    assert_user_error(result, "missing.npy", "no such file")


def test_error_ingest_unknown_format(demo: dict[str, Any], workdir: Path) -> None:
    path = workdir / "for-unknown-format.npy"
    np.save(path, np.zeros((2, 2)))
    result = run_cli("--store", demo["store"], "ingest", path, "--writer", "JPEG", cwd=workdir)
    assert_user_error(result, "JPEG")


def test_error_plot_unknown_key(demo: dict[str, Any], workdir: Path) -> None:
    output = workdir / "never.png"
    result = run_cli(
        "--store",
        demo["store"],
        "plot",
        demo["child_uid"],
        "no_such_key",
        "-o",
        output,
        cwd=workdir,
    )
    assert_user_error(result, "no_such_key", "centroid_x")
    assert not output.exists()


def test_error_reducer_that_does_not_import(demo: dict[str, Any], workdir: Path) -> None:
    result = run_cli(
        "--store",
        demo["store"],
        "reprocess",
        demo["raw_uid"],
        "--reducer",
        "no_such_module_here:reduce",
        cwd=workdir,
    )
    assert_user_error(result, "no_such_module_here")


def test_error_reproduce_a_raw_run(demo: dict[str, Any], workdir: Path) -> None:
    result = run_cli("--store", demo["store"], "reproduce", demo["raw_uid"], cwd=workdir)
    assert_user_error(result, "no provenance")


def test_error_ls_store_folder_missing(workdir: Path) -> None:
    missing = workdir / "no-store-here"
    result = run_cli("--store", missing, "ls", cwd=workdir)
    assert_user_error(result, str(missing), "does not exist")
    assert not missing.exists()  # ls never creates a store


def test_error_show_folder_without_catalog(workdir: Path) -> None:
    folder = workdir / "not-a-store"
    folder.mkdir()
    result = run_cli("show", "0123abcd", cwd=workdir, env={STORE_ENV: str(folder)})
    assert_user_error(result, "no catalog.db")
    assert list(folder.iterdir()) == []


def test_error_usage_is_one_line_too(workdir: Path) -> None:
    assert_user_error(run_cli("plot", "0123abcd", "key", cwd=workdir), "--output")
    assert_user_error(run_cli("ls", "--limit", "many", cwd=workdir), "--limit")
    assert_user_error(run_cli(cwd=workdir), "COMMAND")


# --- failures that look like failures ---------------------------------------------------------


def no_spot_found(data: Any) -> dict[str, Any]:
    """A reducer that fails on every frame (imported by name by ``reprocess --reducer``)."""
    raise ValueError("no spot found in this frame")


FAILING_REDUCER = f"{__name__}:no_spot_found"


@pytest.fixture(scope="module")
def all_failed(demo: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The demo's raw run reprocessed with a reducer that fails on every event."""
    result = run_cli(
        "--store", demo["store"], "reprocess", demo["raw_uid"], "--reducer", FAILING_REDUCER,
        cwd=workdir,
    )
    child = re.search(rf"FAILED {demo['raw_uid']}: .* child run ({UID.pattern}) records why",
                      result.stdout)
    assert child, result.stdout + result.stderr
    return {"result": result, "child_uid": child.group(1)}


def test_an_all_failed_reprocess_exits_1_with_one_summary_of_its_failures(
    demo: dict[str, Any], all_failed: dict[str, Any]
) -> None:
    result = all_failed["result"]
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "0 saved, 0 already reduced, 1 failed"
    assert lines[1] == (
        f"  FAILED {demo['raw_uid']}: every event failed ({POINTS} of {POINTS}); "
        f"child run {all_failed['child_uid']} records why"
    )
    assert lines[2] == (
        f"    failed at stream primary, seq_num 1-{POINTS} ({POINTS} events) while "
        "no_spot_found.event: ValueError: no spot found in this frame"
    )
    assert "saved" not in "\n".join(lines[1:])
    assert "Traceback" not in result.stderr and "no spot found" not in result.stderr


def test_show_and_ls_mark_an_all_failed_child_as_failed(
    demo: dict[str, Any], all_failed: dict[str, Any], workdir: Path
) -> None:
    child_uid = all_failed["child_uid"]
    out = assert_ok(run_cli("--store", demo["store"], "show", child_uid[:8], cwd=workdir))
    (status_line,) = [line for line in out.splitlines() if line.startswith("  exit status:")]
    assert status_line.startswith(f"  exit status: FAILED: {POINTS} of {POINTS} events failed")
    assert f"  reduction: 0 events reduced, {POINTS} failed\n" in out
    assert f"seq_num 1-{POINTS} ({POINTS} events) while no_spot_found.event: ValueError" in out

    record = json.loads(
        assert_ok(run_cli("--store", demo["store"], "show", child_uid, "--json", cwd=workdir))
    )
    assert record["failed"] is True and record["status"].startswith("FAILED")
    assert record["stop"]["reduction"]["events_failed"] == POINTS

    listing = assert_ok(
        run_cli("--store", demo["store"], "ls", "--children", demo["raw_uid"], cwd=workdir)
    )
    lines = {line.split()[0]: line for line in listing.splitlines()}
    assert lines[child_uid].endswith(f"[FAILED: {POINTS} of {POINTS} events failed]")
    assert "[" not in lines[demo["child_uid"]]  # the demo's own child succeeded
    summaries = json.loads(
        assert_ok(run_cli("--store", demo["store"], "ls", "--json", "--limit", "0", cwd=workdir))
    )
    failed = {s["uid"]: s["failed"] for s in summaries}
    assert failed[child_uid] is True and failed[demo["child_uid"]] is False


def test_reproduce_of_an_all_failed_child_exits_1(
    demo: dict[str, Any], all_failed: dict[str, Any], workdir: Path
) -> None:
    result = run_cli("--store", demo["store"], "reproduce", all_failed["child_uid"], cwd=workdir)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith(
        f"child run {all_failed['child_uid']} NOT reproduced: nothing was compared"
    )
    assert f"the saved child holds 0 events; {POINTS} failed when it was made" in result.stdout
    assert f"the re-run failed on {POINTS} events" in result.stdout
    assert "Traceback" not in result.stderr


def test_reprocess_of_a_stream_the_run_does_not_have_fails(
    demo: dict[str, Any], workdir: Path
) -> None:
    result = run_cli(
        "--store", demo["store"], "reprocess", demo["raw_uid"], "--reducer", REDUCER,
        "--stream", "no_such_stream", "--force", cwd=workdir,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "has no stream 'no_such_stream'" in result.stdout
    assert "choose them with --stream NAME" in result.stdout and "streams=" not in result.stdout


def test_ingest_expands_home_and_variables(demo: dict[str, Any], workdir: Path) -> None:
    home = workdir / "home"
    home.mkdir()
    np.save(home / "dark.npy", np.zeros((2, 2), dtype=np.uint16))
    environment = {"HOME": str(home), "BEAMTIME": str(home)}
    for typed in ("~/dark.npy", "$BEAMTIME/dark.npy"):
        result = run_cli("--store", demo["store"], "ingest", typed, cwd=workdir, env=environment)
        uid = assert_ok(result).strip()
        shown = run_cli("--store", demo["store"], "show", uid, "--json", cwd=workdir)
        (file_record,) = json.loads(assert_ok(shown))["provenance"]["files"]
        assert file_record["path"] == str(home / "dark.npy")


# --- errors name what to type: the option or argument, never the Python parameter -----------

PYTHON_CODE = re.compile(r"\b[a-z_]+=(True|False|\[|\(|None)|\breprocess\(|\bPass\b")


@pytest.mark.parametrize(
    ("command", "fragments"),
    [
        (["show", "0123abcd-no-such-run"], ["UID: no run '0123abcd-no-such-run'"]),
        (["ls", "--children", "0123abcdef"], ["--children: no run '0123abcdef'"]),
        (["reprocess", "{raw}", "--reducer", "no_such_module_here:f"], ["--reducer: "]),
        (["reprocess", "{raw}", "--reducer", "no_colon_here"], ["--reducer: ", "module:"]),
        (["reprocess", "0123abcd", "--reducer", REDUCER], ["RAW_UID: no run '0123abcd'"]),
        (["reprocess", "{raw}", "--reducer", REDUCER, "--writer", "normalised=JPEG"],
         ["--writer: ", "JPEG", "HDF5"]),
        (["reprocess", "{raw}", "--reducer", REDUCER, "--md", "uid=3", "--force"],
         ["--md: ", "uid"]),
        (["reprocess", "{raw}", "--reducer", REDUCER, "--source", "{missing}"],
         ["--source: no analysis store at {missing}"]),
        (["reproduce", "{raw}"], ["CHILD_UID: ", "no provenance", "not a derived run"]),
        (["reproduce", "0123abcd"], ["CHILD_UID: no run '0123abcd'"]),
        (["reproduce", "{child}", "--rtol", "-1"], ["--rtol must be a finite number >= 0"]),
        (["reproduce", "{child}", "--atol", "nan"], ["--atol must be a finite number >= 0"]),
        (["ingest", "{missing}/frame.npy"], ["PATH: cannot ingest", "no such file"]),
        (["ingest", "{plot}"], ["PATH: ", "unsupported file type '.png'"]),
        (["ingest", "{plot}", "--writer", "JPEG"], ["--writer: ", "JPEG"]),
        (["ingest", "{plot}", "--stream", "a/b"], ["--stream: ", "'a/b'"]),
    ],
)
def test_error_names_the_option_to_fix(
    demo: dict[str, Any], workdir: Path, command: list[str], fragments: list[str]
) -> None:
    values = {
        "raw": demo["raw_uid"],
        "child": demo["child_uid"],
        "missing": str(workdir / "no-such-folder"),
        "plot": str(demo["plot"]),
    }
    args = [part.format(**values) for part in command]
    line = assert_user_error(
        run_cli("--store", demo["store"], *args, cwd=workdir),
        *[fragment.format(**values) for fragment in fragments],
    )
    assert not PYTHON_CODE.search(line), line


def test_library_advice_is_put_in_command_line_words() -> None:
    from bluesky_analysis_store._errors import ProvenanceError
    from bluesky_analysis_store.cli._exits import error_text

    refused = ProvenanceError(
        "refusing to save a run without provenance; missing x. Pass strict=False to save it "
        "anyway (the gaps are recorded)."
    )
    assert error_text(refused) == (
        "refusing to save a run without provenance; missing x. The command line saves only "
        "runs whose provenance is complete."
    )
    untrusted = ProvenanceError(
        "f cannot be imported here; read it, then pass trust_recorded_code=True "
        "(--trust-recorded-code) to run that definition alone"
    )
    assert error_text(untrusted).endswith("then give --trust-recorded-code to run that "
                                          "definition alone")
    assert not PYTHON_CODE.search(error_text(refused) + error_text(untrusted))


# --- a user's session: no deprecation notices, no version banner -----------------------------

_OPEN_QUIETLY = """
import sys
from bluesky_analysis_store import AnalysisStore
AnalysisStore.open(sys.argv[1])
"""

_BUILD_APP = """
import sys
from tiled.catalog import from_uri
from tiled.client import Context, from_context
from tiled.server.app import build_app
from bluesky_analysis_store._quiet import quiet_tiled

folder = sys.argv[1]
def serve():
    adapter = from_uri(f"sqlite:///{folder}/catalog.db",  # an empty catalog, copied
                       writable_storage=[f"{folder}/data"])
    return from_context(Context.from_app(build_app(adapter)))
if sys.argv[2] == "quiet":
    with quiet_tiled():
        client = serve()
else:
    client = serve()
client.write_array([1, 2, 3], key="x")  # it works, quietly or not
print(list(client))
"""


def _python(code: str, *args: str | os.PathLike[str], env: dict[str, str] | None = None) -> Any:
    environment = {**os.environ, **(env or {})}
    environment.pop("PYTHONWARNINGS", None)  # as a user's session: the default filters
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True, text=True, check=False, env=environment,
    )


@pytest.mark.slow
def test_quiet_tiled_hides_the_banner_and_the_httpx_notice_only(tmp_path: Path) -> None:
    from bluesky_analysis_store._catalog_template import copy_empty_catalog

    for name in ("loud", "quiet"):  # tiled's init subprocess would take seconds
        (tmp_path / name / "data").mkdir(parents=True)
        assert copy_empty_catalog(tmp_path / name / "catalog.db")
    loud = _python(_BUILD_APP, tmp_path / "loud", "loud")
    quiet = _python(_BUILD_APP, tmp_path / "quiet", "quiet")
    assert loud.returncode == 0 and quiet.returncode == 0, loud.stderr + quiet.stderr
    # Without it, both reach the user (so this test can tell); with it, neither does.
    assert "Tiled version" in loud.stderr and "starlette.testclient" in loud.stderr
    assert (quiet.stdout, quiet.stderr) == ("['x']\n", "")


@pytest.mark.slow
def test_opening_a_store_prints_nothing(tmp_path: Path) -> None:
    from bluesky_analysis_store._local_server import IDLE_ENV

    # Served by a local server process (a user's default): the client imports no server
    # code. The server it starts exits once idle for a few seconds.
    environment = {SERVED_ENV: "1", IDLE_ENV: "5"}
    result = _python(_OPEN_QUIETLY, tmp_path / "served", env=environment)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.slow
def test_opening_a_store_served_in_process_prints_nothing(tmp_path: Path) -> None:

    result = _python(_OPEN_QUIETLY, tmp_path / "in-process", env={SERVED_ENV: "0"})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_failures_are_summarised_by_reducer_error_and_events() -> None:
    from bluesky_analysis_store.cli._presenting import SHOWN_FAILURES, failure_lines

    same = [
        {"stream": "primary", "seq_num": n, "stage": "spot.event", "error": "KeyError: 'cam'"}
        for n in (1, 2, 3, 5)
    ]
    each_its_own = [
        {"stream": "primary", "seq_num": n, "stage": "fit.event", "error": f"fit {n} diverged"}
        for n in range(10, 10 + SHOWN_FAILURES)
    ]
    at_stop = [{"stream": "summary", "stage": "fit.stop", "error": "RuntimeError: no data"}]
    reduction = {
        "events_reduced": 1,
        "events_failed": 4 + SHOWN_FAILURES + 100,  # more than the stop records one by one
        "failures": same + each_its_own + at_stop,
    }

    lines = failure_lines(reduction)

    assert lines[0] == (
        "failed at stream primary, seq_num 1-3, 5 (4 events) while spot.event: KeyError: 'cam'"
    )
    assert lines[1] == "failed at stream primary, seq_num 10 while fit.event: fit 10 diverged"
    assert len(lines) == SHOWN_FAILURES + 2
    assert lines[-2] == "... 2 more kinds of failure recorded"  # fit 19, and the stop's
    assert lines[-1] == "... 100 more failed events, not recorded one by one"
    assert failure_lines({"events_reduced": 3, "events_failed": 0, "failures": []}) == []
