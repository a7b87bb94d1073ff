"""The simulated trading week (bench/trading_week.py): at most 5 issuances per key, no dying token."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "trading_week.py"


def _load():
    spec = importlib.util.spec_from_file_location("trading_week", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_key_in_both_markets_costs_one_issuance_per_weekday():
    week = _load()
    key = "PSone" + "a" * 31
    issuances, requests, problems = week.play({"us": key, "kr": key})
    assert issuances == {key: 5} and requests == {key: 5}
    assert problems == []


def test_two_keys_cost_one_issuance_per_weekday_each():
    week = _load()
    keys = {"us": "PSusk" + "b" * 31, "kr": "PSkrk" + "c" * 31}
    issuances, requests, problems = week.play(keys)
    assert requests == issuances  # no request was refused or wasted
    assert issuances == {keys["us"]: 5, keys["kr"]: 5}
    assert problems == []


def test_the_script_prints_issuances_per_key_and_passes():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("one key in both markets") and " shared " in line for line in lines)
    assert sum(line.startswith("two keys") for line in lines) == 2
    header, *rows = [line for line in result.stdout.splitlines() if not line.startswith("budget")]
    assert len(rows) == 3
    # every heading ends where its numbers end, and each text column starts where its heading starts
    for name in ("issuances", "requests", "dying tokens served"):
        end = header.index(name) + len(name)
        assert all(row[end - 1].isdigit() and (len(row) == end or row[end] == " ") for row in rows), name
    for name in ("setup", "key"):
        start = header.index(name)
        assert all(row[start] != " " and (start == 0 or row[start - 1] == " ") for row in rows), name
