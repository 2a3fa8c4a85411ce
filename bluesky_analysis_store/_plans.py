"""The plan side of the live callback: waiting for derived data without blocking the RunEngine.

bluesky calls a subscribed callback on the RunEngine's event loop, so a callback that waited
there for its child run would freeze the loop (device status callbacks, pause requests and
suspenders with it). Instead the plan waits: :func:`wait_for_derived` yields bluesky's
``wait_for`` message with an awaitable that polls, on the loop, whether the child runs are
saved. The RunEngine treats it like any other message: Ctrl-C pauses it (resuming waits
again), an abort or halt stops the waiting, and nothing else waits meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from bluesky.preprocessors import plan_mutator
from bluesky.utils import Msg, make_decorator

if TYPE_CHECKING:
    from ._callback import AnalysisStoreCallback

__all__ = ["wait_for_derived", "wait_for_derived_decorator", "wait_for_derived_wrapper"]

MsgGenerator = Generator[Msg, Any, Any]


def wait_for_derived(
    callback: AnalysisStoreCallback, timeout: float | None = None
) -> Generator[Msg, Any, bool]:
    """Wait until the child runs of every raw run ``callback`` has seen stop are saved.

    ``timeout`` defaults to the callback's ``stop_timeout`` (None there: as long as it
    takes). Past it the plan goes on, with one warning; the derived data is still being
    saved in the background. Returns True if every child run was saved (False if one timed
    out or was lost with its worker). The RunEngine's loop is not blocked meanwhile.
    """
    tasks: list[asyncio.Task[bool]] = []

    def start() -> asyncio.Task[bool]:
        # Called on the loop, again if the RunEngine replays the message after a pause:
        # asyncio.wait leaves a cancelled caller's tasks running, so the old one goes here.
        for task in tasks:
            task.cancel()
        tasks[:] = [asyncio.ensure_future(callback.derived_saved(timeout))]
        return tasks[0]

    # Resuming after a pause replays the messages since the last checkpoint: without this
    # one, those of the run that just closed.
    yield Msg("checkpoint")
    try:
        # The response is not used: after a pause the RunEngine replays this message and
        # sends back something else. The last task made is the one that was waited for.
        yield Msg("wait_for", None, [start])
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()  # an abort, a halt or an error ended the wait
    return bool(tasks and not tasks[-1].cancelled() and tasks[-1].result())


def wait_for_derived_wrapper(
    plan: MsgGenerator, callback: AnalysisStoreCallback, timeout: float | None = None
) -> MsgGenerator:
    """Run ``plan``, waiting for ``callback``'s derived data after each run it closes.

    The wait follows the ``close_run`` message (the raw stop document is out then), also
    when the run closes because the plan failed or was aborted.
    """

    def after_close_run(msg: Msg) -> tuple[None, MsgGenerator | None]:
        if msg.command == "close_run":
            return None, wait_for_derived(callback, timeout)
        return None, None

    return (yield from plan_mutator(plan, after_close_run))


wait_for_derived_decorator: Callable[..., Any] = make_decorator(wait_for_derived_wrapper)
wait_for_derived_decorator.__doc__ = """Decorator form of :func:`wait_for_derived_wrapper`:
``@wait_for_derived_decorator(callback)`` on a plan function."""
