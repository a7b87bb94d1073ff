"""Smoke test: the shared-store benchmark runs end to end (its figures are printed, not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_shared_store_benchmark_quick_run_prints_every_section():
    result = subprocess.run([sys.executable, "bench/redis_store.py", "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for heading in ("Hosts x processes from cold", "served by host B's running processes", "hot path"):
        assert heading in result.stdout
    assert "| NO" not in result.stdout and "failed" not in result.stdout
