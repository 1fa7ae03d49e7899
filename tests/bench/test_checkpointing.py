"""bench/checkpointing.py end to end at the smoke size: both clipping modes with and without
checkpointing measured per length, and the per-sample norms equal in all four (the script exits
non-zero otherwise)."""

import re
import sys

import pytest

from tests.launchers import run


@pytest.mark.slow
def test_smoke_run_measures_every_mode_and_setting_per_length():
    done = run([sys.executable, "bench/checkpointing.py", "--size", "smoke", "--lengths", "32", "64"], timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = re.findall(r"^\| (\d+) \| (\w+) \| (on|off) \| (\d+) \| ([\d.]+) \|", done.stdout, re.M)
    settings = [(m, c) for m in ("book_keeping", "two_pass") for c in ("off", "on")]
    assert [r[:3] for r in rows] == [(t, m, c) for t in ("32", "64") for m, c in settings]
    for i in range(0, 8, 4):  # each ratio is its row's peak over the length's first row
        base = max(int(rows[i][3]), 1)
        assert all(float(r[4]) == pytest.approx(int(r[3]) / base, abs=0.006) for r in rows[i:i + 4])
