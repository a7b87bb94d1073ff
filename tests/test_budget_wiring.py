"""The per-key call budget where the token is applied (issue 19): ``KISAuth``, ``KISHttpxAuth`` (sync
and async), mojito brokers and the facade's public call take a slot before each send, and resend
after an ``EGW00201`` answer a bounded number of times; ``check``, ``status`` and the metrics show
the budget. Against the in-process sandbox with ``EGW00201`` injected (its own rate is off here: the
multi-process tests in test_budget_sandbox.py judge the pacing); the budget's rate is set high, so
that no test waits for a slot."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
import requests
import responses

from common.auth import KISAuth, KISHttpxAuth
from common.budget.resend import MAX_RESENDS
from common.cli.market import main
from common.cli.metrics import render
from common.errors import BudgetTimeoutError
from common.sandbox import Sandbox
from common.settings import Settings
from kis_token.console import collect, render_table
from kr.token_manager import KRTokenManager
from tests.conftest import DAY, REAL_HOST, US_KEY, fake_token, token_answer
from us.token_manager import USTokenManager

QUOTE = "/uapi/overseas-price/v1/quotations/price"
PARAMS = {"EXCD": "NAS", "SYMB": "AAPL"}


@pytest.fixture
def sandbox(clock):
    with Sandbox(clock=clock, rest_rate=0) as server:
        yield server


@pytest.fixture
def config(env, sandbox):
    return {**env, "KIS_BASE_URL": sandbox.base_url, "KIS_RATE_LIMIT": "1000"}


@pytest.fixture
def manager(make_manager, config):
    return make_manager(USTokenManager, config)


def refused(sandbox) -> int:
    return sandbox.counters()["rest_egw00201"].get(US_KEY, 0)


def served(sandbox) -> int:
    return sandbox.counters()["rest_calls"].get(US_KEY, 0)


def get_requests(manager, url):
    session = requests.Session()
    session.auth, session.trust_env = KISAuth(manager), False
    answer = session.get(url, params=PARAMS, timeout=10)
    return answer.json(), len(answer.history)


def get_httpx(manager, url):
    with httpx.Client(auth=KISHttpxAuth(manager), trust_env=False, timeout=10) as client:
        answer = client.get(url, params=PARAMS)
        return answer.json(), len(answer.history)


def get_httpx_async(manager, url):
    async def call():
        async with httpx.AsyncClient(auth=KISHttpxAuth(manager), trust_env=False, timeout=10) as client:
            answer = await client.get(url, params=PARAMS)
            return answer.json(), len(answer.history)

    return asyncio.run(call())


CLIENTS = pytest.mark.parametrize("get", [get_requests, get_httpx, get_httpx_async],
                                  ids=["requests", "httpx", "httpx-async"])


@CLIENTS
def test_egw00201_is_counted_and_resent_after_the_next_slot(manager, sandbox, get):
    manager.get_valid_token()
    sandbox.inject_egw00201(2, US_KEY)
    answer, earlier = get(manager, sandbox.base_url + QUOTE)
    assert answer["rt_cd"] == "0"
    assert (refused(sandbox), served(sandbox)) == (2, 1)
    snap = manager.call_budget().snapshot()
    assert (snap.calls_last_minute, snap.egw00201_seen, snap.egw00201_total) == (3, 2, 2)
    if get is get_requests:  # requests keeps the refused answers in the history (httpx: auth-flow sends)
        assert earlier == 2


@CLIENTS
def test_egw00201_resends_are_bounded_and_the_last_answer_is_returned(manager, sandbox, get):
    manager.get_valid_token()
    sandbox.inject_egw00201(10, US_KEY)
    answer, _ = get(manager, sandbox.base_url + QUOTE)
    assert answer["msg_cd"] == "EGW00201"
    assert (refused(sandbox), served(sandbox)) == (1 + MAX_RESENDS, 0)  # N + 1 requests, no more
    assert manager.call_budget().snapshot().egw00201_total == 1 + MAX_RESENDS
    sandbox.clear_faults()
    assert get(manager, sandbox.base_url + QUOTE)[0]["rt_cd"] == "0"  # the next request starts afresh


def test_a_rejected_token_and_then_egw00201_both_resend(manager, sandbox, clock):
    manager.get_valid_token()
    clock.advance(120)  # past the one-a-minute rule
    sandbox.expire_tokens()
    sandbox.inject_egw00201(1, US_KEY)  # the first send is refused for the rate; the resend for the token
    answer, earlier = get_requests(manager, sandbox.base_url + QUOTE)
    assert answer["rt_cd"] == "0" and earlier == 2
    assert sandbox.counters()["token_requests"] == {US_KEY: 2}


def test_mojito_broker_resends_egw00201_bounded_and_takes_a_slot_per_request(make_manager, env, clock,
                                                                               monkeypatch, tmp_path):
    monkeypatch.setenv("KIS_US_ACCOUNT", "12345678-01")
    monkeypatch.chdir(tmp_path)
    us = make_manager(USTokenManager, {**env, "KIS_US_ACCOUNT": "12345678-01", "KIS_RATE_LIMIT": "1000"})
    busy = {"rt_cd": "1", "msg_cd": "EGW00201", "msg1": "초당 거래건수를 초과하였습니다."}
    ok = {"rt_cd": "0", "msg_cd": "MCA00000", "output": {"last": "1"}}
    url = REAL_HOST + QUOTE
    with responses.RequestsMock(assert_all_requests_are_fired=False) as http:
        http.post(REAL_HOST + "/oauth2/tokenP", json=token_answer(fake_token(1), clock() + DAY))
        http.get(url, json=busy, status=500)
        http.get(url, json=busy, status=500)
        http.get(url, json=ok)
        broker = us.create_broker()
        assert broker.fetch_price("AAPL") == ok
        quotes = [call for call in http.calls if QUOTE in call.request.url]
        assert len(quotes) == 3
        snap = us.call_budget().snapshot()
        assert (snap.calls_last_minute, snap.egw00201_total) == (3, 2)
        http.replace(responses.GET, url, json=busy, status=500)
        assert broker.fetch_price("AAPL") == busy  # fetch_price -> fetch_oversea_price: one bound for both
        quotes = [call for call in http.calls if QUOTE in call.request.url]
        assert len(quotes) == 3 + 1 + MAX_RESENDS


def test_both_markets_of_one_key_share_one_budget_object(make_manager, config):
    us = make_manager(USTokenManager, config)
    kr_same_key = make_manager(KRTokenManager, {**config, "KIS_KR_APP_KEY": US_KEY})
    kr_own_key = make_manager(KRTokenManager, config)
    assert us.call_budget() is kr_same_key.call_budget() is make_manager(USTokenManager, config).call_budget()
    assert kr_own_key.call_budget() is not us.call_budget()


def test_the_public_call_takes_slots_sync_and_async(make_manager, config, tmp_path):
    us = make_manager(USTokenManager, {**config, "KIS_RATE_LIMIT": "1"})
    assert us.acquire_call() == 0  # a free budget: no wait
    with pytest.raises(BudgetTimeoutError) as raised:  # the next slot is a second away: not within 0
        us.acquire_call(timeout=0)
    assert raised.value.retry_in > 0
    assert us.call_budget().snapshot().calls_last_minute == 1  # the refused reservation took nothing
    fast = make_manager(USTokenManager, {**config, "KIS_TOKEN_DIR": str(tmp_path / "other-host")})
    asyncio.run(fast.acquire_call_async())
    fast.acquire_call()
    assert fast.call_budget().snapshot().calls_last_minute == 2


def test_check_status_and_metrics_show_the_budget(manager, capsys):
    manager.acquire_call()
    manager.acquire_call()
    manager.call_budget().note_refusal()
    assert main(lambda: manager, ["check", "--json"]) in (0, 2)
    budget = json.loads(capsys.readouterr().out)["call_budget"]
    assert budget == {"rate": 1000.0, "paced_rate": budget["paced_rate"], "calls_last_minute": 2,
                      "egw00201_last_minute": 1, "egw00201_total": 1, "backend": "file", "store_down": False,
                      "hosts": 1, "location": str(manager.call_budget().backend.path), "error": None}
    main(lambda: manager, ["check"])
    assert "calls:    2 in the last minute, 1 EGW00201 (1 in all); limit 1000/s" in capsys.readouterr().out
    text = render(manager)
    assert 'kis_token_egw00201_total{environment="real",market="us"} 1.0' in text
    assert 'kis_token_calls_last_minute{environment="real",market="us"} 2.0' in text
    assert 'kis_token_call_rate_limit{environment="real",market="us"} 1000.0' in text


def test_status_shows_one_budget_line_per_key(config):
    table = render_table(collect(Settings({**config, "KIS_KR_APP_KEY": US_KEY}, dotenv_path=False)))
    assert table.count("\ncalls (") == 1 and "calls (us and kr, key sha256:" in table
    table = render_table(collect(Settings(config, dotenv_path=False)))
    assert table.count("\ncalls (") == 2


def test_a_store_that_is_down_degrades_to_the_host_budget_in_check_and_calls(make_manager, config, caplog,
                                                                              capsys):
    down = make_manager(USTokenManager, {**config, "KIS_TOKEN_STORE": "redis://127.0.0.1:1/0"})
    with caplog.at_level(logging.WARNING, "common.budget"):
        assert down.acquire_call() >= 0  # paced on this host's file, never unpaced, never a hang
    assert "pacing the key on this host's budget" in caplog.text
    main(lambda: down, ["check", "--json"])
    budget = json.loads(capsys.readouterr().out)["call_budget"]
    assert (budget["backend"], budget["store_down"], budget["calls_last_minute"]) == ("file", True, 1)
