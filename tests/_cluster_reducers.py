"""A reducer for the cluster tests: it holds one raw run's first reduction in its worker,
so that the test kills that worker in the middle of a run, not between runs.

It lives in an importable module of its own (Dask's workers import it by name). It
derives nothing: the child data come from the other reducers of the batch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from bluesky_analysis_store import Reducer

HOLD_FOLDER_ENV = "BAS_TEST_HOLD_FOLDER"
"""The folder of the hold files; unset, nothing is held."""

HOLD_KEY = "hold_reduction"
"""A raw start with this key true is held at its second event, the first time only."""

# Long enough for the test to see its file and kill the worker; a test that fails to kill
# it is not left hanging.
_HOLD_SECONDS = 60.0


def hold_file(folder: str, raw_uid: str) -> str:
    """Where the holding worker writes its pid (it exists from the first attempt on)."""
    return os.path.join(folder, f"{raw_uid}.pid")


class HoldOnce(Reducer):
    """At the second event of a run marked ``hold_reduction``: write the worker's pid to
    the run's hold file and wait, unless the file exists (a retry, or a later batch)."""

    def start(self, doc: Mapping[str, Any]) -> None:
        folder = os.environ.get(HOLD_FOLDER_ENV)
        self._path = hold_file(folder, doc["uid"]) if folder and doc.get(HOLD_KEY) else None

    def event(
        self, stream: str, data: Mapping[str, Any], doc: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        if self._path is None or doc["seq_num"] != 2 or os.path.exists(self._path):
            return None
        with open(self._path, "x") as file:
            file.write(str(os.getpid()))
        deadline = time.monotonic() + _HOLD_SECONDS
        while time.monotonic() < deadline:
            time.sleep(0.05)
        return None
