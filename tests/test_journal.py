"""The journal: records come back as they went in, a crash's cut-short line is dropped, and
a journal is owned by one process at a time."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from bluesky_analysis_store._journal import (
    JournalError,
    RunJournal,
    journal_paths,
    read_journal,
)


def test_documents_come_back_with_their_types(tmp_path: Path) -> None:
    uid = str(uuid.uuid4())
    journal = RunJournal(tmp_path, uid)
    doc = {
        "uid": uid,
        "data": {
            "frame": np.arange(6, dtype=np.uint16).reshape(2, 3),
            "scalar": np.float32(0.1),
            "nan": float("nan"),
            "text": "é",
            "n": 2**70,
        },
    }
    assert journal.append("start", {"uid": uid, "time": 1.0}) == 0
    assert journal.append("event", doc) == 1
    journal.close()
    contents = read_journal(journal.path)
    assert [name for name, _ in contents.documents] == ["start", "event"]
    data = contents.documents[1][1]["data"]
    assert data["frame"].dtype == np.uint16 and data["frame"].shape == (2, 3)
    np.testing.assert_array_equal(data["frame"], doc["data"]["frame"])
    assert data["frame"].flags.writeable
    assert type(data["scalar"]) is np.float32 and data["scalar"] == np.float32(0.1)
    assert np.isnan(data["nan"]) and data["text"] == "é" and data["n"] == 2**70
    assert not contents.truncated and contents.unreadable is None


def test_a_line_cut_short_by_a_crash_ends_the_journal(tmp_path: Path) -> None:
    uid = str(uuid.uuid4())
    journal = RunJournal(tmp_path, uid)
    journal.append("start", {"uid": uid})
    journal.append("event", {"seq_num": 1})
    journal.close()
    with open(journal.path, "ab") as file:
        file.write(b'["event",{"seq_n')
    contents = read_journal(journal.path)
    assert len(contents.documents) == 2 and contents.truncated
    assert contents.unreadable is None


def test_a_damaged_line_in_the_middle_is_reported(tmp_path: Path) -> None:
    path = tmp_path / f"{uuid.uuid4()}.journal"
    path.write_bytes(b'["start",{"uid":"x"}]\nnot json\n["stop",{}]\n')
    contents = read_journal(path)
    assert len(contents.documents) == 1 and contents.unreadable.startswith("line 2")


def test_a_journal_is_owned_by_one_process_at_a_time(tmp_path: Path) -> None:
    uid = str(uuid.uuid4())
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from bluesky_analysis_store._journal import RunJournal\n"
            f"j = RunJournal({str(tmp_path)!r}, {uid!r})\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        path = tmp_path / f"{uid}.journal"
        assert RunJournal.take_over(path) is None
        with pytest.raises(JournalError, match="in use"):
            RunJournal(tmp_path, uid)
    finally:
        holder.kill()  # the kernel releases the lock with the process
        holder.wait()
    taken = RunJournal.take_over(tmp_path / f"{uid}.journal")
    assert taken is not None
    taken.close()


def test_only_files_named_by_a_run_uid_are_journals(tmp_path: Path) -> None:
    uid = str(uuid.uuid4())
    RunJournal(tmp_path, uid).close()
    (tmp_path / "notes.journal").write_text("x")
    (tmp_path / "../outside.journal").write_text("x")
    (tmp_path / f"{uuid.uuid4()}.journal").symlink_to(tmp_path / "../outside.journal")
    assert [p.name for p in journal_paths(tmp_path)] == [f"{uid}.journal"]
    with pytest.raises(JournalError, match="run uid"):
        RunJournal(tmp_path, "../../escape")
