"""``replay_run``: a run saved in the store, given back as the documents the RunEngine emitted.

The run is taken by a real RunEngine into a real embedded store; its frames are NPY files
(legacy ``resource``/``datum``). What the RunEngine emitted is recorded beside it, and the
frames are loaded from those documents with event-model's ``Filler``, independently of tiled.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from bluesky.plans import count  # noqa: E402
from event_model import Filler  # noqa: E402
from ophyd.sim import NumpySeqHandler  # noqa: E402

from _live import dark_then_positions  # noqa: E402
from bluesky_analysis_store._replay import count_events, replay_run  # noqa: E402

# The RunEngine, the devices and the module's store are fixtures of conftest.py.
pytestmark = pytest.mark.usefixtures("runs_saved_in_store")


@pytest.fixture
def cam_shape() -> tuple[int, int]:
    """Small frames, and not square: a transposed frame would be caught."""
    return (12, 10)


def emitted_events(documents: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """``(stream, event with its frames loaded)`` in emission order, filled by event-model."""
    streams = {}
    filled = []
    with Filler({"NPY_SEQ": NumpySeqHandler}, inplace=False) as filler:
        for name, doc in documents:
            if name == "descriptor":
                streams[doc["uid"]] = doc["name"]
            _, out = filler(name, doc)
            if name == "event":
                filled.append((streams[doc["descriptor"]], out))
    return filled


def test_replay_gives_the_run_in_time_order_with_the_frames_loaded(RE, store, cam, motor, recorder):
    # 20 primary events, more than a replay block, with a dark frame before the 1st, 8th
    # and 15th: the streams interleave in time throughout the run.
    positions = [float(x) for x in np.linspace(-4, 4, 20)]
    (uid,) = RE(dark_then_positions(cam, motor, positions, darks={0: -4.5, 7: 0.0, 14: 4.5}))
    original = recorder.run(uid)
    expected = emitted_events(original)
    assert len(expected) == 23

    replayed = list(replay_run(store[uid]))

    names = [name for name, _ in replayed]
    assert names == ["start", "descriptor", "descriptor"] + ["event"] * 23 + ["stop"]
    assert replayed[0][1] == dict(original[0][1])
    assert replayed[-1][1] == [doc for name, doc in original if name == "stop"][0]
    descriptors = {doc["uid"]: doc for name, doc in original if name == "descriptor"}
    replayed_descriptors = [doc for name, doc in replayed if name == "descriptor"]
    assert sorted(d["uid"] for d in replayed_descriptors) == sorted(descriptors)
    streams = {d["uid"]: d["name"] for d in replayed_descriptors}
    assert sorted(streams.values()) == ["dark", "primary"]
    for descriptor in replayed_descriptors:
        assert descriptor["run_start"] == uid
        assert descriptor["data_keys"].keys() == descriptors[descriptor["uid"]]["data_keys"].keys()

    events = [doc for name, doc in replayed if name == "event"]
    # Emission order: dark before the primary events it precedes, across the whole run.
    assert [(streams[e["descriptor"]], e["seq_num"]) for e in events] == [
        (stream, e["seq_num"]) for stream, e in expected
    ]
    first = [(stream, e["seq_num"]) for stream, e in expected][:3]
    assert first == [("dark", 1), ("primary", 1), ("primary", 2)]
    times = [e["time"] for e in events]
    assert times == sorted(times)
    for event, (stream, raw) in zip(events, expected):
        where = (stream, raw["seq_num"])
        assert event["descriptor"] == raw["descriptor"], where
        assert event["time"] == raw["time"], where
        # tiled keeps no timestamps of external keys (the frames): those are not compared.
        assert event["timestamps"].keys() == raw["timestamps"].keys(), where
        for key in ("motor", "motor_setpoint"):
            assert event["timestamps"][key] == raw["timestamps"][key], (where, key)
        assert event["data"].keys() == raw["data"].keys() == {"cam", "motor", "motor_setpoint"}
        assert event["filled"] == {"cam": True}, where
        frame = event["data"]["cam"]
        assert isinstance(frame, np.ndarray), where
        assert frame.dtype == raw["data"]["cam"].dtype == np.uint16, where
        assert frame.shape == raw["data"]["cam"].shape == (12, 10), where
        np.testing.assert_array_equal(frame, raw["data"]["cam"], err_msg=str(where))
        assert event["data"]["motor"] == raw["data"]["motor"], where
        assert event["data"]["motor_setpoint"] == raw["data"]["motor_setpoint"], where
    # The frames differ from one another, so a frame of another event would have been caught.
    assert len({e["data"]["cam"].tobytes() for e in events}) == 23

    assert count_events(store[uid]) == 23


def test_count_events_counts_every_stream(RE, store, cam, motor):
    (one_stream,) = RE(count([cam], num=4))
    (two_streams,) = RE(dark_then_positions(cam, motor, [1.0, 2.0], darks={0: 0.0, 1: 3.0}))
    assert count_events(store[one_stream]) == 4
    assert count_events(store[two_streams]) == 4
    replayed = list(replay_run(store[one_stream]))
    assert [name for name, _ in replayed] == ["start", "descriptor"] + ["event"] * 4 + ["stop"]
    assert [doc["seq_num"] for name, doc in replayed if name == "event"] == [1, 2, 3, 4]
