"""bench/fsdp_without_dp.py end to end at the smoke size: both world sizes are launched and a
ratio printed for each (the numbers themselves are the benchmark's, not the test's)."""

import os
import re
import sys

import pytest

from tests.launchers import run


@pytest.mark.slow
def test_smoke_run_prints_a_ratio_per_world_size(tmp_path):
    done = run([sys.executable, "bench/fsdp_without_dp.py", "--model", "smoke", "--out", str(tmp_path / "out")],
               timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = re.findall(r"(\d) process\(es\):\s+(-?\d+) MB\s+ratio to one (\d+\.\d+)", done.stdout)
    assert [r[0] for r in rows] == ["1", "2"], done.stdout
    assert rows[0][2] == "1.000" and float(rows[1][2]) > 0
