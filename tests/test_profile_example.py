"""The IPython profile under profile_examples/ starts, scans, reduces live, plots the derived
value against the motor live and prints one summary line per scan."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from _helpers import users_environment

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
    "child": child.start["uid"],
    "scan_id": child.start["parent_scan_id"],
    "plot_x": [float(x) for x in roi_plot.current_line.get_xdata()],
    "plot_y": [float(y) for y in roi_plot.current_line.get_ydata()],
}))
"""


def test_profile_reduces_a_scan_live(tmp_path):
    ipython = Path(sys.executable).with_name("ipython")
    # A copy, so that IPython's history and logs stay out of the checkout.
    profile = shutil.copytree(PROFILE / "startup", tmp_path / "profile" / "startup").parent
    env = users_environment(BLUESKY_ANALYSIS_STORE=str(tmp_path / "store"), MPLBACKEND="Agg")
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
    # The live plot: the derived value against the parent's motor, every point of the scan.
    assert found["plot_x"] == [-3.0, -1.5, 0.0, 1.5, 3.0]
    assert found["plot_y"] == found["roi_total"]
    # One summary line, on stderr: the session's output stays the session's.
    summary = (
        f"derived run {found['child'][:8]} of scan {found['scan_id']} (raw {found['raw'][:8]}): "
        f"5 events reduced, 0 failed; saved in {tmp_path / 'store'}"
    )
    assert result.stderr.splitlines().count(summary) == 1, result.stderr[-3000:]
    assert summary not in result.stdout
