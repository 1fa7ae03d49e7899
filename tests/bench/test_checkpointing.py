"""bench/checkpointing.py end to end at the smoke size: both settings measured per length, and
the per-sample norms equal with and without checkpointing (the script exits non-zero otherwise)."""

import re
import sys

import pytest

from tests.launchers import run


@pytest.mark.slow
def test_smoke_run_measures_both_settings_per_length():
    done = run([sys.executable, "bench/checkpointing.py", "--size", "smoke", "--lengths", "32", "64"], timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \|", done.stdout, re.M)
    assert [r[0] for r in rows] == ["32", "64"]
    assert all(int(r[1]) >= 0 and int(r[2]) >= 0 for r in rows)
