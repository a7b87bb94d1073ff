"""The call budget across processes and hosts (issue 19): workers (``common.sandbox.budget_worker``) spend one
key's budget as fast as they can for a couple of seconds; their merged send times must hold no more
than the rate in any second, and use at least 0.9 of it. Real processes and short real waits,
bounded: every worker is killed if it has not finished in time."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from common.sandbox.budget_worker import most_in_window
from common.sandbox.redis_server import RedisServer
from tests.conftest import finish, spawn

#: Several processes on real clocks for seconds each: run by `-m slow` (and .ci/run), not a plain run.
pytestmark = pytest.mark.slow

KEY_ID = "real-0123456789abcdef"
DURATION = 2.0
#: Time for the workers' interpreters to start on a busy machine before they all begin at once.
START_DELAY = 3.0


def environ(tmp_path: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            "HOME": str(tmp_path), "KIS_DOTENV_PATH": os.devnull}


def run_workers(tmp_path: Path, directories: list[Path], per_directory: int, rate: float,
                store_url: str | None = None, duration: float = DURATION) -> list[float]:
    """Start ``per_directory`` workers on each directory at once; their merged send times."""
    start = time.time() + START_DELAY
    args = [str(rate), f"{start:.6f}", str(duration)] + ([store_url] if store_url else [])
    processes = [spawn(["common.sandbox.budget_worker", str(directory), KEY_ID, *args], environ(tmp_path))
                 for directory in directories for _ in range(per_directory)]
    results = finish(processes, timeout=START_DELAY + duration + 30)
    times = []
    for code, out, err in results:
        assert code == 0, err[-2000:]
        times += [float(line) for line in out.split()]
    return times


def assert_paced(times: list[float], rate: float, duration: float = DURATION) -> None:
    assert most_in_window(times) <= rate, "a second held more calls than the rate"
    assert len(times) >= 0.9 * rate * duration, f"only {len(times)} calls in {duration} s at {rate}/s"


def test_eight_processes_on_one_host_share_the_key_budget(tmp_path):
    times = run_workers(tmp_path, [tmp_path / "tokens"], 8, 18.0)
    assert_paced(times, 18)


def test_a_paper_key_is_paced_at_one_call_a_second(tmp_path):
    times = run_workers(tmp_path, [tmp_path / "tokens"], 4, 1.0, duration=3.0)
    assert_paced(times, 1, duration=3.0)


def test_two_hosts_on_one_valkey_share_the_key_budget(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        times = run_workers(tmp_path, [tmp_path / "host-a", tmp_path / "host-b"], 4, 18.0, server.url)
        assert [key.decode() for key in server.dump()] == [f"kis-token:v1:{KEY_ID}:budget"]
    finally:
        server.stop()
    assert_paced(times, 18)
    for host in ("host-a", "host-b"):  # paced on the server: the hosts' files were never needed
        assert not (tmp_path / host / f"key-{KEY_ID}.budget").exists()
