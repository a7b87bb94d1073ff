"""Issue 5: mojito2 brokers on managed tokens (real mojito2 classes; HTTP mocked or local sandbox)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import responses

from common.credentials.records import TokenRecord
from common.errors import ConfigError, KISTokenError
from common.sandbox import Sandbox
from kr.token_manager import KRTokenManager
from tests.conftest import (
    DAY,
    KR_KEY,
    KR_SECRET,
    PAPER_HOST,
    REAL_HOST,
    TOKEN_URL,
    US_KEY,
    US_SECRET,
    FakeClock,
    fake_token,
    token_answer,
)
from us.token_manager import USTokenManager

REPO_ROOT = Path(__file__).resolve().parents[1]
US_ACCOUNT, KR_ACCOUNT = "12345678-01", "87654321-22"
US_PRICE = "/uapi/overseas-price/v1/quotations/price"
KR_PRICE = "/uapi/domestic-stock/v1/quotations/inquire-price"
OK = {"rt_cd": "0", "msg_cd": "MCA00000", "msg1": "정상처리 되었습니다.", "output": {"last": "1"}}


def rejection(code: str = "EGW00123") -> dict:
    """The broker's answer to an API call with an expired (or invalid) token."""
    text = "기간이 만료된 token 입니다." if code == "EGW00123" else "유효하지 않은 token 입니다."
    return {"rt_cd": "1", "msg_cd": code, "msg1": text}


@pytest.fixture(autouse=True)
def accounts_and_cwd(env, tmp_path, monkeypatch) -> Path:
    """Account variables for both markets, and an empty working directory to watch for token.dat."""
    env.update(KIS_US_ACCOUNT=US_ACCOUNT, KIS_KR_ACCOUNT=KR_ACCOUNT)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture
def http() -> Iterator[responses.RequestsMock]:
    """Mocked HTTP: an unregistered address raises instead of leaving the machine."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def seed(manager, n: int, lifetime: float = DAY) -> str:
    """Store a valid token for ``manager`` without any request; return it."""
    now = manager.now()
    token = fake_token(n)
    manager.save_token(
        TokenRecord(
            access_token=token, token_type="Bearer", issued_at=now, expires_at=now + lifetime,
            market=manager.market, environment=manager.environment,
            key_fingerprint=manager.key_fingerprint(),
        )
    )
    return token


def sent(mock: responses.RequestsMock, path: str) -> list:
    """The requests that reached ``path``."""
    return [call.request for call in mock.calls if call.request.path_url.split("?")[0] == path]


def mojito_file(manager) -> dict:
    return json.loads(Path(manager.get_token_info()["files"]["mojito"]).read_text())


# -- construction --------------------------------------------------------------------------------


def test_broker_is_a_mojito_broker_on_the_managed_token(us, http, accounts_and_cwd):
    import mojito

    token = seed(us, 1)
    http.get(REAL_HOST + US_PRICE, json=OK)
    broker = us.create_broker()
    assert isinstance(broker, mojito.KoreaInvestment)
    assert (broker.acc_no, broker.exchange, broker.mock) == (US_ACCOUNT, "나스닥", False)
    assert broker.base_url == REAL_HOST
    assert broker.fetch_price("AAPL") == OK
    [request] = sent(http, US_PRICE)
    assert request.headers["authorization"] == f"Bearer {token}"
    assert list(accounts_and_cwd.iterdir()) == []  # no token.dat, nothing at all
    assert mojito_file(us)["access_token"] == f"Bearer {token}"


def test_construction_with_a_valid_stored_token_sends_nothing(us, http):
    seed(us, 1)
    us.create_broker()
    assert len(http.calls) == 0


def test_construction_without_a_token_gets_one_through_the_manager(us, http, clock, accounts_and_cwd):
    http.post(TOKEN_URL, json=token_answer(fake_token(5), clock() + DAY))
    broker = us.create_broker()
    assert broker.access_token == f"Bearer {fake_token(5)}"
    assert len(sent(http, "/oauth2/tokenP")) == 1
    assert mojito_file(us)["access_token"] == f"Bearer {fake_token(5)}"
    assert list(accounts_and_cwd.iterdir()) == []


def test_us_and_kr_brokers_carry_their_own_tokens_and_files(us, kr, http, tmp_path):
    us_token, kr_token = seed(us, 1), seed(kr, 2)
    http.get(REAL_HOST + US_PRICE, json=OK)
    http.get(REAL_HOST + KR_PRICE, json=OK)
    us_broker, kr_broker = us.create_broker(), kr.create_broker()
    assert (us_broker.exchange, kr_broker.exchange) == ("나스닥", "서울")
    assert kr_broker.acc_no == KR_ACCOUNT
    us_broker.fetch_price("AAPL")
    kr_broker.fetch_price("005930")
    assert sent(http, US_PRICE)[0].headers["authorization"] == f"Bearer {us_token}"
    assert sent(http, KR_PRICE)[0].headers["authorization"] == f"Bearer {kr_token}"
    assert sent(http, US_PRICE)[0].headers["appKey"] == US_KEY
    assert sent(http, KR_PRICE)[0].headers["appKey"] == KR_KEY
    tokens = tmp_path / "tokens"
    assert json.loads((tokens / "us_krs_token.dat").read_text())["access_token"] == f"Bearer {us_token}"
    assert json.loads((tokens / "kr_krs_token.dat").read_text())["access_token"] == f"Bearer {kr_token}"


def test_keyword_arguments_reach_mojito(us, http):
    seed(us, 1)
    assert us.create_broker("11112222-33", exchange="뉴욕").exchange == "뉴욕"


def test_paper_environment_means_mock_and_the_paper_host(make_manager, env, http):
    env["KIS_ENV"] = "paper"
    manager = make_manager(USTokenManager)
    token = seed(manager, 1)
    http.get(PAPER_HOST + US_PRICE, json=OK)
    broker = manager.create_broker()
    assert broker.mock is True and broker.base_url == PAPER_HOST
    assert broker.fetch_price("AAPL") == OK
    assert sent(http, US_PRICE)[0].headers["authorization"] == f"Bearer {token}"


def test_base_url_override_is_used(make_manager, env, http):
    env.update(KIS_BASE_URL="http://proxy.invalid:8080", KIS_KR_BASE_URL="http://kr.invalid:9000")
    us_manager, kr_manager = make_manager(USTokenManager), make_manager(KRTokenManager)
    seed(us_manager, 1), seed(kr_manager, 2)
    assert us_manager.create_broker().base_url == "http://proxy.invalid:8080"
    assert kr_manager.create_broker().base_url == "http://kr.invalid:9000"


def test_mock_that_contradicts_kis_env_is_refused(us, http):
    seed(us, 1)
    with pytest.raises(ValueError, match="KIS_ENV"):
        us.create_broker(mock=True)


@pytest.mark.parametrize("value", ["1234567-01", "12345678-1", "1234567801", "abcdefgh-01", "12345678-01x"])
def test_bad_account_variable_is_a_config_error_naming_it(us, env, http, value):
    env["KIS_US_ACCOUNT"] = value
    with pytest.raises(ConfigError, match="KIS_US_ACCOUNT"):
        us.create_broker()
    assert len(http.calls) == 0


def test_missing_account_variable_and_bad_argument_are_config_errors(kr, env, http):
    del env["KIS_KR_ACCOUNT"]
    with pytest.raises(ConfigError, match="KIS_KR_ACCOUNT"):
        kr.create_broker()
    with pytest.raises(ConfigError, match="acc_no"):
        kr.create_broker("12-34")


# -- renewals reach a broker that is already built -----------------------------------------------


def test_forced_refresh_reaches_the_broker_without_rebuilding(us, http, clock):
    seed(us, 1)
    http.get(REAL_HOST + US_PRICE, json=OK)
    http.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
    broker = us.create_broker()
    broker.fetch_price("AAPL")
    us.refresh_token()
    broker.fetch_price("AAPL")
    headers = [r.headers["authorization"] for r in sent(http, US_PRICE)]
    assert headers == [f"Bearer {fake_token(1)}", f"Bearer {fake_token(2)}"]


def test_another_process_renewal_reaches_the_broker(make_manager, http, clock):
    trader, admin = make_manager(USTokenManager), make_manager(USTokenManager)
    seed(trader, 1)
    http.get(REAL_HOST + US_PRICE, json=OK)
    http.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
    broker = trader.create_broker()
    broker.fetch_price("AAPL")
    admin.refresh_token()  # e.g. `python -m us.token_manager refresh` in another process
    clock.advance(2)  # past the manager's sync interval
    broker.fetch_price("AAPL")
    headers = [r.headers["authorization"] for r in sent(http, US_PRICE)]
    assert headers == [f"Bearer {fake_token(1)}", f"Bearer {fake_token(2)}"]
    assert len(sent(http, "/oauth2/tokenP")) == 1


def test_expiry_renewal_reaches_the_broker(us, http, clock):
    seed(us, 1, lifetime=2 * 3600)
    http.get(REAL_HOST + US_PRICE, json=OK)
    broker = us.create_broker()
    clock.advance(2 * 3600 - 10 * 60)  # inside the mandatory renewal window
    http.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
    broker.fetch_price("AAPL")
    assert sent(http, US_PRICE)[0].headers["authorization"] == f"Bearer {fake_token(2)}"


def test_assigning_access_token_is_ignored(us, http):
    token = seed(us, 1)
    broker = us.create_broker()
    broker.access_token = "Bearer something-else"
    assert broker.access_token == f"Bearer {token}"


def test_issue_access_token_renews_through_the_manager(us, http, clock, accounts_and_cwd):
    seed(us, 1)
    http.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
    broker = us.create_broker()
    broker.issue_access_token()
    assert broker.access_token == f"Bearer {fake_token(2)}"
    assert us.get_valid_token() == fake_token(2)
    assert list(accounts_and_cwd.iterdir()) == []


# -- rejected tokens: one renewal, one retry -----------------------------------------------------


@pytest.mark.parametrize("code", ["EGW00123", "EGW00121"])
def test_rejected_token_renews_once_and_retries_once(us, http, clock, code):
    seed(us, 1)
    http.get(REAL_HOST + US_PRICE, json=rejection(code), status=500)
    http.get(REAL_HOST + US_PRICE, json=OK)
    http.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
    broker = us.create_broker()
    assert broker.fetch_price("AAPL") == OK  # fetch_price -> fetch_oversea_price: nested, one retry
    headers = [r.headers["authorization"] for r in sent(http, US_PRICE)]
    assert headers == [f"Bearer {fake_token(1)}", f"Bearer {fake_token(2)}"]
    assert len(sent(http, "/oauth2/tokenP")) == 1
    assert us.get_valid_token() == fake_token(2)


def test_a_second_rejection_is_returned_not_looped(us, http, clock):
    seed(us, 1)
    http.get(REAL_HOST + US_PRICE, json=rejection(), status=500)
    http.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
    broker = us.create_broker()
    assert broker.fetch_price("AAPL")["msg_cd"] == "EGW00123"
    assert len(sent(http, US_PRICE)) == 2
    assert len(sent(http, "/oauth2/tokenP")) == 1
    # The next call may renew again, but the one-a-minute rule holds: refused locally, not sent.
    with pytest.raises(KISTokenError):
        broker.fetch_price("AAPL")
    assert len(sent(http, US_PRICE)) == 3
    assert len(sent(http, "/oauth2/tokenP")) == 1


def test_other_answers_are_not_retried(us, http):
    seed(us, 1)
    # (EGW00201 is resent after the key's next slot, a bounded number of times: test_budget_wiring)
    busy = {"rt_cd": "1", "msg_cd": "EGW00002", "msg1": "서버 에러"}
    http.get(REAL_HOST + US_PRICE, json=busy, status=500)
    assert us.create_broker().fetch_price("AAPL") == busy
    assert len(http.calls) == 1


def test_no_token_or_secret_in_logs(us, http, clock, caplog):
    caplog.set_level(logging.DEBUG)
    seed(us, 1)
    http.get(REAL_HOST + US_PRICE, json=rejection(), status=500)
    http.get(REAL_HOST + US_PRICE, json=OK)
    http.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
    us.create_broker().fetch_price("AAPL")
    assert "EGW00123" in caplog.text
    for secret in (fake_token(1), fake_token(2), US_SECRET, KR_SECRET, "SECRET-TOKEN"):
        assert secret not in caplog.text


# -- against the local sandbox -------------------------------------------------------------------


@pytest.fixture
def sandbox(env) -> Iterator[Sandbox]:
    with Sandbox() as sb:
        env["KIS_BASE_URL"] = sb.base_url
        yield sb


@pytest.fixture
def live_clock() -> FakeClock:
    """A clock that starts at the real time (the sandbox's) and moves when told to."""
    return FakeClock(time.time())


def test_sandbox_brokers_for_both_markets(make_manager, sandbox, live_clock, accounts_and_cwd):
    us, kr = (make_manager(cls, clock=live_clock) for cls in (USTokenManager, KRTokenManager))
    us_broker, kr_broker = us.create_broker(), kr.create_broker()
    assert us_broker.fetch_price("AAPL")["rt_cd"] == "0"
    assert kr_broker.fetch_price("005930")["rt_cd"] == "0"
    assert us_broker.access_token != kr_broker.access_token
    assert mojito_file(us)["access_token"] == us_broker.access_token
    assert mojito_file(kr)["access_token"] == kr_broker.access_token
    # Another process builds its own brokers: the stored tokens serve, no request is sent.
    again = make_manager(USTokenManager, clock=live_clock).create_broker()
    assert again.fetch_price("TSLA")["rt_cd"] == "0"
    assert sandbox.counters()["token_requests"] == {US_KEY: 1, KR_KEY: 1}
    assert list(accounts_and_cwd.iterdir()) == []


def test_sandbox_expired_token_is_renewed_once_and_the_call_retried(make_manager, sandbox, live_clock):
    manager = make_manager(KRTokenManager, clock=live_clock)
    broker = manager.create_broker()
    first = broker.access_token
    sandbox.advance(DAY)  # the broker's clock runs ahead: it says the token has expired
    live_clock.advance(120)  # past this host's one-a-minute rule
    assert broker.fetch_price("005930")["rt_cd"] == "0"
    counters = sandbox.counters()
    assert counters["token_requests"] == {KR_KEY: 2}
    assert counters["protected_calls"] == 2
    assert broker.access_token != first


def test_sandbox_unknown_token_is_replaced(make_manager, sandbox, live_clock):
    manager = make_manager(USTokenManager, clock=live_clock)
    broker = manager.create_broker()
    sandbox.reset()  # the broker forgets every token: EGW00121
    live_clock.advance(120)
    assert broker.fetch_price("AAPL")["rt_cd"] == "0"
    assert sandbox.counters()["token_requests"] == {US_KEY: 1}


def test_sandbox_renewal_by_another_process_reaches_the_broker(make_manager, sandbox, live_clock):
    sandbox.configure(same_token_window=0)  # so that a renewal yields a new token
    trader = make_manager(USTokenManager, clock=live_clock)
    broker = trader.create_broker()
    before = broker.access_token
    sandbox.advance(61)
    live_clock.advance(61)
    renewed = make_manager(USTokenManager, clock=live_clock).refresh_token().access_token
    live_clock.advance(2)
    assert broker.access_token == f"Bearer {renewed}" != before
    assert broker.fetch_price("AAPL")["rt_cd"] == "0"
    assert sandbox.counters()["token_requests"] == {US_KEY: 2}


# -- mojito stays off the CLI path ---------------------------------------------------------------


@pytest.mark.parametrize("market", ["us", "kr"])
def test_cli_does_not_import_mojito_or_pandas(tmp_path, market):
    environ = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path / "home"),
        "KIS_TOKEN_DIR": str(tmp_path / "tokens"),
        "KIS_DOTENV_PATH": os.devnull,
        "KIS_US_APP_KEY": US_KEY, "KIS_US_APP_SECRET": US_SECRET,
        "KIS_KR_APP_KEY": KR_KEY, "KIS_KR_APP_SECRET": KR_SECRET,
    }
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", f"{market}.token_manager", "check"],
        cwd=REPO_ROOT, env=environ, capture_output=True, text=True, timeout=30,
    )
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert "common.base_token_manager" in imported  # the list is real
    heavy = {name for name in imported if name.split(".")[0] in ("mojito", "pandas")}
    assert heavy == set()
