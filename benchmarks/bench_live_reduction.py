"""Live reduction: speed and memory, measured side by side in one run, printed as ratios.

    .venv/bin/python benchmarks/bench_live_reduction.py            # everything (`make bench`)
    .venv/bin/python benchmarks/bench_live_reduction.py --quick    # a short smoke run
    .venv/bin/python benchmarks/bench_live_reduction.py --only A   # one scenario (A, B or C)

A. 1024x1024 uint16 frames reduced to a float32 frame and a sum. The project
   (``AnalysisStoreCallback`` in background mode, until the child run is readable) against
   a floor (the scan alone, then the reducer and ``tifffile.imwrite`` in a loop) and a
   peer (bluesky's ``LiveDispatcher`` feeding bluesky-tiled-plugins' ``TiledWriter``).
B. A 2,000-point ``count`` of ``ophyd.sim.det`` with a scalar reducer: the scan with the
   callback subscribed (its default, a worker process) against the scan alone, alternately,
   medians. For information, the same with ``background="thread"`` and with the store
   behind a ``tiled serve`` process (``--no-server`` skips it).
C. Resident memory (the RunEngine's process and the worker's, added) while 2,000 frames are
   reduced: it must not grow with the event count.

Every variant of a scenario reads the same simulated detector and calls the same reducer
(``_bench_reducers.py``). Stores are created before the clock starts: creating a catalog is
a one-off cost. Everything is written under a temporary folder that is deleted at the end.
See README.md next to this file for the figures measured and what they mean.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run from elsewhere: the reducers module must import by name
    sys.path.insert(0, str(HERE))

import _bench_reducers as reducers  # noqa: E402

logger = logging.getLogger("bench_live_reduction")

FRAME_SHAPE = (1024, 1024)
MIB = 1024 * 1024
TARGET_A_FLOOR = 1.5  # project time / floor time, at most
TARGET_A_PEER = 5.0  # peer time per event / project time per event, at least
TARGET_B = 1.10  # scan time with the callback / scan time alone, at most
TARGET_C_GROWTH_MIB = 64  # RSS growth from the first to the last checkpoint, at most


# --- the simulated detector -----------------------------------------------------------


class FrameSource:
    """An area detector stand-in: each trigger makes a fresh uint16 frame.

    The frame is ``base + (n % 16)``: a new array whose every pixel changes from one event
    to the next, at the cost of one vectorised add (well under a millisecond).
    """

    def __init__(self, shape: tuple[int, int] = FRAME_SHAPE, seed: int = 0) -> None:
        from ophyd.sim import SynSignal

        self.base = np.random.default_rng(seed).integers(0, 4080, shape, dtype=np.uint16)
        self.count = 0
        self.last: np.ndarray | None = None
        self.signal = SynSignal(func=self._next_frame, name=reducers.FRAME_KEY)

    def _next_frame(self) -> np.ndarray:
        frame = self.base + np.uint16(self.count % 16)
        self.count += 1
        self.last = frame
        return frame


# --- measuring helpers ----------------------------------------------------------------


def proc_status_kib(field_name: str, pid: int | str = "self") -> int:
    """A ``VmRSS``/``VmHWM``-like field of /proc/<pid>/status, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class RSSSampler(threading.Thread):
    """Samples the VmRSS of ``pids``, added, every ``interval`` s; keeps the peak overall and
    since the last mark."""

    def __init__(self, pids: Sequence[int | str] = ("self",), interval: float = 0.02) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pids = list(pids)
        self.interval = interval
        self.peak = 0
        self.window_peak = 0
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def sample(self) -> int:
        rss = sum(proc_status_kib("VmRSS", pid) for pid in self.pids)
        with self._lock:
            self.peak = max(self.peak, rss)
            self.window_peak = max(self.window_peak, rss)
        return rss

    def mark(self) -> tuple[int, int]:
        """(RSS now, peak since the previous mark), both KiB; starts a new window."""
        rss = self.sample()
        with self._lock:
            window, self.window_peak = self.window_peak, rss
        return rss, window

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def settle() -> None:
    """Between variants: collect garbage and push dirty pages to disk, off the clock."""
    gc.collect()
    os.sync()
    time.sleep(0.2)


def fmt_s(seconds: float) -> str:
    return f"{seconds:8.2f}"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f}"


@dataclass
class Verdict:
    scenario: str
    what: str
    value: str
    target: str
    passed: bool


@dataclass
class Report:
    verdicts: list[Verdict] = field(default_factory=list)
    tables: dict[str, list[str]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    loads: dict[str, float] = field(default_factory=dict)

    def check(self, scenario: str, what: str, value: str, target: str, passed: bool) -> None:
        self.verdicts.append(Verdict(scenario, what, value, target, passed))


# --- stores ---------------------------------------------------------------------------


def open_peer_catalog(folder: Path) -> Any:
    """An embedded tiled catalog of bluesky runs of the peer's own (as ECOSYSTEM.md shows)."""
    from tiled.catalog import from_uri
    from tiled.client import Context, from_context
    from tiled.server.app import build_app

    (folder / "data").mkdir(parents=True, exist_ok=True)
    adapter = from_uri(
        f"sqlite:///{folder / 'catalog.db'}",
        init_if_not_exists=True,
        specs=[{"name": "CatalogOfBlueskyRuns", "version": "3.0"}],
        writable_storage=[str(folder / "data"), f"sqlite:///{folder / 'tables.db'}"],
        readable_storage=[str(folder / "assets")],
    )
    return from_context(Context.from_app(build_app(adapter)))


def make_reducing_dispatcher(reducer: Callable[[Any], dict[str, Any]]) -> Any:
    """The peer: a ``LiveDispatcher`` whose events carry the reducer's output inline."""
    from bluesky.callbacks.core import CallbackBase
    from bluesky.callbacks.stream import LiveDispatcher

    class ReducingDispatcher(LiveDispatcher):
        def __init__(self) -> None:
            super().__init__()
            self.child_uids: list[str] = []

        def start(self, doc: dict[str, Any], _md: Any = None) -> None:
            super().start(doc, _md)
            self.child_uids.append(self._stream_start_uid)

        def event(self, doc: dict[str, Any], **kwargs: Any) -> Any:
            derived = reducer(doc["data"])
            self.process_event(
                {**doc, "data": derived, "timestamps": {}, "filled": {}}, **kwargs
            )
            return CallbackBase.event(self, doc)

    return ReducingDispatcher()


# --- scenario A -----------------------------------------------------------------------


def run_floor_a(RE: Any, source: FrameSource, n: int, folder: Path) -> dict[str, float]:
    """The scan with no analysis, then the reducer and tifffile.imwrite of each frame."""
    import tifffile
    from bluesky.plans import count

    frames: list[np.ndarray] = []

    def keep_frames(name: str, doc: dict[str, Any]) -> None:
        if name == "event":
            frames.append(doc["data"][reducers.FRAME_KEY])

    folder.mkdir(parents=True, exist_ok=True)
    token = RE.subscribe(keep_frames, "event")
    try:
        t0 = time.perf_counter()
        RE(count([source.signal], num=n))
        t_scan = time.perf_counter() - t0
    finally:
        RE.unsubscribe(token)
    t0 = time.perf_counter()
    for index, frame in enumerate(frames):
        derived = reducers.normalise_and_sum({reducers.FRAME_KEY: frame})
        tifffile.imwrite(folder / f"{index:06d}.tif", derived["norm"])
    t_loop = time.perf_counter() - t0
    if len(frames) != n or len(os.listdir(folder)) != n:
        raise RuntimeError(f"floor: {len(frames)} frames read, expected {n}")
    return {"scan": t_scan, "loop": t_loop, "total": t_scan + t_loop}


def time_until_readable(
    RE: Any,
    callback: Any,
    source: FrameSource,
    n: int,
    derived_frames: Callable[[str], Any],
    *,
    exact: bool,
) -> tuple[dict[str, float], Any]:
    """Time ``RE(count(...))`` with ``callback`` subscribed, then until the derived frames are
    readable: ``derived_frames(raw_uid)`` finds them, their shape and last frame are read
    and checked (``exact``: equal, else close). Returns the times and the child run's uid."""
    from bluesky.plans import count

    unsubscribe = subscribe(RE, callback)
    try:
        t0 = time.perf_counter()
        (raw_uid,) = RE(count([source.signal], num=n))
        t_scan = time.perf_counter() - t0
        child_uid, norm = derived_frames(raw_uid)
        shape = tuple(norm.shape)
        last = norm[n - 1]
        t_total = time.perf_counter() - t0
    finally:
        unsubscribe()
    expected = reducers.normalise_and_sum({reducers.FRAME_KEY: source.last})["norm"]
    same = np.array_equal if exact else np.allclose
    if shape != (n, *FRAME_SHAPE) or not same(last, expected):
        raise RuntimeError(f"child run {child_uid} holds {shape}, or a wrong frame")
    return {"scan": t_scan, "readable": t_total - t_scan, "total": t_total}, child_uid


def subscribe(RE: Any, callback: Any) -> Callable[[], None]:  # noqa: N803
    """Subscribe ``callback`` so that ``RE(...)`` returns once its derived data is saved
    (the package's callback waits in the plan, through ``callback.subscribe(RE)``; the
    peer's callback is a plain one). Returns what undoes it."""
    from bluesky_analysis_store import AnalysisStoreCallback

    if isinstance(callback, AnalysisStoreCallback):
        callback.subscribe(RE)
        return lambda: callback.unsubscribe(RE)
    token = RE.subscribe(callback)
    return lambda: RE.unsubscribe(token)


def run_project_a(RE: Any, source: FrameSource, n: int, store: Any, cb: Any) -> dict[str, Any]:
    """The scan with the callback subscribed, until the child run's frames are readable."""

    def derived_frames(raw_uid: str) -> tuple[str, Any]:
        (child_uid,) = store.children(raw_uid)
        return child_uid, store[child_uid]["primary"]["norm"]

    times, child_uid = time_until_readable(RE, cb, source, n, derived_frames, exact=True)
    reduction = store[child_uid].stop["reduction"]
    if reduction["events_reduced"] != n or reduction["events_failed"]:
        raise RuntimeError(f"project: child run {child_uid} reduced {reduction}")
    return times


def run_peer_a(RE: Any, source: FrameSource, n: int, client: Any) -> dict[str, Any]:
    """LiveDispatcher -> TiledWriter (arrays inside events), until the child is readable."""
    from bluesky_tiled_plugins import TiledWriter

    dispatcher = make_reducing_dispatcher(reducers.normalise_and_sum)
    dispatcher.subscribe(TiledWriter(client))

    def derived_frames(raw_uid: str) -> tuple[str, Any]:
        child_uid = dispatcher.child_uids[-1]
        return child_uid, client[child_uid]["primary"]["norm"]

    times, _ = time_until_readable(RE, dispatcher, source, n, derived_frames, exact=False)
    return times


def scenario_a(args: argparse.Namespace, work: Path, RE: Any, report: Report) -> None:
    from bluesky_analysis_store import AnalysisStore, AnalysisStoreCallback

    n, n_peer, repeats = args.events_a, args.peer_events, args.repeats_a
    source = FrameSource()
    store = AnalysisStore.open(work / "a-store")
    cb = AnalysisStoreCallback([reducers.normalise_and_sum], store)  # default: a worker process
    peer_client = open_peer_catalog(work / "a-peer") if not args.no_peer else None

    # Warm-up, off the clock: imports, first requests, first HDF5 file of each variant.
    run_floor_a(RE, source, 3, work / "a-floor-warmup")
    run_project_a(RE, source, 3, store, cb)
    if peer_client is not None:
        run_peer_a(RE, source, 3, peer_client)
    settle()

    floors, projects = [], []
    for i in range(repeats):
        order = ("floor", "project") if i % 2 == 0 else ("project", "floor")
        for variant in order:
            if variant == "floor":
                # Kept, as the project's child runs are: deleting them would hand the next
                # run memory the kernel has already mapped, which this VM writes several
                # times faster than pages it has not touched yet.
                floors.append(run_floor_a(RE, source, n, work / f"a-floor-{i}"))
            else:
                projects.append(run_project_a(RE, source, n, store, cb))
            settle()
    peer = run_peer_a(RE, source, n_peer, peer_client) if peer_client is not None else None
    cb.close()

    def median(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    floor_t, project_t = median(floors, "total"), median(projects, "total")
    ratio_floor = project_t / floor_t
    rows = [
        f"A. {n} events of {FRAME_SHAPE[0]}x{FRAME_SHAPE[1]} uint16 -> normalise_and_sum "
        f"(float32 frame + total); median of {repeats} alternating runs, peer run once",
        f"{'variant':<48}{'events':>7}{'total s':>9}{'ms/event':>10}{'ratio':>8}",
        f"{'floor: scan, then reducer + tifffile loop':<48}{n:>7}{fmt_s(floor_t):>9}"
        f"{fmt_ms(floor_t / n):>10}{1.0:>8.2f}",
        f"{'  scan alone (RE returns)':<48}{'':>7}{fmt_s(median(floors, 'scan')):>9}",
        f"{'  reducer + tifffile.imwrite loop':<48}{'':>7}{fmt_s(median(floors, 'loop')):>9}",
        f"{'project: AnalysisStoreCallback, until readable':<48}{n:>7}{fmt_s(project_t):>9}"
        f"{fmt_ms(project_t / n):>10}{ratio_floor:>8.2f}",
        f"{'  RE returns (child run saved)':<48}{'':>7}{fmt_s(median(projects, 'scan')):>9}",
        f"{'  then children() + shape + last frame read':<48}{'':>7}"
        f"{fmt_s(median(projects, 'readable')):>9}",
    ]
    report.check(
        "A", "project / floor", f"{ratio_floor:.2f}", f"<= {TARGET_A_FLOOR}",
        ratio_floor <= TARGET_A_FLOOR,
    )
    figures: dict[str, Any] = {"floor": floors, "project": projects}
    if peer is not None:
        peer_per_event, project_per_event = peer["total"] / n_peer, project_t / n
        speedup = peer_per_event / project_per_event
        rows += [
            f"{'peer: LiveDispatcher -> TiledWriter, until readable':<48}{n_peer:>7}"
            f"{fmt_s(peer['total']):>9}{fmt_ms(peer_per_event):>10}"
            f"{peer_per_event / (floor_t / n):>8.2f}",
            f"{'  RE returns (all written at stop)':<48}{'':>7}{fmt_s(peer['scan']):>9}",
            f"{'  then shape + last frame read':<48}{'':>7}{fmt_s(peer['readable']):>9}",
            f"project is {speedup:.1f}x faster per event than the peer"
            + (f" (peer run with {n_peer} events, compared per event)" if n_peer != n else ""),
        ]
        report.check(
            "A", "peer / project (per event)", f"{speedup:.1f}x", f">= {TARGET_A_PEER}x",
            speedup >= TARGET_A_PEER,
        )
        figures["peer"] = peer
    rows.append("(ratio: time per event relative to the floor)")
    report.tables["A"] = rows
    report.figures["A"] = figures


# --- scenario B -----------------------------------------------------------------------


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by each live thread of this process, by thread name."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    seconds: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid), f"thread {tid}")
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return seconds


def process_cpu_seconds(pid: int | None) -> float:
    """CPU seconds used so far by process ``pid`` (0 for None)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


THREAD_GROUPS = {
    "bluesky-run-engine": "RunEngine",
    "analysis-store-worker": "worker thread",
    "analysis-store-sender": "handover threads",
    "analysis-store-listener": "handover threads",
}


def thread_groups(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds between two snapshots: the RunEngine, the analysis worker thread, the
    threads handing documents to a worker process, and the rest (tiled's in-process server)."""
    groups = dict.fromkeys(
        ["RunEngine", "worker thread", "handover threads", "tiled and other threads"], 0.0
    )
    for name, value in after.items():
        group = THREAD_GROUPS.get(name, "tiled and other threads")
        groups[group] += value - before.get(name, 0.0)
    return groups


def start_tiled_server(folder: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """``tiled serve catalog`` in a process of its own on a free localhost port."""
    import secrets
    import socket

    from tiled.client import from_uri

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api_key = secrets.token_hex(16)
    log = open(folder / "server.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [sys.executable, "-m", "tiled", "serve", "catalog", str(folder / "catalog.db"),
         "--init", "-w", str(folder / "data"), "-w", f"sqlite:///{folder / 'tables.db'}",
         "--api-key", api_key, "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            # Wait for the port first: the client retries (noisily) on a refused connection.
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            from_uri(uri, api_key=api_key)
            return process, uri, api_key
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process)
                raise RuntimeError(f"tiled server did not start; see {folder / 'server.log'}")
            time.sleep(0.5)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def scenario_b(args: argparse.Namespace, work: Path, RE: Any, report: Report) -> None:
    from bluesky.plans import count
    from ophyd.sim import det

    from bluesky_analysis_store import AnalysisStore, AnalysisStoreCallback

    n, repeats = args.points_b, args.repeats_b
    stores = {"embedded": AnalysisStore.open(work / "b-store")}
    server = None
    if not args.no_server:
        try:
            server, uri, api_key = start_tiled_server(work / "b-server")
            stores["server"] = AnalysisStore.from_uri(uri, api_key=api_key)
        except Exception as error:  # the extra variant is informative; go on without it
            logger.warning("scenario B runs without the tiled-server variant: %s", error)
    # "process" is the default (background=True); "thread" is background="thread".
    callbacks = {
        "process": AnalysisStoreCallback([reducers.scale_scalar], stores["embedded"]),
        "thread": AnalysisStoreCallback(
            [reducers.scale_scalar], stores["embedded"], background="thread"
        ),
    }
    store_of = {"process": stores["embedded"], "thread": stores["embedded"]}
    if "server" in stores:
        callbacks["server"] = AnalysisStoreCallback([reducers.scale_scalar], stores["server"])
        store_of["server"] = stores["server"]
    variants = ["alone", *callbacks]

    def scan(variant: str, points: int) -> dict[str, Any]:
        cb = callbacks.get(variant)
        unsubscribe = subscribe(RE, cb) if cb is not None else None
        worker_pid = cb.worker_pid if cb is not None else None
        try:
            threads_before = thread_cpu_seconds()
            worker_before = process_cpu_seconds(worker_pid)
            t0, c0 = time.perf_counter(), time.process_time()
            (uid,) = RE(count([det], num=points))
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            threads = thread_groups(threads_before, thread_cpu_seconds())
            threads["worker process"] = process_cpu_seconds(worker_pid) - worker_before
        finally:
            if unsubscribe is not None:
                unsubscribe()
        if cb is not None:
            store = store_of[variant]
            (child_uid,) = store.children(uid)
            reduction = store[child_uid].stop["reduction"]
            if reduction["events_reduced"] != points or reduction["events_failed"]:
                raise RuntimeError(f"B: child run {child_uid} reduced {reduction}")
        return {"wall": elapsed, "cpu": cpu, "threads": threads}

    try:
        for variant in variants:  # warm-up, off the clock
            scan(variant, 20)
        settle()
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for i in range(repeats):
            for variant in variants if i % 2 == 0 else variants[::-1]:
                runs[variant].append(scan(variant, n))
                gc.collect()
    finally:
        for cb in callbacks.values():
            cb.close()
        if server is not None:
            stop_process(server)

    def med(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    def med_thread(variant: str, group: str) -> float:
        return statistics.median(r["threads"][group] for r in runs[variant])

    alone_t = med("alone", "wall")
    labels = {
        "alone": "scan alone",
        "process": "scan + AnalysisStoreCallback (default: process)",
        "thread": "  background='thread' instead",
        "server": "  process, store behind a `tiled serve` process",
    }
    rows = [
        f"B. count([det], num={n}), scalar reducer scale_scalar; {repeats} runs of each "
        "variant, alternating; medians",
        f"{'variant':<48}{'points':>7}{'median s':>9}{'ms/point':>10}{'ratio':>8}"
        f"{'CPU s':>8}{'CPU ratio':>11}",
    ]
    for variant in variants:
        wall, cpu = med(variant, "wall"), med(variant, "cpu")
        rows.append(
            f"{labels[variant]:<48}{n:>7}{fmt_s(wall):>9}{fmt_ms(wall / n):>10}"
            f"{wall / alone_t:>8.2f}{cpu:>8.2f}{cpu / med('alone', 'cpu'):>11.2f}"
        )
    rows.append(
        "  CPU s by thread of this process and of the worker process, medians (a tiled "
        "server process not counted):"
    )
    for variant in variants:
        rows.append(
            f"    {variant:<10}"
            + ", ".join(f"{g} {med_thread(variant, g):.2f}" for g in runs[variant][0]["threads"])
        )
    rows.append(
        "  wall s of every run: "
        + " | ".join(f"{v} " + " ".join(f"{r['wall']:.2f}" for r in runs[v]) for v in variants)
    )
    ratio = med("process", "wall") / alone_t
    report.check("B", "scan with callback / alone", f"{ratio:.2f}", f"<= {TARGET_B}",
                 ratio <= TARGET_B)
    report.tables["B"] = rows
    report.figures["B"] = runs


# --- scenario C -----------------------------------------------------------------------


def scenario_c(args: argparse.Namespace, work: Path, RE: Any, report: Report) -> None:
    from bluesky.plans import count

    from bluesky_analysis_store import AnalysisStore, AnalysisStoreCallback

    n = args.events_c
    checkpoints = [n * k // 4 for k in (1, 2, 3, 4)]
    source = FrameSource()
    store = AnalysisStore.open(work / "c-store")
    cb = AnalysisStoreCallback([reducers.bin_and_sum], store)  # default: a worker process
    RE(count([source.signal], num=3))  # warm-up without the callback, off the clock
    cb.flush()  # the worker process has started and opened the store
    gc.collect()

    pids: list[int | str] = ["self"] if cb.worker_pid is None else ["self", cb.worker_pid]
    sampler = RSSSampler(pids)
    resets = [reset_peak_rss(pid) for pid in pids]  # every process's, not only the first
    hwm_reset = all(resets)
    baseline = sum(proc_status_kib("VmRSS", pid) for pid in pids)
    sampler.start()
    # (events, RSS of all, window peak, queued docs, RSS of each process)
    marks: list[tuple[int, int, int, int, list[int]]] = []
    seen = 0

    def checkpoint(name: str, doc: dict[str, Any]) -> None:
        nonlocal seen
        seen += 1
        if seen in checkpoints:
            rss, window = sampler.mark()
            each = [proc_status_kib("VmRSS", pid) for pid in pids]
            marks.append((seen, rss, window, cb.queued_documents, each))

    t0 = time.perf_counter()
    token = RE.subscribe(checkpoint, "event")
    unsubscribe = subscribe(RE, cb)
    try:
        (raw_uid,) = RE(count([source.signal], num=n))
    finally:
        RE.unsubscribe(token)
        unsubscribe()
    elapsed = time.perf_counter() - t0
    after_rss, after_window = sampler.mark()
    after_each = [proc_status_kib("VmRSS", pid) for pid in pids]
    sampler.stop()
    hwm = sum(proc_status_kib("VmHWM", pid) for pid in pids)
    cb.close()
    (child_uid,) = store.children(raw_uid)
    child = store[child_uid]
    shape = tuple(child["primary"]["binned"].shape)
    reduction = child.stop["reduction"]
    if shape[0] != n or reduction["events_reduced"] != n or reduction["events_failed"]:
        raise RuntimeError(f"C: child run {child_uid} holds {shape}, reduced {reduction}")

    def mib(kib: int) -> str:
        return f"{kib / 1024:9.0f}"

    names = ["scan process", "worker process"][: len(pids)]
    rows = [
        f"C. {n} events of {FRAME_SHAPE[0]}x{FRAME_SHAPE[1]} uint16 with AnalysisStoreCallback"
        f" ({cb.mode}); reducer bin_and_sum writes a 256x256 float32 frame + total per event",
        f"   scan took {elapsed:.1f} s ({elapsed / n * 1e3:.1f} ms/event); RSS before the scan "
        f"{baseline / 1024:.0f} MiB ({' + '.join(names)}); callback queue: at most "
        f"{cb.queue_size} documents and {cb.queue_bytes / MIB:.0f} MiB of arrays",
        f"{'after event':>12}{'RSS MiB':>9}"
        + "".join(f"{name:>16}" for name in names)
        + f"{'peak in window MiB':>20}{'queued docs':>13}",
    ]
    for events, rss, window, queued, each in marks:
        rows.append(
            f"{events:>12}{mib(rss)}"
            + "".join(f"{mib(e):>16}" for e in each)
            + f"{mib(window):>20}{queued:>13}"
        )
    rows.append(
        f"{'child saved':>12}{mib(after_rss)}"
        + "".join(f"{mib(e):>16}" for e in after_each)
        + f"{mib(after_window):>20}{0:>13}"
    )
    peak_label = "VmHWM during the scan" if hwm_reset else "VmHWM (process lifetime)"
    rows.append(
        f"   {peak_label} (processes added): {hwm / 1024:.0f} MiB; sampled peak "
        f"{sampler.peak / 1024:.0f} MiB"
    )
    growth = (marks[-1][1] - marks[0][1]) / 1024
    window_growth = (max(m[2] for m in marks[1:]) - marks[0][2]) / 1024 if len(marks) > 1 else 0
    rows.append(
        f"   RSS growth from event {marks[0][0]} to {marks[-1][0]}: {growth:+.0f} MiB "
        f"(window peaks: {window_growth:+.0f} MiB)"
    )
    report.check(
        "C", f"RSS growth, event {marks[0][0]} -> {marks[-1][0]}", f"{growth:+.0f} MiB",
        f"< {TARGET_C_GROWTH_MIB} MiB", growth < TARGET_C_GROWTH_MIB,
    )
    report.tables["C"] = rows
    report.figures["C"] = {
        "baseline_kib": baseline, "marks": marks, "after_kib": after_rss, "hwm_kib": hwm,
        "seconds": elapsed,
    }


# --- the machine and the run ----------------------------------------------------------


def machine_lines() -> list[str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln),
            model,
        )
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    versions = []
    for dist in ("bluesky-analysis-store", "bluesky", "ophyd", "event-model", "databroker",
                 "tiled", "bluesky-tiled-plugins", "numpy", "h5py", "tifffile"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return [
        f"machine: {os.cpu_count()} CPUs ({model}), {ram:.1f} GiB RAM, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}",
        "packages: " + ", ".join(versions),
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer events: a smoke test")
    parser.add_argument("--only", choices=["A", "B", "C"], action="append",
                        help="run only this scenario (repeatable)")
    parser.add_argument("--events-a", type=int, help="events in scenario A (default 200)")
    parser.add_argument("--peer-events", type=int,
                        help="events of the peer in A (default: as many as --events-a)")
    parser.add_argument("--repeats-a", type=int, help="runs of floor and project in A (3)")
    parser.add_argument("--no-peer", action="store_true", help="skip the peer in A")
    parser.add_argument("--points-b", type=int, help="points of the count in B (2000)")
    parser.add_argument("--repeats-b", type=int, help="runs of each variant in B (9)")
    parser.add_argument("--no-server", action="store_true",
                        help="skip B's variant with the store behind a tiled server process")
    parser.add_argument("--events-c", type=int, help="events in scenario C (2000)")
    parser.add_argument("--workdir", help="where stores and files go (default: a temp dir)")
    parser.add_argument("--json", help="also write the raw figures to this JSON file")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "events_a": 20 if quick else 200,
        "repeats_a": 1 if quick else 3,
        "points_b": 200 if quick else 2000,
        "repeats_b": 2 if quick else 9,
        # The queue fills during the first ~200 frames; a shorter run would only show that.
        "events_c": 800 if quick else 2000,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.peer_events is None:
        args.peer_events = args.events_a
    args.only = sorted(set(args.only or ["A", "B", "C"]))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # tiled's in-process client goes through starlette's TestClient, which warns about httpx.
    warnings.filterwarnings("ignore", message=".*httpx.*starlette.testclient")
    import tiled.server.app  # noqa: F401 - sets up its own INFO logger, quietened here

    for noisy in ("httpx", "tiled", "tiled.server.app"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from bluesky import RunEngine

    base = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bas-bench-", dir=base))
    free_gib = shutil.disk_usage(work).free / 1024**3
    needed_gib = (
        ("A" in args.only) * (args.events_a * 4 * (2 + 2 * args.repeats_a) / 1024)
        + ("C" in args.only) * (args.events_c * 0.3 / 1024)
    )
    for line in machine_lines():
        print(line)
    print(f"work folder: {work} ({free_gib:.0f} GiB free, about {needed_gib:.1f} GiB needed)")
    if free_gib < needed_gib * 1.2:
        print("not enough free disk space", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        return 2
    print(flush=True)

    RE = RunEngine({})
    report = Report()
    scenarios = {"A": scenario_a, "B": scenario_b, "C": scenario_c}
    # C first: its memory figures then start from a process that has not yet held the
    # peer's gigabytes. The tables are printed in A, B, C order.
    order = [s for s in ("C", "A", "B") if s in args.only]
    try:
        for name in order:
            t0 = time.perf_counter()
            print(f"running scenario {name} ...", flush=True)
            scenarios[name](args, work, RE, report)
            report.loads[name] = os.getloadavg()[0]
            print(f"  done in {time.perf_counter() - t0:.0f} s; load average "
                  f"{report.loads[name]:.1f}", flush=True)
            settle()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    for name in args.only:
        print("\n".join(report.tables[name]))
        print(f"   (1-minute load average when scenario {name} ended: {report.loads[name]:.1f} "
              f"on {os.cpu_count()} CPUs; other processes make the wall times noisy)")
        print()
    print(f"{'scenario':<9}{'measure':<36}{'value':>10}  {'target':<12}result")
    for v in report.verdicts:
        print(f"{v.scenario:<9}{v.what:<36}{v.value:>10}  {v.target:<12}"
              f"{'PASS' if v.passed else 'FAIL'}")
    if args.quick:
        print("(--quick: fixed costs weigh more in short runs; the targets are for the full "
              "sizes, so --quick exits 0 whatever the results)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "figures": report.figures,
             "verdicts": [vars(v) for v in report.verdicts]}, indent=2, default=str))
    return 0 if args.quick or all(v.passed for v in report.verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
