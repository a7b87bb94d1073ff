"""The benchmark still runs end to end (figures are printed, never asserted: CI machines are noisy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_quick_run_prints_every_section():
    result = subprocess.run([sys.executable, "bench/run.py", "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for heading in ("### 1. Hot path", "### 2. CLI start-up", "### 3. Single flight",
                    "### 4. Crash safety", "### 5. Memory"):
        assert heading in result.stdout
    assert "records left unparseable (`CorruptRecordError`; target 0) | 0 |" in result.stdout
