"""The IPython profile under profile_examples/ starts, scans, and reduces live."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROFILE = Path(__file__).parents[1] / "profile_examples" / "profile_analysis"

SESSION = """
uid, = RE(scan([cam], motor, -3, 3, 5))  # returns once the child run is saved
child = store[store.children(uid)[0]]
import json
print("RESULT " + json.dumps({
    "raw": uid,
    "parents": child.start["parent_uids"],
    "code": child.start["provenance"]["code"][0]["name"],
    "version": child.start["provenance"]["code"][0]["version"],
    "roi_total": child["primary"]["roi_total"].read().tolist(),
    "profile_shape": list(child["primary"]["roi_profile"].shape),
}))
"""


def test_profile_reduces_a_scan_live(tmp_path):
    ipython = Path(sys.executable).with_name("ipython")
    # A copy, so that IPython's history and logs stay out of the checkout.
    profile = shutil.copytree(PROFILE / "startup", tmp_path / "profile" / "startup").parent
    env = {**os.environ, "BLUESKY_ANALYSIS_STORE": str(tmp_path / "store")}
    result = subprocess.run(
        [str(ipython), f"--profile-dir={profile}", "--no-banner", "-c", SESSION],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    found = json.loads(line.removeprefix("RESULT "))
    assert found["parents"] == [found["raw"]]
    assert found["code"] == "__main__:roi_sum"
    # Code from a profile is identified by its checkout's commit or its file's sha256.
    assert found["version"]
    assert len(found["roi_total"]) == 5
    assert all(total > 0 for total in found["roi_total"])
    assert found["profile_shape"] == [5, 64]
