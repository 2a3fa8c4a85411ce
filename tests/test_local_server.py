"""The local store server: one process per embedded store folder, started on demand.

Real server processes on real folders: started by ``AnalysisStore.open``, shared by other
processes, killed with SIGKILL, left idle, replaced; a request without the folder's key is
refused.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from bluesky_analysis_store import AnalysisStore
from bluesky_analysis_store._local_server import is_alive, read_server_info, stop_server
from bluesky_analysis_store.cli import main


def _reduce(data):  # the code named in the runs saved here
    return data


def _save(store: AnalysisStore, value: float, **md: object) -> str:
    return store.save(
        [{"primary": {"x": value, "image": np.full((4, 4), value)}}],
        {"purpose": "local server test", **md},
        strict=False,
    )


def _wait_until_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("served") / "store"
    yield path
    stop_server(path)


@pytest.fixture(scope="module")
def served(folder: Path) -> AnalysisStore:
    return AnalysisStore.open(folder, served=True)


def test_open_starts_a_server_that_other_processes_reuse(served: AnalysisStore, folder: Path):
    uid = _save(served, 1.0)
    info = read_server_info(folder)
    assert info is not None and info.uri.startswith("http://127.0.0.1:")
    script = (
        "import json, sys\n"
        "from bluesky_analysis_store import AnalysisStore\n"
        "store = AnalysisStore.open(sys.argv[1], served=True)\n"
        "print(json.dumps({'has': sys.argv[2] in store, 'heavy': 'tiled.catalog' in sys.modules}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder), uid],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(result.stdout) == {"has": True, "heavy": False}
    assert read_server_info(folder) == info  # the same server answered


def test_what_the_server_saved_reads_back_in_process(served: AnalysisStore, folder: Path):
    uid = _save(served, 2.5)
    in_process = AnalysisStore.open(folder, served=False)
    primary = in_process.read_stream(uid, "primary", ["x", "image"])
    assert primary["x"].tolist() == [2.5]
    assert np.array_equal(primary["image"][0], np.full((4, 4), 2.5))
    assert served[uid]["primary"]["x"].read().tolist() == [2.5]


def test_served_and_in_process_writers_take_turns(served: AnalysisStore, folder: Path):
    in_process = AnalysisStore.open(folder, served=False)
    saved: list[str] = []
    errors: list[BaseException] = []

    def save_many(store: AnalysisStore, offset: float) -> None:
        try:
            for i in range(3):
                saved.append(_save(store, offset + i))
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [
        threading.Thread(target=save_many, args=(served, 10.0)),
        threading.Thread(target=save_many, args=(in_process, 20.0)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors
    assert len(saved) == 6
    for uid in saved:
        assert len(served[uid]["primary"]["x"].read()) == 1


def test_the_server_refuses_requests_without_the_folder_key(served: AnalysisStore, folder: Path):
    info = read_server_info(folder)
    assert info is not None
    key = (folder / "server.key").read_text().strip()
    assert stat.S_IMODE(os.stat(folder / "server.key").st_mode) == 0o600
    with httpx.Client(trust_env=False) as http:
        refused = http.get(f"{info.uri}/metadata/")
        assert refused.status_code == 401
        wrong = http.get(f"{info.uri}/metadata/", headers={"Authorization": "Apikey 0123abcd"})
        assert wrong.status_code == 401
        allowed = http.get(f"{info.uri}/metadata/", headers={"Authorization": f"Apikey {key}"})
        assert allowed.status_code == 200


def test_a_pickled_served_store_opens_the_folder_served_again(served: AnalysisStore):
    copy = pickle.loads(pickle.dumps(served))
    uid = _save(copy, 3.0)
    assert uid in served


def test_a_killed_server_is_replaced_on_the_next_request(served: AnalysisStore, folder: Path):
    before = read_server_info(folder)
    assert before is not None
    uid = _save(served, 4.0)
    os.kill(before.pid, signal.SIGKILL)
    assert _wait_until_gone(before.pid, 10)
    # The same store object goes on: its next request starts a new server.
    second = _save(served, 5.0)
    after = read_server_info(folder)
    assert after is not None and after.pid != before.pid
    assert uid in served and second in served
    assert served[second]["primary"]["x"].read().tolist() == [5.0]


def test_the_command_line_goes_through_the_server(
    served: AnalysisStore, folder: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    monkeypatch.delenv("BLUESKY_ANALYSIS_STORE_SERVED", raising=False)
    uid = _save(served, 6.0, sample="seen by ls")
    pid = read_server_info(folder).pid  # type: ignore[union-attr]
    assert main(["--store", str(folder), "ls"]) == 0
    assert uid in capsys.readouterr().out
    assert read_server_info(folder).pid == pid  # type: ignore[union-attr]


def test_more_readable_folders_start_a_server_that_may_read_them(
    served: AnalysisStore, folder: Path, tmp_path: Path
):
    before = read_server_info(folder)
    assert before is not None
    raw = tmp_path / "raw"
    raw.mkdir()
    wider = AnalysisStore.open(folder, served=True, readable=[raw])
    after = read_server_info(folder)
    assert after is not None and after.pid != before.pid
    assert str(raw) in after.readable
    # The replaced server stops once its clients are idle; the old store object goes on.
    assert _wait_until_gone(before.pid, 60)
    uid = _save(served, 7.0)
    assert uid in wider


@pytest.mark.slow
def test_an_idle_server_stops_and_a_deleted_catalog_stops_its_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("BLUESKY_ANALYSIS_STORE_IDLE", "2")
    idle = tmp_path / "idle"
    AnalysisStore.open(idle, served=True)
    info = read_server_info(idle)
    assert info is not None
    assert _wait_until_gone(info.pid, 60)
    assert read_server_info(idle) is None  # it removed its server.json

    monkeypatch.setenv("BLUESKY_ANALYSIS_STORE_IDLE", "600")
    doomed = tmp_path / "doomed"
    AnalysisStore.open(doomed, served=True)
    info = read_server_info(doomed)
    assert info is not None
    (doomed / "catalog.db").unlink()
    assert _wait_until_gone(info.pid, 60)
