"""The operator's path (issue 17): what the files and help texts promise matches what runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from common.sandbox.server import DEFAULT_PORT, FAULT_MODES

REPO = Path(__file__).resolve().parent.parent


def test_env_example_points_at_the_port_the_sandbox_listens_on_unless_told():
    example = (REPO / ".env.example").read_text()
    [url] = re.findall(r"^# KIS_BASE_URL=(\S+)$", example, flags=re.MULTILINE)
    assert url == f"http://127.0.0.1:{DEFAULT_PORT}"


def test_sandbox_help_lists_every_fault_knob():
    result = subprocess.run([sys.executable, "-m", "common.sandbox", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert f"default {DEFAULT_PORT}" in text
    for mode in FAULT_MODES:
        assert mode in text
