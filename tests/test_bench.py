"""The benchmark still runs end to end (figures are printed, never asserted: CI machines are noisy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmark_quick_run_prints_every_section():
    result = subprocess.run([sys.executable, "bench/run.py", "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-2000:]
    for heading in ("## Machine", "### 1. Hot path", "### 2. CLI start-up", "### 3. Single flight",
                    "### 4. Crash safety", "### 5. Memory", "### 9. Per-key call budget"):
        assert heading in result.stdout
    # Single flight, per app key: 1 request per key, one token per key, no failure; timings not read.
    cells = {
        (row[0], row[1]): (row[3], row[6], row[7])
        for row in (line.strip("| ").split(" | ") for line in result.stdout.splitlines())
        if row[0] in ("two (US, KR)", "one in both markets")
    }
    assert {n for _, n in cells} == {"1", "4", "16"}
    for (keys, _), outcome in cells.items():
        assert outcome == (("1 / 1", "yes / yes", "0") if keys == "two (US, KR)" else ("1", "yes", "0"))
    assert "| processes killed | 0 |" not in result.stdout
    assert "records left unparseable (`CorruptRecordError`; target 0) | 0 |" in result.stdout
