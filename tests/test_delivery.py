"""Delivery from the journal to the store: a failed request never shifts or duplicates a
row, the stop is written only once what was read back equals the journal, and ``recover``
completes or closes every journal left behind, idempotently.

The failures are real: a TCP proxy in front of a real ``tiled serve`` process drops every
connection at the chosen document, as a network failure would.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _faults import API_KEY, CuttableProxy, TiledServer, record_outcome

from bluesky_analysis_store import AnalysisStore, compose_documents
from bluesky_analysis_store._delivery import Delivery, JournaledSink, deliver_documents
from bluesky_analysis_store._journal import RunJournal, read_journal
from bluesky_analysis_store._recovery import INTERRUPTED_REASON, recover
from bluesky_analysis_store._tiled_writing import FlushingTiledWriter

EVENTS = 5
DELIVERY_DEADLINE = 120.0  # seconds a delivery may take at most here, not a measured time


def derived_run(root: Path) -> list[tuple[str, dict]]:
    """A child run of EVENTS events: a variable-length ``peaks`` and a table ``spectrum``
    (Parquet, written first), a scalar ``y`` inline and a frame ``img`` in HDF5, all telling
    which event they belong to (``peaks`` holds i+1 values i, ``spectrum`` a column of i,
    ``img`` is all ``y``)."""
    data_dicts = [
        {"primary": {"peaks": np.full(i + 1, float(i)),
                     "spectrum": pd.DataFrame({"y": np.full(2, float(i))}),
                     "y": float(i), "img": np.full((4, 3), i, dtype=np.float32)}}
        for i in range(EVENTS)
    ]  # fmt: skip
    return list(
        compose_documents(
            data_dicts, {"purpose": "delivery test"}, {"img": "HDF5"},
            parents=[str(uuid.uuid4())], code=derived_run, root=str(root),
        )
    )  # fmt: skip


def assert_complete_and_aligned(store: AnalysisStore, uid: str, stop_uid: str) -> None:
    run = store[uid]
    assert run.metadata["stop"]["uid"] == stop_uid
    assert run.metadata["stop"]["num_events"] == {"primary": EVENTS}
    primary = store.read_stream(uid, "primary", ["seq_num", "y", "img", "peaks", "spectrum"])
    np.testing.assert_array_equal(primary["seq_num"], np.arange(1, EVENTS + 1))
    y = primary["y"]
    np.testing.assert_array_equal(y, np.arange(EVENTS, dtype=float))
    frames = primary["img"]
    assert frames.shape == (EVENTS, 4, 3)
    for i in range(EVENTS):
        assert (frames[i] == y[i]).all(), f"frame {i} is not the frame of event {i}"
    assert [peaks.tolist() for peaks in primary["peaks"]] == [[i] * (int(i) + 1) for i in y]
    spectrum = primary["spectrum"]
    assert spectrum["seq_num"].tolist() == [n for n in range(1, EVENTS + 1) for _ in (0, 1)]
    assert spectrum["y"].tolist() == [i for i in y for _ in (0, 1)]


# --- a real server behind a proxy ---------------------------------------------------------


@pytest.fixture(scope="module")
def fast_failing_client() -> Iterator[None]:
    """tiled's client retries a refused request for up to 45 s; delivery retries runs
    itself, so here a request fails at once."""
    import tiled.client.utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 1)
        yield


@pytest.fixture
def proxy(server: TiledServer) -> Iterator[CuttableProxy]:
    proxy = CuttableProxy(server.port)
    yield proxy
    proxy.cut()


@pytest.mark.slow
def test_a_failed_request_taints_only_its_run_and_it_is_delivered_again_whole(
    server, proxy, fast_failing_client, tmp_path
):
    direct = AnalysisStore.from_uri(server.uri, API_KEY, asset_root=server.assets)
    proxied = AnalysisStore.from_uri(proxy.uri, API_KEY, asset_root=server.assets)
    for cut_at in ("start", "descriptor", "stream_resource", "stream_datum", "event", "stop"):
        documents = derived_run(server.assets)
        uid, stop_uid = documents[0][1]["uid"], documents[-1][1]["uid"]
        delivery = Delivery(proxied, tmp_path / cut_at)
        sink = JournaledSink(delivery)
        cut = False
        for name, doc in documents:
            if name == cut_at and not cut:
                cut = True
                proxy.cut()
                if name != "stop":
                    sink(name, doc)
                    # Event rows and stream datums are buffered: this makes the request.
                    assert not delivery.flush(DELIVERY_DEADLINE), cut_at
                    proxy.restore()
                    continue
                sink(name, doc)
                assert not delivery.flush(DELIVERY_DEADLINE), cut_at
                proxy.restore()
                continue
            sink(name, doc)
        assert delivery.flush(DELIVERY_DEADLINE), cut_at
        assert delivery.healthy
        assert_complete_and_aligned(direct, uid, stop_uid)
        record_outcome(
            f"connection cut at the first {cut_at}", "connections dropped", EVENTS, EVENTS
        )
        assert not list((tmp_path / cut_at).iterdir()), "the journal of a delivered run stays"
        delivery.close(DELIVERY_DEADLINE)


@pytest.mark.slow
def test_a_store_that_is_down_settles_a_stopped_run_at_once(
    server, proxy, fast_failing_client, tmp_path
):
    """Whoever waits for the child run (the scan) is released once its stop is journaled
    and the store is known to fail; the run is delivered when the store is back."""
    direct = AnalysisStore.from_uri(server.uri, API_KEY, asset_root=server.assets)
    proxied = AnalysisStore.from_uri(proxy.uri, API_KEY, asset_root=server.assets)
    documents = derived_run(server.assets)
    delivery = Delivery(proxied, tmp_path)
    sink = JournaledSink(delivery)
    proxy.cut()
    settled = []
    for name, doc in documents:
        sink(name, doc)
    assert not delivery.flush(DELIVERY_DEADLINE)
    delivery.when_settled(documents[0][1]["uid"], lambda: settled.append(True))
    assert settled == [True]
    proxy.restore()
    assert delivery.flush(DELIVERY_DEADLINE)
    assert_complete_and_aligned(direct, documents[0][1]["uid"], documents[-1][1]["uid"])
    delivery.close(DELIVERY_DEADLINE)


@pytest.mark.slow
def test_close_leaves_what_the_store_did_not_take_in_the_journal(
    server, proxy, fast_failing_client, tmp_path
):
    proxied = AnalysisStore.from_uri(proxy.uri, API_KEY, asset_root=server.assets)
    direct = AnalysisStore.from_uri(server.uri, API_KEY, asset_root=server.assets)
    documents = derived_run(server.assets)
    delivery = Delivery(proxied, tmp_path)
    sink = JournaledSink(delivery)
    proxy.cut()
    for name, doc in documents:
        sink(name, doc)
    left = delivery.close(timeout=1.0)
    assert [p.name for p in left] == [f"{documents[0][1]['uid']}.journal"]
    assert len(read_journal(left[0]).documents) == len(documents)
    # Later, from the command line of another process, once the store answers again.
    result = subprocess.run(
        [sys.executable, "-m", "bluesky_analysis_store", "recover", "--store", server.uri,
         "--api-key", API_KEY, "--journal", str(tmp_path)],
        capture_output=True, text=True, timeout=DELIVERY_DEADLINE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "1 delivered" in result.stdout
    assert_complete_and_aligned(direct, documents[0][1]["uid"], documents[-1][1]["uid"])
    assert not left[0].exists()


# --- recover on an embedded store ----------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> AnalysisStore:
    return AnalysisStore.open(tmp_path_factory.mktemp("embedded"))


def journal_of(store: AnalysisStore, documents: list[tuple[str, dict]]) -> Path:
    journal = RunJournal(store.journal_folder, documents[0][1]["uid"])
    for name, doc in documents:
        journal.append(name, doc)
    journal.close()
    return journal.path


def test_recover_closes_a_run_without_stop_and_is_idempotent(embedded):
    documents = derived_run(Path(embedded.asset_root))
    uid = documents[0][1]["uid"]
    journal = journal_of(embedded, documents[:-1])  # killed before its stop
    # ...and half of it reached the store before: recover replaces it, never appends.
    writer = FlushingTiledWriter(embedded.client, flush_interval=None)
    for name, doc in documents[: len(documents) // 2]:
        writer(name, doc)
    writer.flush()

    report = recover(embedded)
    assert report.delivered == [uid] and report.closed == [uid] and report.ok
    stop = embedded[uid].metadata["stop"]
    assert stop["exit_status"] == "fail" and stop["reason"] == INTERRUPTED_REASON
    assert stop["num_events"] == {"primary": EVENTS}
    assert_complete_and_aligned(embedded, uid, stop["uid"])
    assert not journal.exists()

    again = recover(embedded)
    assert not again.delivered and not again.failed
    assert embedded[uid].metadata["stop"]["uid"] == stop["uid"]


def test_recover_after_a_crash_between_the_stop_and_removing_the_journal(embedded):
    documents = derived_run(Path(embedded.asset_root))
    deliver_documents(embedded, documents)
    journal = journal_of(embedded, documents)
    report = recover(embedded)
    assert report.delivered == [documents[0][1]["uid"]] and not report.closed
    assert_complete_and_aligned(embedded, documents[0][1]["uid"], documents[-1][1]["uid"])
    assert not journal.exists()


def test_recover_leaves_a_journal_that_a_running_process_holds(embedded):
    documents = derived_run(Path(embedded.asset_root))
    uid = documents[0][1]["uid"]
    journal_of(embedded, documents[:2])
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time\nfrom bluesky_analysis_store._journal import RunJournal\n"
         f"j = RunJournal({str(embedded.journal_folder)!r}, {uid!r})\n"
         "print('held', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        report = recover(embedded)
        assert uid in report.live and uid not in report.delivered
        assert uid not in embedded
    finally:
        holder.kill()
        holder.wait()
    assert uid in recover(embedded).delivered
