"""The broker client: answers, refusals, retries, and expiry parsing whatever the host's zone."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
import requests
import responses

from common.clock import parse_kst
from common.credentials import kis_client
from common.errors import BadResponseError, BrokerError, CredentialsError, RateLimitedError, TransientError
from tests.conftest import REAL_HOST, TOKEN_URL, SleepRecorder, refusal

NOW = datetime(2026, 11, 24, 0, 0, tzinfo=UTC).timestamp()


def issue(sleeps=None):
    sleep = sleeps or SleepRecorder()
    return kis_client.issue_token(REAL_HOST, "key", "secret", now=lambda: NOW, sleep=sleep)


@pytest.fixture(params=["UTC", "America/New_York", "Asia/Seoul", "Pacific/Kiritimati"])
def host_zone(request, monkeypatch):
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


def test_expiry_is_read_as_korea_time_whatever_the_hosts_zone(host_zone):
    # 2026-11-25 09:00:00 KST is 2026-11-25 00:00:00 UTC
    expected = datetime(2026, 11, 25, 0, 0, tzinfo=UTC).timestamp()
    assert parse_kst("2026-11-25 09:00:00") == expected


@responses.activate
def test_issue_sends_the_documented_request_and_reads_the_answer():
    responses.post(TOKEN_URL, json={
        "access_token": "tok-123", "access_token_token_expired": "2026-11-25 09:00:00",
        "token_type": "Bearer", "expires_in": 86400,
    })
    issued = issue()
    assert issued.access_token == "tok-123" and issued.token_type == "Bearer"
    assert issued.expires_at == datetime(2026, 11, 25, 0, 0, tzinfo=UTC).timestamp()
    request = responses.calls[0].request
    assert request.headers["Content-Type"] == "application/json"
    assert request.body == b'{"grant_type": "client_credentials", "appkey": "key", "appsecret": "secret"}'


@pytest.mark.parametrize(
    "code, error",
    [("EGW00133", RateLimitedError), ("EGW00103", CredentialsError), ("EGW00105", CredentialsError),
     ("EGW00999", BrokerError)],
)
@responses.activate
def test_refusals_become_typed_errors_with_code_and_message_and_are_not_retried(code, error):
    responses.post(TOKEN_URL, status=403, json=refusal(code, "설명"))
    sleeps = SleepRecorder()
    with pytest.raises(error) as caught:
        issue(sleeps)
    assert (caught.value.code, caught.value.broker_message, caught.value.status) == (code, "설명", 403)
    assert len(responses.calls) == 1 and sleeps.calls == []


@responses.activate
def test_refusal_in_the_api_envelope_is_recognised():
    responses.post(TOKEN_URL, status=500, json={"rt_cd": "1", "msg_cd": "EGW02004", "msg1": "모의투자 키"})
    with pytest.raises(CredentialsError, match="EGW02004"):
        issue()
    assert len(responses.calls) == 1


@responses.activate
def test_transient_faults_are_retried_with_backoff_then_succeed():
    responses.post(TOKEN_URL, status=503, body="<html>busy</html>")
    responses.post(TOKEN_URL, body=requests.ConnectionError("reset"))
    responses.post(TOKEN_URL, body='{"access_token": "tr')
    ok = {"access_token": "ok", "access_token_token_expired": "2026-11-25 09:00:00"}
    responses.post(TOKEN_URL, json=ok)
    sleeps = SleepRecorder()
    assert issue(sleeps).access_token == "ok"
    assert len(responses.calls) == 4
    assert len(sleeps.calls) == 3
    defaults = kis_client.Timeouts()
    assert all(0 < s <= defaults.backoff_max + defaults.backoff_jitter for s in sleeps.calls)


@responses.activate
def test_retries_are_bounded_in_count_and_time():
    responses.post(TOKEN_URL, status=502, body="bad gateway")
    sleeps = SleepRecorder()
    with pytest.raises(TransientError, match="HTTP 502"):
        issue(sleeps)
    assert len(responses.calls) == kis_client.Timeouts().max_attempts
    assert sum(sleeps.calls) < kis_client.Timeouts().budget


@responses.activate
def test_timeouts_are_always_set():
    responses.post(TOKEN_URL, body=requests.Timeout("slow"))
    seen = []
    original = requests.post

    def spy(*args, **kwargs):
        seen.append(kwargs.get("timeout"))
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(requests, "post", spy)
        with pytest.raises(TransientError, match="unreachable"):
            issue()
    assert seen and all(t is not None and t[0] > 0 and t[1] > 0 for t in seen)


@responses.activate
def test_client_error_without_a_code_is_not_retried():
    responses.post(TOKEN_URL, status=404, body="<html>not found</html>")
    with pytest.raises(BadResponseError, match="HTTP 404"):
        issue()
    assert len(responses.calls) == 1


@responses.activate
def test_revoke_sends_token_and_accepts_integer_code():
    url = REAL_HOST + kis_client.REVOKE_PATH
    responses.post(url, json={"code": 200, "message": "접근토큰 폐기에 성공하였습니다"})
    kis_client.revoke_token(REAL_HOST, "key", "secret", "tok", sleep=SleepRecorder())
    assert b'"token": "tok"' in responses.calls[0].request.body



def test_a_success_whose_body_breaks_off_is_lost_not_retried_and_not_unsent():
    """A 200 whose body is cut by a reset may stand for an issued token: not sent again, and the
    minute counts as spent (never a 'not sent')."""
    import socket
    import threading

    from common.credentials.kis_client import Timeouts, issue_token
    from common.errors import AnswerLostError, NotSentError

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    accepted = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                         b'{"access_token": "abc')
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()  # a reset in the middle of the body

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(AnswerLostError) as raised:
            issue_token(f"http://127.0.0.1:{server.getsockname()[1]}", "k", "s", now=lambda: 0.0,
                        sleep=lambda seconds: None, timeouts=Timeouts(attempt=2.0, budget=4.0))
        assert not isinstance(raised.value, NotSentError)
        assert len(accepted) == 1  # one request, not retried
    finally:
        server.close()
