"""The WebSocket session lease across processes and hosts (issue 19), against the sandbox's WebSocket
endpoint: workers (``common.sandbox.session_worker``) ask for one key's lease at once; the one that
holds it connects with the approval key. Real processes, real sockets on 127.0.0.1, short real waits
(a lease of 2 s and a pacing interval of 1 s stand in for the defaults, 15 s and 5 s), each bounded:
every worker is killed if it has not finished in time."""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.sandbox.redis_server import RedisServer
from common.store.redis_link import key_name
from tests.conftest import REPO, US_KEY, US_SECRET, finish, spawn

#: Several processes on real clocks for seconds each: run by `-m slow` (and .ci/run), not a plain run.
pytestmark = pytest.mark.slow

TTL, PACE = 2.0, 1.0
#: Time for the workers' interpreters to start (and take the approval key) before they all ask at once.
START_DELAY = 4.0


@pytest.fixture
def valkey(tmp_path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "valkey") as server:
        yield server


def environ(sandbox_process: Any, directory: Path, store_url: str | None = None) -> dict[str, str]:
    """A worker's environment: the sandbox, the key, a token directory (one per host), the store."""
    found = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "HOME": str(directory.parent),
             "KIS_DOTENV_PATH": os.devnull, "KIS_BASE_URL": sandbox_process.base_url,
             "KIS_US_APP_KEY": US_KEY, "KIS_US_APP_SECRET": US_SECRET, "KIS_TOKEN_DIR": str(directory)}
    if store_url:
        found["KIS_TOKEN_STORE"] = store_url
    return found


def worker(env: dict[str, str], start: float, hold: float, wait: float) -> subprocess.Popen[str]:
    return spawn(["common.sandbox.session_worker", f"{start:.6f}", str(hold), str(wait), str(TTL), str(PACE)],
                 env)


def events(results: list[tuple[int, str, str]]) -> list[dict[str, Any]]:
    found = []
    for code, out, err in results:
        assert code == 0, err[-2000:]
        found += [json.loads(line) for line in out.splitlines() if line.strip()]
    return found


def next_event(process: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
    """The next event line of a running worker (bounded)."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "the worker said nothing in time"
    line = process.stdout.readline()
    assert line, f"the worker ended: {process.communicate()[1][-2000:]}"
    return json.loads(line)


def assert_no_second_session(sandbox_process: Any, sessions: int) -> None:
    counters = sandbox_process.counters()
    assert counters["ws_opsp8996"] == {}
    assert counters["ws_sessions_opened"] == {US_KEY: sessions}
    assert counters["ws_max_concurrent"] == {US_KEY: 1}


def eight_at_once(directories: list[Path], sandbox_process: Any, store_url: str | None = None) -> None:
    start = time.time() + START_DELAY
    processes = [worker(environ(sandbox_process, directory, store_url), start, 2.0, 0.0)
                 for directory in directories for _ in range(8 // len(directories))]
    found = events(finish(processes, timeout=START_DELAY + 30))
    held = [e for e in found if e["event"] == "held"]
    refused = [e for e in found if e["event"] == "refused"]
    assert len(held) == 1 and held[0]["code"] == "OPSP0000"
    assert len(refused) == 7
    for refusal in refused:
        assert refusal["asked"] < 1.0  # at once, not after the holder's 2 s
        named = f"held by host {os.uname().nodename[:64]}, pid {held[0]['pid']} (us), since"
        assert named in refusal["message"]
    assert_no_second_session(sandbox_process, 1)


def test_eight_processes_ask_at_once_one_holds_the_others_are_told_who_at_once(sandbox_process, tmp_path):
    eight_at_once([tmp_path / "tokens"], sandbox_process)
    assert sandbox_process.counters()["approvals"] == 1  # one approval key for all eight


def test_eight_processes_on_two_hosts_sharing_a_valkey(sandbox_process, valkey, tmp_path):
    eight_at_once([tmp_path / "host-a", tmp_path / "host-b"], sandbox_process, valkey.url)
    assert valkey.client().exists(key_name(_key_id(sandbox_process), "session")) == 0  # released on exit


def _key_id(sandbox_process: Any) -> str:
    from common.credentials.identity import Credential

    return Credential.of("real", sandbox_process.base_url, US_KEY).key_id


def hand_over_after_sigkill(holder_env: dict[str, str], next_env: dict[str, str]) -> tuple[float, dict]:
    """Start a holder, then a worker that waits for the lease, SIGKILL the holder; the seconds from
    the kill to the next worker's lease, and the next worker's held event."""
    holder = worker(holder_env, time.time(), 60.0, 0.0)
    try:
        held = next_event(holder)
        assert held["event"] == "held" and held["code"] == "OPSP0000"
        ask_at = time.time() + START_DELAY
        waiter = worker(next_env, ask_at, 0.0, 30.0)
        time.sleep(max(0.0, ask_at + 0.5 - time.time()))  # the waiter is polling by now
        killed_at = time.time()
        os.kill(holder.pid, signal.SIGKILL)
        taken = next_event(waiter)
    finally:
        finish([holder], timeout=5)
    [(code, _, err)] = finish([waiter], timeout=30)
    assert code == 0, err[-2000:]
    assert taken["event"] == "held", taken
    return taken["at"] - killed_at, taken


def test_a_sigkilled_holder_on_the_host_hands_over_at_once(sandbox_process, tmp_path):
    env = environ(sandbox_process, tmp_path / "tokens")
    hand_over, taken = hand_over_after_sigkill(env, env)
    assert taken["code"] == "OPSP0000"
    assert hand_over < 1.0  # the kernel drops the flock at once (the holder started > PACE ago)
    assert_no_second_session(sandbox_process, 2)


def test_a_sigkilled_host_frees_the_key_for_another_host_within_the_ttl(sandbox_process, valkey, tmp_path):
    host_a = environ(sandbox_process, tmp_path / "host-a", valkey.url)
    host_b = environ(sandbox_process, tmp_path / "host-b", valkey.url)
    hand_over, taken = hand_over_after_sigkill(host_a, host_b)
    assert taken["code"] == "OPSP0000"
    assert hand_over <= TTL + 0.5  # the lease's ttl after its last heartbeat, and a poll
    assert_no_second_session(sandbox_process, 2)


def test_leases_of_the_key_start_a_pacing_interval_apart(sandbox_process, tmp_path):
    start = time.time() + START_DELAY
    env = environ(sandbox_process, tmp_path / "tokens")
    found = events(finish([worker(env, start, 0.0, 30.0) for _ in range(3)], timeout=START_DELAY + 30))
    starts = sorted(e["asked"] for e in found if e["event"] == "held")
    assert len(starts) == 3  # each waited its turn, none was refused
    assert all(later - earlier >= PACE - 0.05 for earlier, later in itertools.pairwise(starts))
    assert_no_second_session(sandbox_process, 3)


def test_the_session_lease_bench_runs_end_to_end():
    """``bench/session_lease.py`` (not a section of ``bench/run.py``): its figures are printed, not
    asserted; the sandbox it reports on saw no second session."""
    result = subprocess.run([sys.executable, "bench/session_lease.py", "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for heading in ("hand-over after SIGKILL", "one host (file lease)", "two hosts, one Valkey",
                    "µs per acquire + release"):
        assert heading in result.stdout
    assert " 0 `OPSP8996`" in result.stdout
