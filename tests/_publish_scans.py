"""An acquisition process that publishes its scans over 0MQ, for tests/test_remote_worker.py:
``python _publish_scans.py PROXY_IN SAVE_FOLDER ROOT_AS``.

A RunEngine with an ophyd.sim motor and the spot camera (frames saved as .npy files under
SAVE_FOLDER, legacy resource/datum), publishing with ``Publisher(PROXY_IN,
serializer=zmq_dumps)``. Its resource documents name ROOT_AS as their root, as an
acquisition machine would name its own mount of the files: the worker finds them through
``--root-map ROOT_AS=...``.

It prints ``ready`` once it can take commands, one a line on stdin:

- ``ping TAG``: publish a message named ``ping-TAG`` (no document: the worker logs and
  skips it, which tells the test that what this process publishes reaches the worker);
- ``scan N``: scan the motor over N points from -1 to 1; prints ``raw UID``, ``event SEQ
  POSITION`` for each event and ``done UID``;
- ``endless``: count the camera every 0.1 s until the line ``end`` comes (prints as scan);
- ``exit``: close the publisher and exit.
"""

from __future__ import annotations

import json
import queue
import sys
import threading

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky import RunEngine
from bluesky.callbacks.zmq import Publisher
from bluesky.plans import scan
from ophyd.sim import SynAxis

from bluesky_analysis_store import zmq_dumps
from bluesky_analysis_store.sim import spot_camera

FRAME_SHAPE = (8, 8)


def main() -> None:
    proxy_in, save_folder, root_as = sys.argv[1:4]
    motor = SynAxis(name="motor")
    cam = spot_camera(motor, save_folder, shape=FRAME_SHAPE)
    publisher = Publisher(proxy_in, serializer=zmq_dumps)
    sending = threading.Lock()  # a 0MQ socket is not thread-safe; pings come from stdin's

    def publish(name: str, doc: dict) -> None:
        if name == "resource" and doc["root"] == save_folder:
            doc = {**doc, "root": root_as}
        with sending:
            publisher(name, doc)

    def tell(name: str, doc: dict) -> None:
        if name == "start":
            print("raw", doc["uid"], flush=True)
        elif name == "event":
            print("event", doc["seq_num"], json.dumps(doc["data"]["motor"]), flush=True)
        elif name == "stop":
            print("done", doc["run_start"], flush=True)

    RE = RunEngine({})  # noqa: N806
    RE.subscribe(publish)
    RE.subscribe(tell)

    lines: queue.Queue[str] = queue.Queue()
    end = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            if command == "end":
                end.set()
            elif command == "ping":  # answered also while a scan runs
                with sending:
                    publisher(f"ping-{argument}", {})
            else:
                lines.put(line.strip())
        lines.put("exit")

    threading.Thread(target=read_stdin, daemon=True).start()

    @bpp.stage_decorator([cam])
    @bpp.run_decorator(md={"plan_name": "endless"})
    def endless():
        while not end.is_set():
            yield from bps.trigger_and_read([cam, motor])
            yield from bps.sleep(0.1)

    print("ready", flush=True)
    while True:
        command, _, argument = lines.get().partition(" ")
        if command == "scan":
            RE(scan([cam], motor, -1, 1, int(argument)))
        elif command == "endless":
            end.clear()
            RE(endless())
        elif command == "exit":
            publisher.close()
            return


if __name__ == "__main__":
    main()
