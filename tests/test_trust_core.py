"""Trust in what the engine reads (issue 16, SPEC §12): the renewal state, the clock, the broker's
answers, the daily budget and the observers.

The broker is mocked with ``responses`` (its ``Date`` header set where the test needs one); time is
the injected clock. The several-host cases use a real Valkey/Redis server on 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import responses

from common.cli.market import main
from common.credentials.records import TokenRecord
from common.errors import DailyLimitError, KISTokenError, RequestHeldBackError, TokenUnavailableError
from common.renewal import alerts
from common.settings import Settings
from common.store import host_clock
from tests.conftest import (
    DAY,
    REAL_HOST,
    TOKEN_URL,
    fake_token,
    refusal,
    token_answer,
    token_calls,
)
from us.token_manager import USTokenManager

HOUR = 3600.0
APPROVAL_URL = REAL_HOST + "/oauth2/Approval"


def seed(manager, clock, left, token=None):
    record = TokenRecord(token or fake_token(1), "Bearer", clock() - DAY + left, clock() + left,
                         manager.market, manager.environment, manager.key_fingerprint())
    manager.save_token(record)
    return record


def http_date(epoch: float) -> dict[str, str]:
    return {"Date": formatdate(epoch, usegmt=True)}


def state_file(manager):
    return manager.store.state.path


# -- the one-a-minute memory errs on the safe side -----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ['{"last_request_at": NaN}', '{"last_request_at": Infinity}', '{"last_request_at": -1}',
     '{"last_request_at": 1e300}', "g", "garbage{", '{"issuances": [NaN]}', ""],
    ids=["nan", "infinity", "negative", "far-future", "one-byte", "garbage", "nan-issuance", "empty"],
)
def test_an_unusable_state_counts_as_a_request_just_made_for_one_minute(us, clock, text, caplog):
    seed(us, clock, left=30 * 60)  # inside the advisory window: a renewal is due
    state_file(us).write_text(text)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
        assert us.get_valid_token() == fake_token(1)  # held back: "the renewal state was unreadable"
        assert "renewal state was unreadable" in caplog.text
        with pytest.raises(RequestHeldBackError, match="requested 0 s ago"):
            us.refresh_token()
        assert token_calls(mock) == []
        stored = json.loads(state_file(us).read_text())  # written again whole, finite
        assert stored["last_request_at"] == clock()
        clock.advance(61)
        assert us.get_valid_token() == fake_token(2)
        assert len(token_calls(mock)) == 1
    assert "counting it as a request made just now" in caplog.text


def test_a_state_garbled_right_after_a_refresh_never_costs_a_second_request(us, clock):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
        us.refresh_token()
        state_file(us).write_bytes(b"\x00")
        clock.advance(1)
        with pytest.raises(RequestHeldBackError):
            us.refresh_token()
        assert len(token_calls(mock)) == 1


def test_a_last_request_in_the_future_is_held_back_without_moving_it_back(us, clock):
    """The broker's clock cannot be read: hold back, and leave the stamp where it is."""
    seed(us, clock, left=30 * 60)
    future = clock() + HOUR
    state_file(us).write_text(json.dumps({"last_request_at": future}))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        with pytest.raises(RequestHeldBackError, match="in this host's future"):
            us.refresh_token()
        assert token_calls(mock) == []
    assert json.loads(state_file(us).read_text())["last_request_at"] == future


@pytest.mark.broker_clock
def test_a_future_stamp_that_the_brokers_clock_disproves_holds_back_one_minute(us, clock):
    seed(us, clock, left=30 * 60)
    state_file(us).write_text(json.dumps({"last_request_at": clock() + HOUR}))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(REAL_HOST + "/", status=404, headers=http_date(clock()))
        mock.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
        with pytest.raises(RequestHeldBackError, match="stamp lay in the broker's future"):
            us.refresh_token()
        assert json.loads(state_file(us).read_text())["last_request_at"] == clock()
        clock.advance(61)
        assert us.refresh_token().access_token == fake_token(2)
        assert len(token_calls(mock)) == 1


# -- the broker's clock ---------------------------------------------------------------------------------


def test_a_clock_that_jumps_a_day_ahead_keeps_serving_the_valid_token_after_one_request(us, clock, caplog):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        broker_now = clock()
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), broker_now + DAY),
                  headers=http_date(broker_now))
        assert us.get_valid_token() == fake_token(1)
        clock.advance(DAY)  # the host's clock jumps a day; the broker's moved 10 s
        mock.replace(responses.POST, TOKEN_URL, status=403, json=refusal("EGW00133"),
                     headers=http_date(broker_now + 10))
        for _ in range(100):
            assert us.get_valid_token() == fake_token(1)
        assert len(token_calls(mock)) == 2  # one probe with the token request, and no more
    assert abs(us.now.offset + DAY) < 15
    stamp = json.loads(state_file(us).read_text())["last_request_at"]
    assert abs(stamp - (broker_now + 10)) < 15  # in the broker's time: no other host held back a day
    assert host_clock.load_offset(us.settings.token_dir) == us.now.offset
    assert "ahead of the broker's" in caplog.text
    assert us.get_token_info()["clock"].startswith("this host's clock is 23h")


@pytest.mark.broker_clock
def test_a_clock_nine_hours_behind_never_serves_a_token_the_broker_has_expired(make_manager, clock):
    behind = make_manager()
    broker_now = clock() + 9 * HOUR
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), broker_now + DAY),
                  headers=http_date(broker_now))
        assert behind.get_valid_token() == fake_token(1)
        assert round(behind.now.offset) == 9 * HOUR
        # a new process of the same host: starts from the host's offset, checked with one look
        mock.get(REAL_HOST + "/", status=404, headers=http_date(broker_now))
        later = make_manager()
        assert later.get_valid_token() == fake_token(1)
        assert round(later.now.offset) == 9 * HOUR
        clock.advance(DAY - 4 * 60)  # the broker's time: 4 min left; the host's clock says 9 h more
        mock.replace(responses.POST, TOKEN_URL, json=token_answer(fake_token(2), clock() + 9 * HOUR + DAY),
                     headers=http_date(clock() + 9 * HOUR))
        assert later.get_valid_token() == fake_token(2)
        assert later.get_token_info()["clock_offset_seconds"] == 9 * 3600


def test_a_small_skew_is_no_offset(us, clock):
    assert us.now.observe(formatdate(clock() + 1, usegmt=True))
    assert us.now.offset == 0.0
    assert not us.now.observe("yesterday") and not us.now.observe(None) and not us.now.observe(["x"])


# -- the daily budget -----------------------------------------------------------------------------------


def test_the_daily_budget_refuses_with_the_variable_and_keeps_serving(make_manager, env, clock, monkeypatch):
    posted = []
    monkeypatch.setattr(alerts, "_post", lambda url, text, market: posted.append(text))
    us = make_manager(environ={**env, "KIS_TOKEN_DAILY_LIMIT": "3",
                               "KIS_ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook"})
    tokens = iter(fake_token(n) for n in range(1, 10))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(responses.POST, TOKEN_URL, callback=lambda request: (
            200, {}, json.dumps(token_answer(next(tokens), clock() + DAY))))
        for _ in range(3):
            us.refresh_token()
            clock.advance(61)
        for _ in range(3):
            with pytest.raises(DailyLimitError, match="KIS_TOKEN_DAILY_LIMIT=3"):
                us.refresh_token()
            clock.advance(61)
        assert len(token_calls(mock)) == 3
        clock.advance(DAY - 6 * 61 + 30 * 60)  # the last token is now inside its advisory window
        assert us.get_valid_token() == fake_token(4)  # the first issuance left the window: one more
        assert len(token_calls(mock)) == 4
    assert len(posted) == 1 and "DAILY_LIMIT" in posted[0]
    assert us.get_token_info()["issued_24h"] == 1  # the three of yesterday have left the window


def test_the_daily_budget_keeps_a_valid_token_in_service(make_manager, env, clock):
    us = make_manager(environ={**env, "KIS_TOKEN_DAILY_LIMIT": "1"})
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + 2 * HOUR))
        assert us.get_valid_token() == fake_token(1)
        clock.advance(HOUR + 30 * 60)  # inside the advisory window: a renewal is due, and refused
        for _ in range(50):
            assert us.get_valid_token() == fake_token(1)
        assert len(token_calls(mock)) == 1
        clock.advance(26 * 60)  # expired in all but 4 minutes: no token to hand out
        with pytest.raises(TokenUnavailableError, match="KIS_TOKEN_DAILY_LIMIT"):
            us.get_valid_token()


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "99999"])
def test_a_bad_daily_limit_is_a_configuration_error_naming_it(env, value, capsys, monkeypatch):
    monkeypatch.chdir(env["KIS_TOKEN_DIR"].rsplit("/", 1)[0])
    code = main(lambda: USTokenManager(Settings({**env, "KIS_TOKEN_DAILY_LIMIT": value}, dotenv_path=False)),
                ["get"], market="US")
    assert code == 3
    assert "KIS_TOKEN_DAILY_LIMIT" in capsys.readouterr().err


# -- garbled answers -------------------------------------------------------------------------------------

GARBLED = {
    "bogus-charset-error": dict(status=500, body=b'{"error_code": "EGW00001"}',
                                content_type="application/json; charset=x-bogus"),
    "deep-nesting": dict(status=200, body=b"[" * 200_000),
    "deep-nesting-500": dict(status=500, body=b"{\"a\":" * 50_000),
    "token-a-list": dict(status=200, json={"access_token": ["x"], "access_token_token_expired": "x"}),
    "token-a-number": dict(status=200, json={"access_token": 12345, "expires_in": 86400}),
    "token-non-ascii": dict(status=200, json={"access_token": "토큰" * 20, "expires_in": 86400}),
    "token-oversized": dict(status=200, json={"access_token": "x" * 100_000, "expires_in": 86400}),
    "token-control-chars": dict(status=200, json={"access_token": "abc\x00def" * 4, "expires_in": 86400}),
    "expiry-a-dict": dict(status=200, json={"access_token": "t" * 40, "access_token_token_expired": {}}),
    "expiry-year-9999": dict(status=200, json={"access_token": "t" * 40,
                                               "access_token_token_expired": "9999-12-31 23:59:59"}),
    "code-a-list": dict(status=403, json={"error_code": ["EGW00133"], "error_description": {"x": 1}}),
    "msg-cd-a-dict": dict(status=500, json={"rt_cd": "1", "msg_cd": {"a": 1}, "msg1": None}),
    "json-null": dict(status=200, body=b"null"),
    "json-string": dict(status=200, body=b'"access_token"'),
    "not-utf8": dict(status=200, body=b"\xff\xfe\x00garbage"),
    "huge-body": dict(status=200, body=b'{"access_token": "' + b"x" * (2 << 20) + b'"}'),
}


def add_garbled(mock, url, case):
    spec = dict(GARBLED[case])
    status = spec.pop("status")
    if "json" in spec:
        mock.add(responses.POST, url, status=status, json=spec["json"])
    else:
        mock.add(responses.POST, url, status=status, body=spec["body"],
                 content_type=spec.get("content_type", "application/json"))


@pytest.mark.parametrize("case", sorted(GARBLED))
def test_a_garbled_token_answer_keeps_the_valid_token_in_service(us, clock, case):
    seed(us, clock, left=30 * 60)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        for _ in range(4):  # every retry gets the same garbage
            add_garbled(mock, TOKEN_URL, case)
        assert us.get_valid_token() == fake_token(1)
        with pytest.raises(KISTokenError) as raised:
            clock.advance(61)
            us.refresh_token()
    message = str(raised.value)
    assert "\n" not in message and len(message) < 400
    state = us.load_renewal_state()
    assert state.last_outcome in ("failed", "refused")
    assert us.load_token().access_token == fake_token(1)


@pytest.mark.parametrize("case", sorted(GARBLED))
def test_a_garbled_approval_answer_is_a_one_line_error(us, clock, case):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        for _ in range(4):
            add_garbled(mock, APPROVAL_URL, case)
        with pytest.raises(KISTokenError) as raised:
            us.get_approval_key()
    assert "\n" not in str(raised.value)
    assert us.load_approval_key() is None


def test_a_bogus_charset_on_a_good_answer_is_read_as_utf8(us, clock):
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, TOKEN_URL, status=200,
                 body=json.dumps(token_answer(fake_token(1), clock() + DAY)).encode(),
                 content_type="application/json; charset=x-bogus")
        assert us.get_valid_token() == fake_token(1)


# -- observers never hold the lock ---------------------------------------------------------------------


class _SlowWebhook(BaseHTTPRequestHandler):
    """Holds every request until the test lets go, and notes whether the key's lock was free."""

    def do_POST(self) -> None:
        self.server.entered.set()
        self.server.lock_free.append(self.server.probe())
        self.server.release.wait(10)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_slow_webhook_never_holds_the_lock_and_costs_the_caller_its_deadline(make_manager, env, clock,
                                                                                 monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowWebhook)
    server.entered, server.release, server.lock_free = threading.Event(), threading.Event(), []
    other = make_manager()

    def lock_is_free() -> bool:
        try:
            with other.store.lock.hold(0):
                return True
        except KISTokenError:
            return False

    server.probe = lock_is_free
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(alerts, "DEADLINE", 0.3)
    try:
        us = make_manager(environ={**env, "KIS_ALERT_WEBHOOK_URL": f"http://127.0.0.1:{server.server_port}/h"})
        seed(us, clock, left=30 * 60)
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            mock.add_passthru("http://127.0.0.1")
            mock.post(TOKEN_URL, status=403, json=refusal("EGW00133"))
            assert us.get_valid_token() == fake_token(1)  # returned while the webhook still holds on
        assert server.entered.is_set() and not server.release.is_set()
        assert server.lock_free == [True]
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()



# -- a rejected token whose replacement is held back ------------------------------------------------------


def test_rejected_calls_while_the_replacement_is_held_back_cost_no_lock_no_disk_one_line(us, clock, caplog,
                                                                                          monkeypatch):
    import logging

    import requests

    from common.auth import KISAuth

    seed(us, clock, left=20 * HOUR)
    us.settings = us.settings.with_overrides({"KIS_RATE_LIMIT": "100000"})  # 220 calls: not paced at 18/s
    quote = REAL_HOST + "/uapi/overseas-price/v1/quotations/price"
    session = requests.Session()
    session.auth = KISAuth(us)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(quote, status=500, json={"rt_cd": "1", "msg_cd": "EGW00123", "msg1": "기간이 만료된 token"})
        mock.post(TOKEN_URL, status=403, json=refusal("EGW00133"))
        assert session.get(quote).status_code == 500  # the first: one request, refused
        locks, saves = [], []
        monkeypatch.setattr(us.store.lock, "hold", lambda timeout: locks.append(timeout))
        monkeypatch.setattr(us.store.state, "save", lambda state: saves.append(state))
        with caplog.at_level(logging.DEBUG, logger="common.auth"):
            for _ in range(220):
                assert session.get(quote).status_code == 500
        assert len(token_calls(mock)) == 1
    assert locks == [] and saves == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) <= 1


# -- the first retry after a failure says what the failure was ------------------------------------------


def test_a_refused_connection_spends_no_minute_and_names_its_reason(make_manager, env):
    import socket

    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    us = make_manager(environ={**env, "KIS_BASE_URL": f"http://127.0.0.1:{port}"})
    refused = rf"127\.0\.0\.1:{port}/oauth2/tokenP: connection refused"
    with pytest.raises(TokenUnavailableError, match=refused):
        us.get_valid_token()
    assert us.load_renewal_state().last_request_at is None  # nothing was sent: the minute is not spent
    assert us.load_renewal_state().last_outcome == "failed"


def test_held_back_after_a_refused_secret_says_so_and_keeps_exit_3(env, capsys, clock, monkeypatch):
    from common.cli.market import main

    def manager():
        return USTokenManager(Settings(env, dotenv_path=False), clock=clock)

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TOKEN_URL, status=403,
                  json={"error_code": "EGW00105", "error_description": "유효하지 않은 AppSecret"})
        assert main(manager, ["get"], market="US") == 3
        first = capsys.readouterr().err
        clock.advance(1)
        assert main(manager, ["get"], market="US") == 3
        second = capsys.readouterr().err
        assert len(token_calls(mock)) == 1
    assert "EGW00105" in first and "KIS_US_APP_SECRET" in first
    assert "not asking the broker" in second and "that request failed: EGW00105" in second
    assert "KIS_US_APP_SECRET" in second


def test_a_directory_at_the_record_path_is_a_clear_error_before_any_request(us, make_manager, clock):
    us.store.record.path.mkdir(parents=True)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
        for manager in (us, make_manager()):  # this process, then the next: the same clear error
            with pytest.raises(TokenUnavailableError, match="is a directory, not a file: remove it"):
                manager.get_valid_token()
        assert token_calls(mock) == []
    assert "is a directory" in us.get_token_info()["problem"]


@pytest.mark.broker_clock
def test_reading_the_brokers_clock_is_bounded_by_wall_time_even_when_the_answer_drips():
    import socket

    from common.credentials import kis_client

    answer = b"HTTP/1.1 404 Not Found\r\nDate: " + formatdate(usegmt=True).encode() + b"\r\n\r\n"
    stop = threading.Event()

    def drip(server: socket.socket) -> None:  # one byte every 50 ms: each read is quick, the whole slow
        conn, _ = server.accept()
        with conn:
            for byte in answer:
                if stop.wait(0.05):
                    return
                conn.sendall(bytes([byte]))

    seen = []
    with socket.socket() as server:  # the caller may hold the key's lock: this must not hold it
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        thread = threading.Thread(target=drip, args=(server,), daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.getsockname()[1]}"
            assert kis_client.probe_date(url, seen.append, timeout=0.3) is False
        finally:
            stop.set()
            thread.join(5)
    assert seen == []  # nothing observed, no clock moved


def test_the_stored_issuances_never_outgrow_what_a_reader_accepts():
    from common.store.protocols import MAX_ISSUANCES, RenewalState

    state = RenewalState(issuances=[1795474800.0 + n for n in range(MAX_ISSUANCES + 50)])
    again = RenewalState.from_json(json.dumps(state.to_dict()))
    assert len(again.issuances) == MAX_ISSUANCES and again.issuances[-1] == state.issuances[-1]
