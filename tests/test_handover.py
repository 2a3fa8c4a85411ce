"""The queue between the RunEngine's thread and a worker, and waiting for a run's child."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from bluesky_analysis_store._handover import DocumentQueue, RunWaiter, array_bytes, wait_async

# Generous bounds for things that happen at once when they work: reaching one means a hang.
HANG = 30.0


def put_in_thread(queue: DocumentQueue, item: object, size: int) -> threading.Thread:
    thread = threading.Thread(target=queue.put, args=(item, size), daemon=True)
    thread.start()
    return thread


def test_one_document_always_fits_even_above_the_byte_bound():
    queue = DocumentQueue(max_items=10, max_bytes=100)
    assert queue.put("big", 1000) is True
    assert [item for item, _ in queue.get_batch(0, 0)] == ["big"]


def test_a_put_waits_until_the_consumer_releases_bytes():
    queue = DocumentQueue(max_items=10, max_bytes=100)
    queue.put("first", 80)
    waiting = put_in_thread(queue, "second", 80)
    waiting.join(0.3)
    assert waiting.is_alive(), "the second item did not wait for room"

    batch = queue.get_batch(0, 0)  # taken, but its bytes are still being worked on
    waiting.join(0.3)
    assert waiting.is_alive(), "bytes were released before done()"
    queue.done(sum(size for _, size in batch))
    waiting.join(HANG)
    assert not waiting.is_alive()
    assert [item for item, _ in queue.get_batch(0, 0)] == ["second"]


def test_a_put_waits_while_the_queue_holds_max_items():
    queue = DocumentQueue(max_items=2, max_bytes=100)
    queue.put("a")
    queue.put("b")
    waiting = put_in_thread(queue, "c", 0)
    waiting.join(0.3)
    assert waiting.is_alive()
    assert [item for item, _ in queue.get_batch(0, 0)] == ["a", "b"]
    waiting.join(HANG)
    assert not waiting.is_alive()
    assert len(queue) == 1


def test_a_full_queue_refuses_when_the_consumer_is_gone():
    queue = DocumentQueue(max_items=1, max_bytes=100)
    queue.put("a")
    assert queue.put("b", consumer_alive=lambda: False) is False
    assert len(queue) == 1


def test_an_empty_queue_gives_an_empty_batch_after_the_timeout():
    assert DocumentQueue(10, 100).get_batch(0.05, 0) == []


def test_an_urgent_item_ends_the_gathering_at_once():
    queue = DocumentQueue(max_items=10, max_bytes=100)
    queue.put("event")
    batches: list[list[object]] = []
    consumer = threading.Thread(
        target=lambda: batches.append([item for item, _ in queue.get_batch(0, gather=HANG)]),
        daemon=True,
    )
    consumer.start()
    consumer.join(0.2)
    assert consumer.is_alive(), "the consumer did not gather"
    queue.put("stop", urgent=True)
    consumer.join(HANG / 2)
    assert not consumer.is_alive(), "the urgent item did not end the gathering"
    assert batches == [["event", "stop"]]


def test_run_waiter():
    waiter = RunWaiter()
    assert waiter.wait("never expected", timeout=0) is True  # nothing to wait for
    waiter.expect("uid")
    assert waiter.wait("uid", timeout=0.05) is False
    waiter.expect("uid")
    threading.Timer(0.05, waiter.finished, args=("uid",)).start()
    assert waiter.wait("uid", timeout=HANG) is True
    waiter.expect("lost")
    assert waiter.wait("lost", timeout=HANG, worker_alive=lambda: False) is False


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"data": {"x": 1.0, "img": np.zeros((4, 4), np.uint16)}}, 32),
        ({"data": {"img": [np.zeros(3, np.float64), np.zeros(2, np.float64)]}}, 40),
        ({"uid": "no data"}, 0),
    ],
    ids=["event", "event-page", "no-data"],
)
def test_array_bytes(doc, expected):
    assert array_bytes(doc) == expected


# --- waiting on an event loop ---------------------------------------------------------------


def test_a_lost_run_stays_lost_and_a_late_finish_does_not_change_it():
    waiter = RunWaiter()
    waiter.expect("saved")
    waiter.expect("lost")
    waiter.finished("saved")
    assert waiter.abandon() == ("lost",)
    waiter.finished("lost")  # a later process reports the stop of a run it never had
    assert waiter.outcome("saved") is True
    assert waiter.outcome("lost") is False
    assert waiter.outcome("never expected") is True
    assert waiter.wait("lost", timeout=HANG) is False
    assert waiter.pending() == ()


def test_wait_async_returns_when_the_run_is_finished_from_another_thread():
    waiter = RunWaiter()
    waiter.expect("uid")
    threading.Timer(0.05, waiter.finished, args=("uid",)).start()
    lost, late = asyncio.run(wait_async(waiter, ["uid"], timeout=HANG))
    assert (lost, late) == ([], [])
    assert waiter.outcome("uid") is True


def test_wait_async_reports_lost_and_late_runs():
    waiter = RunWaiter()
    waiter.expect("late")
    assert asyncio.run(wait_async(waiter, ["late"], timeout=0.05)) == ([], ["late"])
    waiter.expect("lost")
    threading.Timer(0.05, waiter.abandon).start()
    assert asyncio.run(wait_async(waiter, ["lost"], timeout=HANG)) == (["lost"], [])
    assert waiter.outcome("late") is False  # every run expected was lost with the worker
    waiter.expect("worker gone")
    gone = asyncio.run(wait_async(waiter, ["worker gone"], None, worker_alive=lambda: False))
    assert gone == (["worker gone"], [])


def test_wait_async_can_be_cancelled_while_the_loop_goes_on():
    waiter = RunWaiter()
    waiter.expect("never")

    async def main() -> int:
        task = asyncio.ensure_future(wait_async(waiter, ["never"], timeout=None))
        ticks = 0
        while ticks < 5:  # the loop runs while the task waits
            await asyncio.sleep(0.01)
            ticks += 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return ticks

    assert asyncio.run(main()) == 5
    assert waiter.outcome("never") is None  # still expected: only the waiting stopped
