"""Everyday figures: how long a user waits for the command line, a store, a first scan,
a read and a reproduce.

Every figure is measured side by side in one run, and printed with its ratio:

- ``ls``, ``show`` and ``plot`` (a derived key against the parent's motor) of the command
  line, each a fresh process, on an embedded store of 100 runs: with the store's local
  server running (how a user meets them after the first call), against the same command
  with the catalog served inside the command's process (``BLUESKY_ANALYSIS_STORE_SERVED=0``,
  how every call ran before the server); and the first call, which starts the server.
- opening the store from Python in a fresh process (imports included), both ways;
- a 21-point scan of a simulated camera started right after the callback is made (its
  worker forked from the fork server, and, as when no fork server is up yet, started from
  scratch), and one started ``--settle`` seconds after (a scan typed at the prompt), each
  against the same scan ``--warm-wait`` seconds later, each pair in a fresh process;
- reading a derived HDF5 array (``--read-mib`` MiB) with ``store.read``, with
  ``array.read()`` of the store client's array, and with its lookup from the run done again
  each time, against h5py reading the file, alternately;
- ``reproduce`` of a child against the ``reprocess`` that made it.

``python benchmarks/bench_interactive.py [--repeats 5] [--scan-trials 3] [--json FILE]
[--write-readme]``. Medians are printed; the machine is named at the end. ``--write-readme``
puts the printed figures into benchmarks/README.md, between its ``bench_interactive``
markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

PYTHON = sys.executable
CLI = str(Path(sys.executable).with_name("bluesky-analysis-store"))
SERVED_ENV = "BLUESKY_ANALYSIS_STORE_SERVED"


def _env(served: bool) -> dict[str, str]:
    env = dict(os.environ)
    env[SERVED_ENV] = "1" if served else "0"
    return env


def _wall(command: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _make_store(folder: Path) -> tuple[str, str]:
    """A raw run and 99 children of it (5 events, a scalar and a profile each)."""
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from bluesky_analysis_store import AnalysisStore
        from bluesky_analysis_store.example_reducers import normalise_and_sum

        store = AnalysisStore.open(sys.argv[1])
        raw = store.save(
            [{"primary": {"motor": float(i), "det": float(i * i)}} for i in range(5)],
            {"sample": "LaB6", "plan_name": "scan", "scan_id": 7},
            strict=False,
        )
        for n in range(99):
            child = store.save(
                [
                    {"primary": {"total": float(j * n), "profile": np.arange(16.0) * j,
                                 "parent_seq_num": j + 1}}
                    for j in range(5)
                ],
                {"sample": "LaB6"},
                parents=[raw],
                code=[normalise_and_sum],
            )
        print(raw, child)
        """
    )
    result = subprocess.run(
        [PYTHON, "-c", script, str(folder)],
        env=_env(False),
        check=True,
        capture_output=True,
        text=True,
    )
    raw, child = result.stdout.split()
    return raw, child


def bench_commands(folder: Path, child: str, repeats: int, out: Path) -> dict[str, Any]:
    from bluesky_analysis_store._local_server import stop_server

    commands = {
        "ls": [CLI, "--store", str(folder), "ls"],
        "show": [CLI, "--store", str(folder), "show", child[:8]],
        "plot": [
            CLI, "--store", str(folder), "plot", child[:8], "total", "--x", "motor",
            "-o", str(out / "plot.png"),
        ],
    }  # fmt: skip
    stop_server(folder)
    first_call = _wall(commands["ls"], _env(True))  # starts the server
    figures: dict[str, Any] = {"first call (starts the server)": first_call}
    for name, command in commands.items():
        served, in_process = [], []
        for _ in range(repeats):
            served.append(_wall(command, _env(True)))
            in_process.append(_wall(command, _env(False)))
        figures[name] = {"served": _median(served), "in process": _median(in_process)}
    return figures


def bench_open(folder: Path, repeats: int) -> dict[str, float]:
    script = (
        "import time; began = time.perf_counter()\n"
        "import sys\n"
        "from bluesky_analysis_store import AnalysisStore\n"
        "store = AnalysisStore.open(sys.argv[1]); len(store)\n"
        "print(time.perf_counter() - began)\n"
    )
    figures: dict[str, list[float]] = {"served": [], "in process": []}
    for _ in range(repeats):
        for name, served in (("served", True), ("in process", False)):
            result = subprocess.run(
                [PYTHON, "-c", script, str(folder)],
                env=_env(served),
                check=True,
                capture_output=True,
                text=True,
            )
            figures[name].append(float(result.stdout.split()[-1]))
    return {name: _median(values) for name, values in figures.items()}


_SCAN_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from bluesky import RunEngine
    from bluesky.plans import scan
    from ophyd.sim import SynAxis
    from bluesky_analysis_store import AnalysisStore, AnalysisStoreCallback
    from bluesky_analysis_store.example_reducers import normalise_and_sum
    from bluesky_analysis_store.sim import spot_camera

    folder, raw, wait, settle = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    motor = SynAxis(name="motor")
    cam = spot_camera(motor, raw)
    RE = RunEngine({})
    store = AnalysisStore.open(folder, readable=[raw])
    RE.subscribe(store)
    callback = AnalysisStoreCallback([normalise_and_sum], store)
    callback.subscribe(RE)
    time.sleep(settle)
    began = time.perf_counter()
    RE(scan([cam], motor, -3, 3, 21))
    first = time.perf_counter() - began
    time.sleep(wait)
    began = time.perf_counter()
    RE(scan([cam], motor, -3, 3, 21))
    warm = time.perf_counter() - began
    callback.close()
    print(first, warm)
    """
)


def bench_first_scan(
    folder: Path,
    raw: Path,
    trials: int,
    wait: float,
    settle: float = 0.0,
    *,
    fork_server: bool = True,
) -> dict[str, Any]:
    """``fork_server``: the worker is forked from the fork server (started, if need be,
    before the trials), else started from scratch, as when none is up yet."""
    env = _env(True)
    if fork_server:
        from bluesky_analysis_store._forkserver import start_fork_server

        start_fork_server()
    else:
        env["BLUESKY_ANALYSIS_STORE_FORKSERVER"] = "0"
    firsts, warms = [], []
    for _ in range(trials):
        result = subprocess.run(
            [PYTHON, "-c", _SCAN_SCRIPT, str(folder), str(raw), str(wait), str(settle)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        first, warm = (float(value) for value in result.stdout.split()[-2:])
        firsts.append(first)
        warms.append(warm)
    ratios = [first / warm for first, warm in zip(firsts, warms, strict=True)]
    return {
        "settle": settle,
        "first scan": _median(firsts),
        "warm scan": _median(warms),
        "ratio": _median(ratios),
        "ratios": ratios,
    }


def bench_read(folder: Path, mib: int, repeats: int) -> dict[str, Any]:
    import h5py
    import numpy as np

    from bluesky_analysis_store import AnalysisStore

    store = AnalysisStore.open(folder)
    frames = max(1, mib // 8)  # 1024 x 1024 float64: 8 MiB a frame
    rng = np.random.default_rng(0)
    uid = store.save(
        [{"primary": {"image": rng.random((1024, 1024))}} for _ in range(frames)],
        {"purpose": "read speed"},
        {"image": "HDF5"},
        strict=False,
    )
    path = f"{uid}/primary/image"
    (source,) = store.catalog[path].include_data_sources().data_sources()
    file_path = source.assets[0].data_uri.removeprefix("file://localhost")
    dataset = source.parameters["dataset"]

    def direct() -> Any:
        with h5py.File(file_path, "r", swmr=True, locking=False) as file:
            return file[dataset][()]

    names = ("h5py", "store.read", "array.read()", "lookup and array.read()")
    timings: dict[str, list[float]] = {name: [] for name in names}
    reference = direct()
    array = store[uid]["primary"]["image"]
    for _ in range(repeats):
        for name, read in (
            ("h5py", direct),
            ("store.read", lambda: store.read(path)),
            ("array.read()", array.read),
            ("lookup and array.read()", lambda: store[uid]["primary"]["image"].read()),
        ):
            began = time.perf_counter()
            values = read()
            timings[name].append(time.perf_counter() - began)
            assert np.array_equal(values, reference), name
            del values
    size = reference.nbytes / 2**20
    return {
        "MiB": size,
        **{f"{name} MiB/s": size / _median(values) for name, values in timings.items()},
        **{
            f"{name} / h5py": _median(timings[name]) / _median(timings["h5py"])
            for name in names[1:]
        },
    }


def bench_reproduce(folder: Path, repeats: int) -> dict[str, float]:
    here = Path(__file__).parent
    result = subprocess.run(
        [PYTHON, str(here / "bench_reproduce.py"), "--repeats", str(repeats), "--events", "40"],
        check=True,
        capture_output=True,
        text=True,
    )
    figures = {}
    for line in result.stdout.splitlines():
        words = line.split()
        if len(words) > 1 and words[0] in ("reprocess", "reproduce") and words[1] != "/":
            figures[words[0]] = float(words[1])
    figures["reproduce / reprocess"] = figures["reproduce"] / figures["reprocess"]
    return figures


def _machine() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scan-trials", type=int, default=3)
    parser.add_argument("--warm-wait", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--read-mib", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args(argv)
    from bluesky_analysis_store._local_server import stop_server

    work = Path(tempfile.mkdtemp(prefix="bench-interactive-"))
    # A cache of the run's own: its fork server is started (and stopped) here.
    os.environ["BLUESKY_ANALYSIS_STORE_CACHE"] = str(work / "cache")
    results: dict[str, Any] = {"machine": _machine()}
    try:
        store = work / "store"
        raw, child = _make_store(store)
        results["commands"] = bench_commands(store, child, args.repeats, work)
        results["open"] = bench_open(store, args.repeats)
        scan_store, scan_raw = work / "scans", work / "raw"
        scan_raw.mkdir()
        results["scan"] = bench_first_scan(scan_store, scan_raw, args.scan_trials, args.warm_wait)
        results["scan, no fork server"] = bench_first_scan(
            scan_store, scan_raw, args.scan_trials, args.warm_wait, fork_server=False
        )
        results["scan after settling"] = bench_first_scan(
            scan_store, scan_raw, args.scan_trials, args.warm_wait, args.settle
        )
        results["read"] = bench_read(work / "reads", args.read_mib, args.repeats)
        results["reproduce"] = bench_reproduce(work, max(1, args.repeats // 2))
    finally:
        for folder in ("store", "scans", "reads"):
            stop_server(work / folder)
        from bluesky_analysis_store._forkserver import socket_path, stop_fork_server

        stop_fork_server(socket_path())
        shutil.rmtree(work, ignore_errors=True)
    report = _report(results)
    print(report)
    if args.write_readme:
        _write_readme(report)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


_README = Path(__file__).with_name("README.md")
_BEGIN, _END = "<!-- bench_interactive: begin -->", "<!-- bench_interactive: end -->"


def _write_readme(report: str) -> None:
    text = _README.read_text()
    before, rest = text.split(_BEGIN, 1)
    _, after = rest.split(_END, 1)
    _README.write_text(f"{before}{_BEGIN}\n```\n{report}\n```\n{_END}{after}")


def _report(results: dict[str, Any]) -> str:
    lines: list[str] = []
    print = lines.append  # noqa: A001 - the report is built line by line
    commands = results["commands"]
    print("command line on a 100-run embedded store, wall seconds (median, fresh process):")
    first_call = commands["first call (starts the server)"]
    print(f"  first call, starting the store's server: {first_call:.2f}")
    print(f"  {'':6}{'served':>9}{'in process':>12}{'ratio':>8}")
    for name in ("ls", "show", "plot"):
        served, in_process = commands[name]["served"], commands[name]["in process"]
        print(f"  {name:6}{served:9.2f}{in_process:12.2f}{in_process / served:8.1f}x")
    opening = results["open"]
    print(
        f"opening the store from Python, imports included: {opening['served']:.2f} s served, "
        f"{opening['in process']:.2f} s in process ({opening['in process'] / opening['served']:.1f}x)"  # noqa: E501
    )
    for key, what in (
        ("scan", "(worker forked from the fork server)"),
        ("scan, no fork server", "(no fork server up: worker started from scratch)"),
    ):
        scan = results[key]
        print(
            f"21-point scan right after the callback is made {what}: "
            f"{scan['first scan']:.2f} s, warm: {scan['warm scan']:.2f} s, ratio "
            f"{scan['ratio']:.2f} (trials: {', '.join(f'{r:.2f}' for r in scan['ratios'])})"
        )
    settled = results["scan after settling"]
    print(
        f"the same, started {settled['settle']:.0f} s after the callback is made: "
        f"{settled['first scan']:.2f} s, warm: {settled['warm scan']:.2f} s, ratio "
        f"{settled['ratio']:.2f} (trials: {', '.join(f'{r:.2f}' for r in settled['ratios'])})"
    )
    read = results["read"]
    print(
        f"reading a {read['MiB']:.0f} MiB HDF5 array: h5py {read['h5py MiB/s']:.0f} MiB/s, "
        f"store.read {read['store.read MiB/s']:.0f} MiB/s ({read['store.read / h5py']:.2f}x "
        f"the time), array.read() {read['array.read() MiB/s']:.0f} MiB/s "
        f"({read['array.read() / h5py']:.2f}x); looking the array up from the store and "
        f"reading it: {read['lookup and array.read() MiB/s']:.0f} MiB/s "
        f"({read['lookup and array.read() / h5py']:.2f}x)"
    )
    reproduce = results["reproduce"]
    print(
        f"reproduce {reproduce['reproduce']:.2f} s against reprocess {reproduce['reprocess']:.2f} "
        f"s of the same 40-event run: {reproduce['reproduce / reprocess']:.2f}x"
    )
    print(f"machine: {results['machine']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
