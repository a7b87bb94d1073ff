"""Clocks that disagree (issue 16 §6, SPEC §12): processes stepped with libfaketime against the
sandbox, and two hosts an hour apart on one Redis/Valkey store.

The broker never sees two requests of one key within a minute, and a host whose clock is wrong
keeps serving the valid token in the broker's time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from email.utils import formatdate
from pathlib import Path

import pytest
import responses

from common.errors import RequestHeldBackError
from tests.conftest import DAY, REAL_HOST, TOKEN_URL, US_KEY, US_SECRET, fake_token, token_answer, token_calls
from tests.test_redis_store import host, server  # noqa: F401  (fixtures: a real server, hosts on it)

REPO = Path(__file__).resolve().parent.parent
HOUR = 3600.0
FAKETIME = shutil.which("faketime")
needs_faketime = pytest.mark.skipif(FAKETIME is None, reason="libfaketime's faketime is not installed")


def cli(args: list[str], environ: dict[str, str], step: str | None = None) -> subprocess.CompletedProcess:
    """``python -m us.token_manager ARGS`` (with the wall clock stepped by ``step``, e.g. ``-1h``)."""
    command = [sys.executable, "-m", "us.token_manager", *args]
    if step is not None:
        command = [FAKETIME, "-f", step, *command]
    return subprocess.run(command, env={**environ, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def procs(env, sandbox_process) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "KIS_DOTENV_PATH": os.devnull,
            "KIS_BASE_URL": sandbox_process.base_url, **env,
            "KIS_KR_APP_KEY": US_KEY, "KIS_KR_APP_SECRET": US_SECRET}


@needs_faketime
def test_a_process_an_hour_behind_between_two_refreshes_never_costs_a_refusal(procs, sandbox_process):
    first = cli(["refresh"], procs)
    assert first.returncode == 0, first.stderr
    ahead = cli(["refresh"], procs, step="+1h")  # and one an hour ahead
    assert ahead.returncode == 1 and "not asking the broker" in ahead.stderr, ahead.stderr
    behind = cli(["refresh"], procs, step="-1h")
    assert behind.returncode == 1 and "not asking the broker" in behind.stderr, behind.stderr
    again = cli(["refresh"], procs)
    assert again.returncode == 1 and "not asking the broker" in again.stderr, again.stderr
    counters = sandbox_process.counters()
    assert counters["token_requests"] == {US_KEY: 1} and counters["rate_limited"] == {}
    get = cli(["get"], procs, step="-1h")  # and the token stays in service for it
    assert get.returncode == 0 and get.stdout.strip(), get.stderr


@needs_faketime
def test_a_process_a_day_ahead_keeps_serving_the_valid_token(procs, sandbox_process):
    first = cli(["get"], procs)
    assert first.returncode == 0, first.stderr
    ahead = cli(["get"], procs, step="+1d")
    assert ahead.returncode == 0, ahead.stderr
    assert ahead.stdout == first.stdout
    counters = sandbox_process.counters()  # it read the broker's clock first: no second token request
    assert counters["token_requests"] == {US_KEY: 1} and counters["rate_limited"] == {}
    check = cli(["check"], procs, step="+1d")  # starts from the host's offset, checked with one look
    assert check.returncode == 0 and "ahead of the broker's" in check.stdout, check.stdout + check.stderr
    later = cli(["get"], procs)  # a process on the right time after it: not held back a day
    assert later.returncode == 0 and later.stdout == first.stdout, later.stderr
    [state] = Path(procs["KIS_TOKEN_DIR"]).glob("key-*.state")
    stamp = json.loads(state.read_text())["last_request_at"]
    assert abs(stamp - time.time()) < 120  # in the broker's time (the sandbox's clock is the real one)


@pytest.mark.broker_clock
def test_two_hosts_an_hour_apart_on_one_store_never_send_twice_a_minute(host, clock):  # noqa: F811
    a = host("a")
    b = host("b", clock=lambda: clock() - HOUR)  # host b's clock is an hour behind

    def date() -> dict[str, str]:
        return {"Date": formatdate(clock(), usegmt=True)}

    tokens = iter(fake_token(n) for n in range(1, 5))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(responses.POST, TOKEN_URL, callback=lambda request: (
            200, date(), json.dumps(token_answer(next(tokens), clock() + DAY))))
        mock.add_callback(responses.GET, REAL_HOST + "/", callback=lambda request: (404, date(), ""))
        a.refresh_token()
        clock.advance(5)
        with pytest.raises(RequestHeldBackError, match=r"requested [56] s ago"):
            b.refresh_token()  # b reads the broker's clock, then holds back like a host on time
        clock.advance(5)
        with pytest.raises(RequestHeldBackError, match="requested 10 s ago"):
            a.refresh_token()  # and its memory was not moved an hour back
        assert len(token_calls(mock)) == 1
        clock.advance(55)  # 65 s after the request: both may ask again
        assert b.refresh_token().access_token == fake_token(2)
        assert round(b.now.offset) == HOUR


@pytest.mark.parametrize("garbage", [b"garbage{", b'{"last_request_at": NaN}'])
def test_garbage_state_on_the_store_never_wins_over_the_hosts_good_one(host, server, clock, garbage):  # noqa: F811
    from common.credentials.identity import Credential
    from common.store import redis_store

    a = host("a")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
        a.refresh_token()
        name = redis_store.key_names(Credential.of("real", REAL_HOST, US_KEY).key_id)["state"]
        server.client().set(name, garbage)
        clock.advance(1)
        with pytest.raises(RequestHeldBackError, match="renewal state was unreadable"):
            host("a").refresh_token()  # a new process: the store's copy may know of a request
        assert len(token_calls(mock)) == 1
