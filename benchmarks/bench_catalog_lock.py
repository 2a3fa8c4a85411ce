"""Several writer processes on one embedded store: the write lock's effect and its cost.

    .venv/bin/python benchmarks/bench_catalog_lock.py              # everything, ~2 minutes
    .venv/bin/python benchmarks/bench_catalog_lock.py --only load  # one part (repeatable)

open  Time to ``AnalysisStore.open`` an existing store in a fresh process (the import of
      tiled's server and the catalog adapter included), and the import alone; medians.
doc   Cost per document of saving a 2,000-event scalar run into a store alone, with the
      catalog's write lock and with it removed (the store as it was before the lock),
      alternately; medians over repeats.
load  ``--writers`` processes (3) open the same folder and each save a run of ``--events``
      scalar events (2,000) at the same moment; then a fresh ``AnalysisStore.open`` reads
      every run back. Run with the lock, and with ``--no-lock`` for the store without it.

Everything is written under a temporary folder that is deleted at the end. See
docs/decisions/0005-one-writer-per-embedded-catalog.md for the figures measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench_catalog_lock")

# How long the writer processes of the load part wait, once all are ready, before they start:
# they start together, so that their flushes overlap.
_START_DELAY = 1.0


def scalar_run(events: int, *, label: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """A run of ``events`` scalar events of one stream, as ``event_model`` composes it."""
    import event_model

    bundle = event_model.compose_run(metadata={"label": label})
    yield "start", bundle.start_doc
    descriptor = bundle.compose_descriptor(
        name="primary",
        data_keys={
            "det": {"source": "sim", "dtype": "number", "shape": []},
            "n": {"source": "sim", "dtype": "integer", "shape": []},
        },
    )
    yield "descriptor", descriptor.descriptor_doc
    for n in range(events):
        now = time.time()
        yield (
            "event",
            descriptor.compose_event(
                data={"det": float(n) * 0.5, "n": n},
                timestamps={"det": now, "n": now},
                seq_num=n + 1,
            ),
        )
    yield "stop", bundle.compose_stop()


def remove_lock(store: Any) -> None:
    """The store as it was before the catalog's write lock: every write unserialised."""
    http_client = store.client.context.http_client
    http_client._transport = http_client._transport.inner


# --- the child processes ------------------------------------------------------------------


def _child_open(folder: str) -> None:
    started = time.perf_counter()
    import tiled.catalog  # noqa: F401 - what opening costs is mostly importing this
    import tiled.server.app  # noqa: F401

    imported = time.perf_counter()
    from bluesky_analysis_store import AnalysisStore

    AnalysisStore.open(folder)
    print(json.dumps({"import": imported - started, "open": time.perf_counter() - started}))


def _child_write(
    folder: str, events: int, interval: float, flush_interval: float, lock: bool, label: str
) -> None:
    from bluesky_analysis_store import AnalysisStore

    store = AnalysisStore.open(folder, flush_interval=flush_interval)
    if not lock:
        remove_lock(store)
    documents = list(scalar_run(events, label=label))
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())
    time.sleep(max(0.0, start_at - time.time()))
    started = time.perf_counter()
    for name, doc in documents:
        store(name, doc)
        if interval:
            time.sleep(interval)
    print(json.dumps({"uid": documents[0][1]["uid"], "seconds": time.perf_counter() - started}))


def _child_read(folder: str, seconds: float, lock: bool, uid: str) -> None:
    from bluesky_analysis_store import AnalysisStore

    store = AnalysisStore.open(folder)
    if not lock:
        remove_lock(store)
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())
    time.sleep(max(0.0, start_at - time.time()))
    reads, errors, locked = 0, 0, 0
    end = time.time() + seconds
    while time.time() < end:
        try:
            len(store)
            store[uid]["primary"].read()
            reads += 1
        except Exception as error:  # counted, and the reader goes on
            errors += 1
            locked += "database is locked" in str(error)
            logger.info("reader: %s: %s", type(error).__name__, str(error)[:200])
    print(json.dumps({"reads": reads, "errors": errors, "locked": locked}))


# --- the parts ----------------------------------------------------------------------------


def _run_child(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )


def bench_open(folder: Path, repeats: int) -> dict[str, Any]:
    opens, imports = [], []
    for _ in range(repeats):
        done = _run_child("open", str(folder))
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        opens.append(figures["open"])
        imports.append(figures["import"])
    result = {
        "open_s": statistics.median(opens),
        "import_s": statistics.median(imports),
        "opens_s": opens,
    }
    print(
        f"open: AnalysisStore.open in a fresh process {result['open_s']:.2f} s median "
        f"(of which importing tiled's server and catalog {result['import_s']:.2f} s), "
        f"runs {', '.join(f'{s:.2f}' for s in opens)}"
    )
    return result


def bench_doc(folder: Path, events: int, repeats: int) -> dict[str, Any]:
    from bluesky_analysis_store import AnalysisStore

    variants = {"lock": AnalysisStore.open(folder), "no lock": AnalysisStore.open(folder)}
    remove_lock(variants["no lock"])
    per_doc: dict[str, list[float]] = {name: [] for name in variants}
    for n in range(repeats + 1):  # the first round warms up, off the record
        for name, store in sorted(variants.items(), reverse=n % 2 == 1):
            documents = list(scalar_run(events))
            started = time.perf_counter()
            for doc_name, doc in documents:
                store(doc_name, doc)
            elapsed = time.perf_counter() - started
            if n:
                per_doc[name].append(elapsed / len(documents))
    result = {name: statistics.median(values) for name, values in per_doc.items()}
    # What the lock itself costs: one hold (a thread lock and two flock calls) times the
    # requests a run makes, which are the only calls that take it.
    transport = variants["lock"].client.context.http_client._transport
    counted = _CountingTransport(transport.inner)
    transport.inner = counted
    documents = list(scalar_run(events))
    for doc_name, doc in documents:
        variants["lock"](doc_name, doc)
    transport.inner = counted.inner
    holds = 100_000
    started = time.perf_counter()
    for _ in range(holds):
        with transport.lock.held():
            pass
    hold_s = (time.perf_counter() - started) / holds
    print(
        f"doc: a {events}-event run makes {counted.writes} writing and {counted.reads} "
        f"reading requests; one hold of the lock costs {hold_s * 1e6:.2f} us, so "
        f"{hold_s * (counted.writes + counted.reads) / len(documents) * 1e9:.0f} ns per document"
    )
    print(
        f"doc: per document, {events}-event scalar runs, one writer: with the lock "
        f"{result['lock'] * 1e6:.1f} us, without {result['no lock'] * 1e6:.1f} us "
        f"(difference {(result['lock'] - result['no lock']) * 1e6:+.1f} us; medians of "
        f"{repeats})"
    )
    return {
        "per_doc_s": result,
        "runs_s": per_doc,
        "requests_per_run": {"writing": counted.writes, "reading": counted.reads},
        "hold_s": hold_s,
    }


class _CountingTransport:
    """Passes requests on, counting those that write and those that read."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes = self.reads = 0

    def handle_request(self, request: Any) -> Any:
        if request.method in ("GET", "HEAD"):
            self.reads += 1
        else:
            self.writes += 1
        return self.inner.handle_request(request)


def bench_load(
    folder: Path,
    writers: int,
    events: int,
    interval: float,
    flush_interval: float,
    readers: int,
    lock: bool,
) -> dict[str, Any]:
    from bluesky_analysis_store import AnalysisStore

    # The catalog exists before the writers open it, with a run for the readers to read.
    first = AnalysisStore.open(folder)
    read_documents = list(scalar_run(20 * events, label="read"))
    for name, doc in read_documents:
        first(name, doc)
    reading_seconds = events * interval + 2.0
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                "write",
                str(folder),
                str(events),
                str(interval),
                str(flush_interval),
                "1" if lock else "0",
                f"writer-{n}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(writers)
    ]
    reading = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                "read",
                str(folder),
                str(reading_seconds),
                "1" if lock else "0",
                read_documents[0][1]["uid"],
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(readers)
    ]
    for process in processes + reading:  # every writer has imported tiled and opened the store
        assert process.stdout is not None
        process.stdout.readline()
    start_at = f"{time.time() + _START_DELAY}\n"
    for process in processes + reading:
        assert process.stdin is not None
        process.stdin.write(start_at)
        process.stdin.flush()
    outputs = [process.communicate() for process in processes]
    read_outputs = [process.communicate() for process in reading]
    read_figures = [json.loads(out.strip().splitlines()[-1]) for out, _ in read_outputs if out]
    locked_errors = sum(
        "database is locked" in out + err for out, err in outputs
    )
    failed = [p.returncode for p in processes if p.returncode != 0]
    uids, seconds = [], []
    for out, _ in outputs:
        lines = out.strip().splitlines()
        if lines:
            figures = json.loads(lines[-1])
            uids.append(figures["uid"])
            seconds.append(figures["seconds"])
    reader = AnalysisStore.open(folder)  # a fresh one: what is on disk
    complete = 0
    for uid in uids:
        run = reader[uid]
        if run.metadata.get("stop") and len(run["primary"].read()["det"]) == events:
            complete += 1
    for n, (out, err) in enumerate(outputs):
        if processes[n].returncode != 0:
            last = [line for line in err.strip().splitlines() if line.strip()][-1:]
            logger.info("writer %d exited %d: %s", n, processes[n].returncode, last)
    result = {
        "lock": lock,
        "writers_failed": len(failed),
        "outputs_with_database_is_locked": locked_errors,
        "runs_complete": complete,
        "writer_seconds": seconds,
        "readers": read_figures,
    }
    print(
        f"load ({'with' if lock else 'without'} the lock): {writers} processes x {events} "
        f"events: {len(failed)} failed, {locked_errors} printed 'database is locked', "
        f"{complete} of {writers} runs complete; writers took "
        f"{', '.join(f'{s:.1f}' for s in seconds) or '-'} s"
    )
    for figures in read_figures:
        print(
            f"  a reader alongside: {figures['reads']} reads, {figures['errors']} failed, "
            f"{figures['locked']} of them 'database is locked'"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=["open", "doc", "load"])
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument(
        "--interval", type=float, default=0.001, help="load: seconds between a writer's documents"
    )
    parser.add_argument(
        "--flush-interval", type=float, default=0.5, help="load: the writers' flush interval"
    )
    parser.add_argument(
        "--readers", type=int, default=1, help="load: processes reading while the writers write"
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-lock", action="store_true", help="load: the store without lock")
    parser.add_argument("--workdir", help="where stores go (default: a new folder in /tmp)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parts = args.only or ["open", "doc", "load"]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-catalog-lock-", dir=args.workdir))
    figures: dict[str, Any] = {}
    try:
        if "open" in parts:
            from bluesky_analysis_store import AnalysisStore

            AnalysisStore.open(workdir / "open")  # created here, reopened by each child
            figures["open"] = bench_open(workdir / "open", args.repeats)
        if "doc" in parts:
            figures["doc"] = bench_doc(workdir / "doc", args.events, args.repeats)
        if "load" in parts:
            figures["load"] = bench_load(
                workdir / "load",
                args.writers,
                args.events,
                args.interval,
                args.flush_interval,
                args.readers,
                lock=not args.no_lock,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, child_args = sys.argv[2], sys.argv[3:]
        if kind == "open":
            _child_open(*child_args)
        elif kind == "read":
            folder, seconds, lock, uid = child_args
            _child_read(folder, float(seconds), lock == "1", uid)
        else:
            folder, events, interval, flush_interval, lock, label = child_args
            _child_write(
                folder, int(events), float(interval), float(flush_interval), lock == "1", label
            )
        sys.exit(0)
    sys.exit(main())
