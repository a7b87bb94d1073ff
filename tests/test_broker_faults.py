"""Broker faults against a real local server (issue 10 §3, SPEC §6).

A 5xx with an unknown code is retried, a known refusal never, a dripping answer is cut off.
"""

from __future__ import annotations

import time

import pytest

from common.credentials.kis_client import Timeouts
from common.errors import TokenUnavailableError
from common.sandbox import Sandbox
from tests.conftest import US_KEY, SleepRecorder
from us.token_manager import USTokenManager

#: Short deadlines so that a dripping answer costs a fraction of a second here.
QUICK = Timeouts(connect=1.0, attempt=0.5, max_attempts=4, budget=3.0)


@pytest.fixture
def sandbox():
    with Sandbox(rate_limit=0) as server:
        yield server


@pytest.fixture
def manager(make_manager, env, sandbox):
    return make_manager(USTokenManager, {**env, "KIS_BASE_URL": sandbox.base_url}, timeouts=QUICK,
                        clock=time.time, sleep=SleepRecorder())


def test_500_with_an_unknown_code_is_retried_then_succeeds(manager, sandbox):
    sandbox.inject_fault("5xx_code", count=2)
    assert manager.get_valid_token().startswith("sbx-")
    counters = sandbox.counters()
    assert counters["faults_served"] == 2 and counters["token_requests"] == {US_KEY: 1}


def test_rate_limit_refusal_with_http_500_is_never_retried(manager, sandbox):
    sandbox.inject_fault("5xx_ratelimit", count=4)
    with pytest.raises(TokenUnavailableError, match="EGW00133"):
        manager.get_valid_token()
    assert sandbox.counters()["faults_served"] == 1  # one attempt only
    assert manager.load_renewal_state().refusals == {"EGW00133": 1}


def test_a_dripping_error_answer_is_cut_off_and_retried_within_the_budget(manager, sandbox):
    sandbox.inject_fault("drip_5xx", count=1, delay=0.2)  # ~100 bytes at 5 a second: 20 s if waited for
    started = time.monotonic()
    token = manager.get_valid_token()
    elapsed = time.monotonic() - started
    assert token.startswith("sbx-")
    assert sandbox.counters()["faults_served"] == 1
    assert elapsed < 10  # one cut-off attempt, not the whole drip


def test_get_fails_within_the_budget_when_every_answer_drips(manager, sandbox):
    sandbox.inject_fault("drip_5xx", count=10, delay=0.2)
    started = time.monotonic()
    with pytest.raises(TokenUnavailableError, match="cut off|no complete answer"):
        manager.get_valid_token()
    elapsed = time.monotonic() - started
    assert elapsed < QUICK.budget + 5  # the budget holds; waited attempts would take minutes
    assert 2 <= sandbox.counters()["faults_served"] <= QUICK.max_attempts


def test_a_dripping_success_is_read_to_the_budget_and_never_asked_twice_within_the_minute(
    manager, sandbox
):
    # A success may carry a token the broker already issued (and texted about); asking again within
    # the minute would be refused with EGW00133, so it is read until the budget ends, then not retried.
    sandbox.inject_fault("drip", count=1, delay=0.2)  # ~200 bytes: 40 s, past the 3 s budget
    started = time.monotonic()
    with pytest.raises(TokenUnavailableError, match="did not arrive"):
        manager.get_valid_token()
    assert time.monotonic() - started < QUICK.budget + 5
    assert sandbox.counters()["token_requests"] == {US_KEY: 1}
    with pytest.raises(TokenUnavailableError):  # backing off for the minute: nothing is sent
        manager.get_valid_token()
    assert sandbox.counters()["token_requests"] == {US_KEY: 1}


def test_a_slow_but_complete_success_within_the_budget_is_taken(manager, sandbox):
    sandbox.inject_fault("drip", count=1, delay=0.005)  # ~1 s in all: past one attempt, inside the budget
    assert manager.get_valid_token().startswith("sbx-")
    assert sandbox.counters()["token_requests"] == {US_KEY: 1}


def test_an_answer_slower_than_one_attempt_is_waited_for_not_asked_twice(manager, sandbox):
    # The request reached the broker, which may have issued the token: a second request within the
    # minute would be a refusal (and maybe a second text), so the first answer is waited for.
    sandbox.inject_fault("slow", count=1, delay=1.0)  # past one 0.5 s attempt, inside the 3 s budget
    assert manager.get_valid_token().startswith("sbx-")
    assert sandbox.counters()["token_requests"] == {US_KEY: 1}


def test_no_answer_within_the_budget_is_never_asked_twice_within_the_minute(manager, sandbox):
    sandbox.inject_fault("slow", count=2, delay=5.0)  # past the whole 3 s budget (a retry: slow too)
    with pytest.raises(TokenUnavailableError, match="may have issued it"):
        manager.get_valid_token()
    with pytest.raises(TokenUnavailableError):  # backing off for the minute: nothing more is sent
        manager.get_valid_token()
    assert sandbox.counters()["faults_served"] == 1  # one request reached the broker, not two
