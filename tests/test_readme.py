"""Every code block of README.md runs as the README shows it.

The README is followed as a user follows it: top to bottom, in one fresh folder (the current
directory, with ``$BLUESKY_ANALYSIS_STORE``, ``$BLUESKY_ANALYSIS_DATA`` and ``$HOME`` inside
it), once per test session. ```` ```python ```` blocks run in one namespace per ``##``
section, in order; a block whose section goes on from another's names it in an HTML comment
right before the fence, ``<!-- continues: SECTION TITLE -->``. Shell blocks whose commands are
all ``bluesky-analysis-store ...`` run through :func:`bluesky_analysis_store.cli.main` in this
process and must exit 0, or the status a command's trailing ``# exit status N`` names. Any
other block (output, a diagram, a synopsis, pseudo-code, ``make`` and ``ipython`` lines
tested elsewhere) says why it is not run: ``<!-- not run: WHY -->``. A block that is neither
run nor marked fails :func:`test_every_block_is_run_or_marked`.

What the README presumes exists and does not make itself is made here: the scientist's files
that its ``ingest`` example reads (``~/beamtime/frames/`` and ``~/beamtime/fit.csv``).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import linecache
import os
import re
import shlex
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from bluesky_analysis_store import (
    DATA_ROOT_ENV,
    JOURNAL_ENV,
    STORE_ENV,
    AnalysisStore,
    AnalysisStoreCallback,
)
from bluesky_analysis_store.cli import main

README = Path(__file__).parents[1] / "README.md"
PROG = "bluesky-analysis-store"
PYTHON = "python"
SHELL_LANGUAGES = ("", "sh", "shell", "bash", "console")
LIVE_SECTION = "Live reduction during scans"
BATCH_SECTION = "Saving derived data from arrays (the DBEP 6 batch API)"
OFFLINE_SECTION = "Offline: reprocess, ingest, reproduce"

_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*(not run|continues):\s*(.*?)\s*-->$")
_EXIT_STATUS = re.compile(r"#.*\bexit status (\d+)")


# --- reading the README -------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README."""

    line: int
    """the README line of its first line of code (the one after the opening fence)"""
    section: str
    """the ``##`` heading it is under (the title for blocks before the first one)"""
    language: str
    text: str
    marker: tuple[str, str] | None
    """the ``(kind, text)`` of the ``<!-- not run: ... -->`` or ``<!-- continues: ... -->``
    comment right before its fence"""

    @property
    def id(self) -> str:
        return f"line-{self.line}-{self.language or 'plain'}"

    @property
    def commands(self) -> list[str]:
        """Its lines that are neither blank nor comments."""
        lines = (line.strip() for line in self.text.splitlines())
        return [line for line in lines if line and not line.startswith("#")]

    @property
    def how(self) -> str:
        """``"python"``, ``"cli"``, ``"not run"``, or why it can be neither run nor skipped."""
        if self.marker and self.marker[0] == "not run":
            return "not run" if self.marker[1] else "a 'not run' marker must say why"
        if self.language == PYTHON:
            return PYTHON
        if self.language in SHELL_LANGUAGES:
            if self.commands and all(line.split()[0] == PROG for line in self.commands):
                return "cli"
            return "unmarked: not all of its lines are bluesky-analysis-store commands"
        return f"unmarked: a {self.language!r} block"

    @property
    def namespace(self) -> str:
        """The section whose namespace a Python block runs in."""
        if self.marker and self.marker[0] == "continues":
            return self.marker[1]
        return self.section


def readme_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    section = ""
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        line = lines[number]
        if line.startswith("# ") and not section:
            section = line[2:].strip()
        elif line.startswith("## "):
            section = line[3:].strip()
        elif fence := _FENCE.match(line):
            end = number + 1
            while end < len(lines) and lines[end].rstrip() != "```":
                end += 1
            before = next((x.strip() for x in reversed(lines[:number]) if x.strip()), "")
            marker = _MARKER.match(before)
            blocks.append(
                Block(
                    line=number + 2,
                    section=section,
                    language=fence.group(1),
                    text="\n".join(lines[number + 1 : end]) + "\n",
                    marker=(marker.group(1), marker.group(2)) if marker else None,
                )
            )
            number = end
        number += 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
RUN_BLOCKS = [block for block in BLOCKS if block.how in (PYTHON, "cli")]


# --- running it ---------------------------------------------------------------------------


@dataclass
class Session:
    """What following the README left: each section's namespace, each block's outcome."""

    folder: Path
    namespaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    """README line of a block -> why it failed (a traceback, or the command's output)"""
    after: dict[int, dict[str, Any]] = field(default_factory=dict)
    """README line of a Python block -> its namespace as that block left it (a later
    section that continues it may bind the same names again)"""
    cli_output: dict[int, list[str]] = field(default_factory=dict)


def run_python(block: Block, namespace: dict[str, Any]) -> None:
    """Execute ``block`` in ``namespace``, reporting README line numbers in a traceback; its
    source is in ``linecache``, as IPython's cells are, so that definitions have source."""
    filename = f"<README.md block at line {block.line}>"
    source = "\n" * (block.line - 1) + block.text  # line numbers are the README's
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)


def run_command(line: str) -> tuple[int, str]:
    """One ``bluesky-analysis-store`` command line, as a shell would split and expand it,
    through ``main`` in this process: its exit status and output."""
    argv = [os.path.expanduser(word) for word in shlex.split(line, comments=True)]
    assert argv[0] == PROG
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = main(argv[1:])
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
    return status, f"$ {line}\n{stdout.getvalue()}{stderr.getvalue()}"


def make_scientists_files(home: Path) -> None:
    """``~/beamtime/frames/`` (three TIFF frames) and ``~/beamtime/fit.csv``, which the
    README's ``ingest`` example reads."""
    frames = home / "beamtime" / "frames"
    frames.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n in range(3):
        tifffile.imwrite(frames / f"frame_{n:03d}.tiff", rng.integers(0, 4000, (16, 16), "uint16"))
    (home / "beamtime" / "fit.csv").write_text("position,peak\n-1.0,0.5\n0.0,2.5\n1.0,0.75\n")


def follow(session: Session) -> None:
    """Run every runnable block in README order; a failed block's namespace runs no further."""
    broken: dict[str, int] = {}  # namespace -> line of the block that failed in it
    for block in RUN_BLOCKS:
        if block.how == "cli":
            outputs = session.cli_output.setdefault(block.line, [])
            for line in block.commands:
                expected = int(m.group(1)) if (m := _EXIT_STATUS.search(line)) else 0
                status, output = run_command(line)
                outputs.append(output)
                if status != expected:
                    session.failures[block.line] = (
                        f"exit status {status}, expected {expected}\n{output}"
                    )
                    break
            continue
        if block.namespace in broken:
            session.failures[block.line] = (
                f"not reached: the block at line {broken[block.namespace]} failed"
            )
            continue
        if block.namespace not in session.namespaces and block.namespace != block.section:
            session.failures[block.line] = f"continues {block.namespace!r}, which has not run"
            continue
        namespace = session.namespaces.setdefault(
            block.namespace, {"__name__": "__main__", "__builtins__": builtins}
        )
        try:
            run_python(block, namespace)
            session.after[block.line] = dict(namespace)
        except BaseException:  # noqa: BLE001 - any failure of the README's code is the report
            session.failures[block.line] = traceback.format_exc()
            broken[block.namespace] = block.line


def close_what_it_started(session: Session) -> None:
    """Close the README's callbacks (their workers) and stop its RunEngines' loops."""
    from bluesky import RunEngine

    values = [v for namespace in session.namespaces.values() for v in namespace.values()]
    for value in values:
        if isinstance(value, AnalysisStoreCallback):
            value.close(timeout=60)
    for value in values:
        if isinstance(value, RunEngine) and value.loop.is_running():
            value.loop.call_soon_threadsafe(value.loop.stop)
            value._th.join()
            value.loop.close()


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    folder = tmp_path_factory.mktemp("readme")
    make_scientists_files(folder / "home")
    followed = Session(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("HOME", str(folder / "home"))
        patch.setenv(STORE_ENV, str(folder / "analysis-store"))
        patch.setenv(DATA_ROOT_ENV, str(folder / "analysis-data"))
        patch.delenv(JOURNAL_ENV, raising=False)
        # As a user's: the store served by its folder's local server (watch needs it).
        patch.delenv("BLUESKY_ANALYSIS_STORE_SERVED", raising=False)
        try:
            follow(followed)
            yield followed
        finally:
            close_what_it_started(followed)


def namespace_of(session: Session, section: str) -> dict[str, Any]:
    """The names bound once the Python blocks of ``section`` (and what it continues) ran."""
    lines = [b.line for b in RUN_BLOCKS if b.section == section and b.how == PYTHON]
    assert lines, f"README has no Python block under {section!r}"
    failed = [line for line in lines if line in session.failures]
    assert not failed, f"README blocks at lines {failed} of {section!r} failed"
    return session.after[lines[-1]]


# --- the tests ----------------------------------------------------------------------------


def test_every_block_is_run_or_marked() -> None:
    unmarked = [
        f"README.md:{b.line}: {b.how}" for b in BLOCKS if b.how not in (PYTHON, "cli", "not run")
    ]
    assert not unmarked, "\n".join(unmarked)
    sections = [b.section for b in BLOCKS]
    for block in BLOCKS:
        if block.marker and block.marker[0] == "continues":
            assert block.language == PYTHON, f"README.md:{block.line}: only Python continues"
            earlier = sections[: BLOCKS.index(block)]
            assert block.namespace in earlier, (
                f"README.md:{block.line} continues {block.namespace!r}: no earlier section"
            )
    # The README does show code to run, and its live example is among it.
    assert any(b.section == LIVE_SECTION and b.how == PYTHON for b in BLOCKS)


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.id for b in RUN_BLOCKS])
def test_block_runs(session: Session, block: Block) -> None:
    assert block.line not in session.failures, (
        f"README.md:{block.line} ({block.section}):\n{session.failures[block.line]}"
    )


def test_live_example_saves_the_raw_run_and_reduces_every_frame(session: Session) -> None:
    live = namespace_of(session, LIVE_SECTION)
    store: AnalysisStore = live["store"]
    raw_uid = live["raw_uid"]
    raw = AnalysisStore.open(session.folder / "analysis-store")[raw_uid]  # read from disk
    assert raw.stop["exit_status"] == "success"
    frames = np.asarray(raw["primary"]["cam"].read())
    assert frames.shape == (21, 64, 64)
    child = live["run"]  # the README reads the raw run's only child, before later sections add some
    assert child.start["uid"] in store.children(raw_uid)
    assert child.start["parent_uids"] == [raw_uid]
    assert [c["name"] for c in child.start["provenance"]["code"]] == ["__main__:roi_sum"]
    assert child.stop["reduction"]["events_reduced"] == 21
    assert child.stop["reduction"]["events_failed"] == 0
    totals = np.asarray(child["primary"]["roi_total"].read())
    np.testing.assert_allclose(totals, frames[:, 24:40].sum(axis=(1, 2)))
    assert child["primary"]["profile"].shape == (21, 64)


def test_batch_example_saves_a_child_of_the_raw_run(session: Session) -> None:
    batch = namespace_of(session, BATCH_SECTION)
    store: AnalysisStore = batch["store"]
    child = store[batch["uid"]]
    assert child.start["parent_uids"] == [batch["raw_uid"]]
    assert child.start["sample"] == "LaB6"
    [expected_pattern, _] = batch["results"][0]
    np.testing.assert_array_equal(child["primary"]["pattern"].read()[0], expected_pattern)


def test_offline_example_reprocesses_ingests_and_reproduces(session: Session) -> None:
    offline = namespace_of(session, OFFLINE_SECTION)
    store: AnalysisStore = offline["store"]
    raw_uid = offline["raw_uid"]
    report = offline["report"]
    assert list(report.saved) == [raw_uid] and not report.failed
    assert report.saved[raw_uid] in store.children(raw_uid)
    ingested = store[offline["uid"]]
    files = [Path(f["path"]).name for f in ingested.start["provenance"]["files"]]
    assert sorted(files) == ["fit.csv", "frame_000.tiff", "frame_001.tiff", "frame_002.tiff"]
    reproduced = offline["reproduced"]
    assert reproduced.identical, reproduced
