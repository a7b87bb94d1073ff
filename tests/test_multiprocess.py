"""Renewal across real processes against the sandbox on 127.0.0.1 (issue 4, SPEC §6)."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest

from common.sandbox.process import finish
from common.settings import Settings
from kr.token_manager import KRTokenManager
from tests.conftest import KR_KEY, US_KEY, assert_a_refresh_reaches_a_running_process, spawn
from us.token_manager import USTokenManager

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def proc_env(env, sandbox_process, tmp_path):
    """Environment for child processes: the test's keys, token dir and the sandbox."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO),
        "KIS_DOTENV_PATH": os.devnull,
        "KIS_BASE_URL": sandbox_process.base_url,
        **env,
    }


def test_sixteen_processes_per_market_from_cold_cost_one_request_per_market(proc_env, sandbox_process):
    sandbox_process.control("faults", {"mode": "slow", "delay": 0.5, "count": 2})  # widen the race
    processes = [spawn([f"{market}.token_manager", "get"], proc_env)
                 for _ in range(16) for market in ("us", "kr")]
    results = finish(processes)
    assert all(code == 0 for code, _, _ in results), [err for code, _, err in results if code]
    us_tokens = {out for (code, out, err), i in zip(results, range(32), strict=True) if i % 2 == 0}
    kr_tokens = {out for (code, out, err), i in zip(results, range(32), strict=True) if i % 2 == 1}
    assert len(us_tokens) == 1 and len(kr_tokens) == 1 and us_tokens != kr_tokens
    counters = sandbox_process.counters()
    assert counters["token_requests"] == {US_KEY: 1, KR_KEY: 1}


def test_lock_log_written_by_many_processes_never_interleaves(proc_env, tmp_path):
    log = tmp_path / "lock.log"
    processes = [spawn(["tests.mp_worker", "lock", str(log), "20"], proc_env) for _ in range(6)]
    assert all(code == 0 for code, _, _ in finish(processes))
    lines = log.read_text().splitlines()
    assert len(lines) == 6 * 20 * 2
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        assert enter.startswith("enter ") and leave == "leave " + enter.split()[1]


def test_long_running_process_sees_another_processs_forced_refresh(proc_env, make_manager):
    manager = make_manager(USTokenManager, environ=proc_env, clock=time.time)
    assert_a_refresh_reaches_a_running_process(manager, proc_env, proc_env)


def test_processes_killed_at_random_instants_never_leave_a_broken_record(env, sandbox_process):
    sandbox_process.control("config", {"rate_limit": 0, "same_token_window": 0})
    environ = {**env, "KIS_BASE_URL": sandbox_process.base_url, "KIS_TOKEN_DAILY_LIMIT": "0"}
    context = multiprocessing.get_context("fork")
    checker = USTokenManager(Settings(environ, dotenv_path=False))
    rng = random.Random(7)
    kills = 0
    for _ in range(40):
        ready = context.Event()
        worker = context.Process(target=_renew_forever, args=(environ, ready), daemon=True)
        worker.start()
        assert ready.wait(10)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        kills += 1
        checker.store.record.load()  # raises CorruptRecordError if the record were broken
        with checker.store.lock.hold(2):  # the dead holder's lock is free at once
            pass
    record = checker.load_token()
    assert kills == 40 and record is not None and record.access_token.startswith("sbx-")
    assert sandbox_process.counters()["tokens_issued"][US_KEY] >= 40  # each worker renewed, then was killed


def _renew_forever(environ, ready):
    from tests.mp_worker import renew_forever

    renew_forever(environ, ready)


def test_kr_and_us_processes_with_two_keys_do_not_block_each_other(proc_env, sandbox_process, env):
    us = USTokenManager(Settings(proc_env, dotenv_path=False))
    kr_process = spawn(["kr.token_manager", "get"], proc_env)
    with us.store.lock.hold(5):  # the US lock is held: KR must still get its token
        ((code, out, err),) = finish([kr_process], timeout=30)
    assert code == 0, err
    assert KRTokenManager(Settings(proc_env, dotenv_path=False)).load_token().access_token == out.strip()
