"""Tests for the local KIS OAuth sandbox (common/sandbox/server.py).

Every server listens on 127.0.0.1 with a free port; time moves only through the clock knob.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from common.sandbox import Sandbox

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 5
DOMESTIC = "/uapi/domestic-stock/v1/quotations/inquire-price"
OVERSEAS = "/uapi/overseas-price/v1/quotations/price"
DAY = 86400


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        yield sandbox


@pytest.fixture
def registered() -> Iterator[Sandbox]:
    with Sandbox(apps={"KEY1": "SECRET1", "KEY2": "SECRET2"}) as sandbox:
        yield sandbox


def post(sb: Sandbox, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
    return requests.post(sb.base_url + path, json=body, timeout=TIMEOUT, **kwargs)


def token(sb: Sandbox, key: str = "KEY1", secret: str = "SECRET1") -> requests.Response:
    body = {"grant_type": "client_credentials", "appkey": key, "appsecret": secret}
    return post(sb, "/oauth2/tokenP", body)


def quote(sb: Sandbox, access_token: str, key: str = "KEY1", path: str = DOMESTIC) -> requests.Response:
    headers = {
        "authorization": f"Bearer {access_token}",
        "appkey": key,
        "appsecret": "x",
    }
    params = {"FID_COND_MRKT_DIV_CODE": "J", "FID_INPUT_ISCD": "005930"}
    return requests.get(sb.base_url + path, headers=headers, params=params, timeout=TIMEOUT)


def kst_epoch(text: str) -> float:
    moment = datetime.strptime(text, "%Y-%m-%d %H:%M:%S")
    return moment.replace(tzinfo=timezone(timedelta(hours=9))).timestamp()


def assert_oauth_error(reply: requests.Response, status: int, code: str) -> None:
    assert reply.status_code == status
    body = reply.json()
    assert body["error_code"] == code
    assert isinstance(body["error_description"], str) and body["error_description"]


def assert_api_error(reply: requests.Response, code: str) -> None:
    assert reply.status_code == 500
    body = reply.json()
    assert (body["rt_cd"], body["msg_cd"]) == ("1", code)


# -- tokenP ------------------------------------------------------------------------------------


def test_token_answer_has_broker_shape_and_kst_expiry_a_day_ahead(sb: Sandbox) -> None:
    reply = token(sb)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert set(body) == {
        "access_token",
        "access_token_token_expired",
        "token_type",
        "expires_in",
    }
    assert isinstance(body["access_token"], str) and len(body["access_token"]) >= 32
    assert body["token_type"] == "Bearer"
    assert isinstance(body["expires_in"], int) and body["expires_in"] == DAY
    assert abs(kst_epoch(body["access_token_token_expired"]) - (time.time() + DAY)) < 5


def test_same_token_within_six_hours_counts_one_issuance(sb: Sandbox) -> None:
    first = token(sb).json()
    sb.advance(2 * 3600)
    second = token(sb).json()
    assert second["access_token"] == first["access_token"]
    assert second["access_token_token_expired"] == first["access_token_token_expired"]
    assert abs(second["expires_in"] - (DAY - 2 * 3600)) <= 1
    counters = sb.counters()
    assert counters["tokens_issued"] == {"KEY1": 1}
    assert counters["token_requests"] == {"KEY1": 2}


def test_new_token_after_six_hours(sb: Sandbox) -> None:
    first = token(sb).json()
    sb.advance(6 * 3600 + 1)
    second = token(sb).json()
    assert second["access_token"] != first["access_token"]
    assert second["expires_in"] == DAY
    assert sb.counters()["tokens_issued"] == {"KEY1": 2}


def test_second_request_within_a_minute_is_rate_limited(sb: Sandbox) -> None:
    assert token(sb).status_code == 200
    refused = token(sb)
    assert_oauth_error(refused, 403, "EGW00133")
    assert refused.json()["error_description"] == "접근토큰 발급 잠시 후 다시 시도하세요(1분당 1회)"
    assert token(sb, key="OTHER").status_code == 200  # the limit is per app key
    sb.advance(61)
    assert token(sb).status_code == 200
    assert sb.counters()["rate_limited"] == {"KEY1": 1}


def test_registered_apps_refuse_wrong_key_and_secret(registered: Sandbox) -> None:
    assert_oauth_error(token(registered, key="NOPE"), 403, "EGW00103")
    assert_oauth_error(token(registered, secret="WRONG"), 403, "EGW00105")
    assert token(registered).status_code == 200
    assert token(registered, key="KEY2", secret="SECRET2").status_code == 200


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"grant_type": "password", "appkey": "K", "appsecret": "S"}, "EGW00101"),
        ({"grant_type": "client_credentials", "appsecret": "S"}, "EGW00102"),
        (
            {"grant_type": "client_credentials", "appkey": "", "appsecret": "S"},
            "EGW00102",
        ),
        ({"grant_type": "client_credentials", "appkey": "K"}, "EGW00104"),
    ],
)
def test_bad_token_request_is_refused(sb: Sandbox, body: dict[str, str], code: str) -> None:
    assert_oauth_error(post(sb, "/oauth2/tokenP", body), 403, code)
    assert sb.counters()["tokens_issued"] == {}


def test_non_json_body_is_a_400_in_error_shape(sb: Sandbox) -> None:
    reply = requests.post(sb.base_url + "/oauth2/tokenP", data=b"appkey=K", timeout=TIMEOUT)
    assert_oauth_error(reply, 400, "EGW00101")


# -- revokeP and Approval ----------------------------------------------------------------------


def test_revoked_token_is_refused_and_next_issuance_is_new(registered: Sandbox) -> None:
    old = token(registered).json()["access_token"]
    body = {"appkey": "KEY1", "appsecret": "SECRET1", "token": old}
    reply = post(registered, "/oauth2/revokeP", body)
    assert reply.status_code == 200
    assert reply.json() == {"code": 200, "message": "접근토큰 폐기에 성공하였습니다"}
    assert_api_error(quote(registered, old), "EGW00121")
    assert_oauth_error(token(registered), 403, "EGW00133")  # revoking does not lift the limit
    registered.advance(61)
    new = token(registered).json()["access_token"]
    assert new != old
    assert quote(registered, new).status_code == 200
    assert registered.counters()["revocations"] == 1


def test_revoke_refuses_bad_secret_and_unknown_token(registered: Sandbox) -> None:
    issued = token(registered).json()["access_token"]
    bad_secret = {"appkey": "KEY1", "appsecret": "WRONG", "token": issued}
    assert_oauth_error(post(registered, "/oauth2/revokeP", bad_secret), 403, "EGW00105")
    unknown = {"appkey": "KEY1", "appsecret": "SECRET1", "token": "garbage"}
    assert_oauth_error(post(registered, "/oauth2/revokeP", unknown), 403, "EGW00121")
    other_key = {"appkey": "KEY2", "appsecret": "SECRET2", "token": issued}
    assert_oauth_error(post(registered, "/oauth2/revokeP", other_key), 403, "EGW00121")
    assert quote(registered, issued).status_code == 200
    assert registered.counters()["revocations"] == 0


def test_approval_takes_secretkey(registered: Sandbox) -> None:
    body = {
        "grant_type": "client_credentials",
        "appkey": "KEY1",
        "secretkey": "SECRET1",
    }
    reply = post(registered, "/oauth2/Approval", body)
    assert reply.status_code == 200
    uuid.UUID(reply.json()["approval_key"])
    wrong = dict(body, secretkey="WRONG")
    assert_oauth_error(post(registered, "/oauth2/Approval", wrong), 403, "EGW00105")
    appsecret_instead = {
        "grant_type": "client_credentials",
        "appkey": "KEY1",
        "appsecret": "SECRET1",
    }
    assert_oauth_error(post(registered, "/oauth2/Approval", appsecret_instead), 403, "EGW00104")
    assert registered.counters()["approvals"] == 1


# -- protected endpoints -----------------------------------------------------------------------


def test_protected_endpoints_answer_quotes_with_a_valid_token(sb: Sandbox) -> None:
    access = token(sb).json()["access_token"]
    domestic = quote(sb, access)
    assert domestic.status_code == 200
    body = domestic.json()
    assert (body["rt_cd"], body["msg_cd"]) == ("0", "MCA00000")
    assert body["output"]["stck_prpr"] == "70000"
    overseas = quote(sb, access, path=OVERSEAS).json()
    assert float(overseas["output"]["last"]) > 0
    headers = {"Authorization": f"Bearer {access}", "AppKey": "KEY1"}
    other = requests.post(sb.base_url + "/uapi/other/v1/thing", headers=headers, json={}, timeout=TIMEOUT)
    assert other.status_code == 200 and other.json()["rt_cd"] == "0"
    assert sb.counters()["protected_calls"] == 3


def test_protected_endpoint_refuses_expired_token(sb: Sandbox) -> None:
    access = token(sb).json()["access_token"]
    sb.advance(DAY + 1)
    assert_api_error(quote(sb, access), "EGW00123")


def test_protected_endpoint_refuses_garbage_missing_or_foreign_token(
    sb: Sandbox,
) -> None:
    access = token(sb).json()["access_token"]
    assert_api_error(quote(sb, "garbage"), "EGW00121")
    assert_api_error(quote(sb, access, key="KEY2"), "EGW00121")
    missing = requests.get(sb.base_url + DOMESTIC, headers={"appkey": "KEY1"}, timeout=TIMEOUT)
    assert_api_error(missing, "EGW00121")


# -- faults ------------------------------------------------------------------------------------


def test_drop_fault_closes_without_answer_and_is_not_an_issuance(sb: Sandbox) -> None:
    sb.inject_fault("drop")
    with pytest.raises(requests.ConnectionError):
        token(sb)
    assert token(sb).status_code == 200  # not rate-limited by the dropped request
    assert sb.counters()["tokens_issued"] == {"KEY1": 1}


def test_slow_fault_answers_after_the_delay(sb: Sandbox) -> None:
    sb.inject_fault("slow", delay=0.2)
    started = time.monotonic()
    reply = token(sb)
    assert time.monotonic() - started >= 0.2
    assert reply.status_code == 200 and reply.json()["token_type"] == "Bearer"


def test_html_fault_is_a_200_html_page(sb: Sandbox) -> None:
    sb.inject_fault("html")
    reply = token(sb)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/html")
    with pytest.raises(ValueError):
        reply.json()


def test_truncated_fault_is_cut_json(sb: Sandbox) -> None:
    sb.inject_fault("truncated")
    reply = token(sb)
    assert reply.status_code == 200
    assert reply.text == '{"access_token": "abc'
    with pytest.raises(ValueError):
        reply.json()


def test_5xx_faults_served_count_times_then_normal(sb: Sandbox) -> None:
    sb.inject_fault("5xx", count=2)
    assert [token(sb).status_code for _ in range(3)] == [503, 503, 200]
    assert sb.counters()["faults_served"] == 2


def test_faults_over_http_on_another_path_and_clearing(sb: Sandbox) -> None:
    access = token(sb).json()["access_token"]
    reply = post(sb, "/sandbox/faults", {"mode": "5xx", "count": 3, "path": DOMESTIC})
    assert reply.status_code == 200
    assert quote(sb, access).status_code == 503
    assert requests.delete(sb.base_url + "/sandbox/faults", timeout=TIMEOUT).status_code == 200
    assert quote(sb, access).status_code == 200
    assert post(sb, "/sandbox/faults", {"mode": "nonsense"}).status_code == 400


# -- control endpoints -------------------------------------------------------------------------


def test_counters_over_http_match_python_api(sb: Sandbox) -> None:
    token(sb)
    token(sb)
    reply = requests.get(sb.base_url + "/sandbox/counters", timeout=TIMEOUT)
    assert reply.json() == sb.counters()
    expected = {
        "token_requests": {"KEY1": 2},
        "tokens_issued": {"KEY1": 1},
        "rate_limited": {"KEY1": 1},
        "revocations": 0,
        "approvals": 0,
        "protected_calls": 0,
    }
    assert expected.items() <= reply.json().items()


def test_clock_config_and_reset_over_http(sb: Sandbox) -> None:
    access = token(sb).json()["access_token"]
    assert post(sb, "/sandbox/clock", {"offset": DAY + 1}).json()["offset"] == DAY + 1
    assert_api_error(quote(sb, access), "EGW00123")
    config = post(sb, "/sandbox/config", {"rate_limit": 0, "token_lifetime": 100}).json()
    assert config == {
        "rate_limit": 0,
        "token_lifetime": 100,
        "same_token_window": 6 * 3600,
    }
    assert token(sb).json()["expires_in"] == 100
    assert token(sb).status_code == 200  # no rate limit any more
    assert post(sb, "/sandbox/config", {"rate_limit": -1}).status_code == 400
    assert post(sb, "/sandbox/reset").status_code == 200
    assert sb.counters()["token_requests"] == {}
    assert_api_error(quote(sb, access), "EGW00121")


def test_non_loopback_host_is_refused_before_binding() -> None:
    with pytest.raises(ValueError, match="loopback"):
        Sandbox(host="0.0.0.0")


# -- CLI ---------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "common.sandbox", *args]
    return subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=10)


def test_cli_prints_url_serves_and_exits_cleanly_on_sigterm() -> None:
    command = [
        sys.executable,
        "-m",
        "common.sandbox",
        "--port",
        "0",
        "--app",
        "KEY1:SECRET1",
    ]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "no URL printed"
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        body = {
            "grant_type": "client_credentials",
            "appkey": "KEY1",
            "appsecret": "SECRET1",
        }
        reply = requests.post(url + "/oauth2/tokenP", json=body, timeout=TIMEOUT)
        assert reply.status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    assert proc.returncode == 0
    assert err == ""
    assert "SECRET1" not in out and reply.json()["access_token"] not in out


def test_cli_refuses_non_loopback_host() -> None:
    result = run_cli("--host", "0.0.0.0")
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "loopback" in result.stderr


def test_cli_refuses_bad_app_without_echoing_it() -> None:
    result = run_cli("--app", "KEY1=TOPSECRET")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "TOPSECRET" not in result.stderr
