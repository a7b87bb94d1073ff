"""Harder faults: clock steps, busy threads, garbage state, odd expiries, shared directories."""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import pytest
import responses

from common.credentials import kis_client
from common.credentials.records import TokenRecord
from common.errors import TokenUnavailableError, TransientError
from common.renewal import policy
from tests.conftest import (
    DAY,
    PAPER_HOST,
    TOKEN_URL,
    SleepRecorder,
    fake_token,
    refusal,
    token_answer,
    token_calls,
)

HOUR = 3600.0


def seed(manager, clock, left, token=None, **changes):
    fields = dict(access_token=token or fake_token(1), token_type="Bearer", issued_at=clock() - DAY + left,
                  expires_at=clock() + left, market=manager.market, environment=manager.environment,
                  key_fingerprint=manager.key_fingerprint())
    fields.update(changes)
    record = TokenRecord(**fields)
    manager.save_token(record)
    return record


def test_a_token_inside_the_expiry_margin_is_never_handed_out(us, clock):
    seed(us, clock, left=policy.EXPIRY_MARGIN - 60)
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, status=403, json=refusal("EGW00133"))
        with pytest.raises(TokenUnavailableError, match="EGW00133"):
            us.get_valid_token()


@pytest.mark.parametrize(
    "answer",
    [
        {"access_token": "tok-short-lived-xxxxxxxx", "expires_in": 120},
        {"access_token": "tok-far-future-xxxxxxxxx", "access_token_token_expired": "9999-12-31 23:59:59"},
        {"access_token": "tok-huge-expires-in-xxxx", "expires_in": 1e12},
        {"access_token": "tok-infinite-expires-xxx", "expires_in": float("inf")},
    ],
    ids=["two-minutes", "year-9999", "expires_in-1e12", "expires_in-inf"],
)
def test_unbelievable_expiries_are_refused_and_the_good_token_kept(us, clock, answer):
    seed(us, clock, left=policy.MANDATORY_WINDOW - 60)
    before = us.store.record.path.read_bytes()
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, body=json.dumps(answer), content_type="application/json")
        assert us.get_valid_token() == fake_token(1)
    assert us.store.record.path.read_bytes() == before
    assert us.load_renewal_state().last_outcome == "failed"


@pytest.mark.parametrize(
    "state",
    [{"refusals": {"EGW00133": "x"}}, {"alerts_sent": {"EGW00133": "yesterday"}}, {"renewals": True},
     "[" * 100_000],
    ids=["refusal-count-text", "alert-time-text", "bool-counter", "deeply-nested"],
)
def test_garbage_renewal_state_never_breaks_serving(make_manager, env, clock, state):
    """An unreadable state counts as "a request may just have been made": no request for a minute,
    the valid token kept, and the state written again whole."""
    manager = make_manager(environ={**env, "KIS_ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook"})
    seed(manager, clock, left=30 * 60)
    manager.store.state.path.write_text(state if isinstance(state, str) else json.dumps(state))
    with responses.RequestsMock() as mock:
        mock.add_passthru("http://127.0.0.1:9")
        mock.post(TOKEN_URL, status=403, json=refusal("EGW00133"))
        assert manager.get_valid_token() == fake_token(1)
        assert len(mock.calls) == 0
        assert manager.load_renewal_state().refusals == {"LOCAL": 1}
        clock.advance(61)
        assert manager.get_valid_token() == fake_token(1)
        assert len(mock.calls) == 1
    assert manager.load_renewal_state().refusals == {"LOCAL": 1, "EGW00133": 1}


def test_a_deeply_nested_token_file_is_treated_as_absent(us, clock):
    us.settings.token_dir.mkdir(mode=0o700, parents=True)
    us.store.record.path.write_text("[" * 100_000)
    assert us.load_token() is None
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
        assert us.get_valid_token() == fake_token(2)


def test_a_clock_stepped_back_does_not_freeze_the_memory_cache(make_manager, clock):
    reader, writer = make_manager(), make_manager()
    seed(writer, clock, left=20 * HOUR)
    assert reader.get_valid_token() == fake_token(1)
    clock.advance(-HOUR)  # NTP steps the clock back an hour
    seed(writer, clock, left=20 * HOUR, token=fake_token(2))
    assert reader.get_valid_token() == fake_token(2)


def test_a_clock_stepped_back_does_not_open_the_one_a_minute_guard(us, clock):
    seed(us, clock, left=20 * HOUR)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
        us.refresh_token()
        clock.advance(-30)
        with pytest.raises(Exception, match="not asking the broker"):
            us.refresh_token()
        assert len(token_calls(mock)) == 1  # (a look at the broker's clock is no token request)


def test_no_usable_token_after_a_refusal_costs_nothing_per_call(us, clock, monkeypatch):
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, status=403, json=refusal("EGW00133"))
        for _ in range(1000):
            with pytest.raises(TokenUnavailableError, match="EGW00133"):
                us.get_valid_token()
        assert len(mock.calls) == 1
    locks = []
    monkeypatch.setattr(us.store.lock, "hold", lambda timeout: locks.append(timeout))
    with pytest.raises(TokenUnavailableError):
        us.get_valid_token()
    assert locks == []
    assert us.load_renewal_state().refusals == {"EGW00133": 1}


def test_other_threads_keep_the_valid_token_while_one_renews(us, clock):
    seed(us, clock, left=50 * 60)
    entered, release = threading.Event(), threading.Event()

    def slow_broker(request):
        entered.set()
        release.wait(10)
        return 200, {}, json.dumps(token_answer(fake_token(2), clock() + DAY))

    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, TOKEN_URL, callback=slow_broker)
        renewer = threading.Thread(target=us.get_valid_token)
        renewer.start()
        assert entered.wait(10)
        assert us.get_valid_token() == fake_token(1)  # returned while the renewal is still blocked
        assert renewer.is_alive()
        release.set()
        renewer.join(10)
    assert us.get_valid_token() == fake_token(2)


def test_real_and_paper_sharing_a_directory_keep_their_own_valid_tokens(make_manager, env, clock, caplog):
    real = make_manager()
    paper = make_manager(environ={**env, "KIS_ENV": "paper"})
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
        mock.post(PAPER_HOST + "/oauth2/tokenP", json=token_answer(fake_token(2), clock() + DAY))
        assert real.get_valid_token() == fake_token(1)
        assert paper.get_valid_token() == fake_token(2)  # at once: paper never waits on real's minute
        with caplog.at_level(logging.WARNING):
            for _ in range(5):
                clock.advance(policy.SYNC_INTERVAL + 1)
                assert real.get_valid_token() == fake_token(1)
                assert paper.get_valid_token() == fake_token(2)
                # a new process of either environment takes its own token from the directory
                assert make_manager().get_valid_token() == fake_token(1)
                assert make_manager(environ={**env, "KIS_ENV": "paper"}).get_valid_token() == fake_token(2)
        assert len(mock.calls) == 2  # no thrash: no further issuance
    assert real.store.record.path != paper.store.record.path
    assert "ignoring" not in caplog.text


def test_warm_up_answered_with_the_same_token_does_not_claim_a_renewal(us, clock):
    record = seed(us, clock, left=17 * HOUR)
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), record.expires_at))
        _, renewed = us.warm_up(policy.MAX_HORIZON)
    assert renewed is False


def test_retries_stop_within_the_time_budget_even_when_each_attempt_is_slow(monkeypatch):
    fake_monotonic = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: fake_monotonic[0])
    timeouts = []

    def slow_failure(request):
        timeouts.append(request.req_kwargs["timeout"][1])
        fake_monotonic[0] += 8.0  # each attempt takes 8 s before a 503
        return 503, {}, "<html>busy</html>"

    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, TOKEN_URL, callback=slow_failure)
        with pytest.raises(TransientError):
            kis_client.issue_token("https://openapi.koreainvestment.com:9443", "k", "s",
                                   now=time.time, sleep=SleepRecorder())
    defaults = kis_client.Timeouts()
    assert len(timeouts) < defaults.max_attempts  # the budget, not the count, stopped it
    assert timeouts[-1] < defaults.attempt  # later attempts get what is left of the budget


def test_webhook_path_never_reaches_the_logs_at_debug(make_manager, env, clock, caplog):
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hook = f"http://127.0.0.1:{server.server_port}/services/T000/B000/SECRETPATH"
    manager = make_manager(environ={**env, "KIS_ALERT_WEBHOOK_URL": hook})
    seed(manager, clock, left=20 * HOUR)
    caplog.set_level(logging.DEBUG)
    try:
        with responses.RequestsMock() as mock:
            mock.add_passthru(f"http://127.0.0.1:{server.server_port}")
            mock.post(TOKEN_URL, status=403, json=refusal("EGW00133"))
            from common.cli.market import main

            assert main(lambda: manager, ["-vv", "refresh"], market="US") == 1
    finally:
        server.shutdown()
        server.server_close()
    assert "renewal alert sent to http://127.0.0.1" in caplog.text  # the webhook really was called
    assert "SECRETPATH" not in caplog.text
    assert fake_token(1) not in caplog.text


def test_a_token_that_cannot_be_stored_is_still_served_from_memory(us, clock, monkeypatch, caplog):
    from common.errors import StoreError

    def full_disk(record):
        raise StoreError("cannot write key record: No space left on device")

    monkeypatch.setattr(us.store.record, "save", full_disk)
    with responses.RequestsMock() as mock, caplog.at_level(logging.ERROR):
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
        assert us.get_valid_token() == fake_token(1)  # the broker issued it: it is not thrown away
        assert us.get_valid_token() == fake_token(1)
        assert len(mock.calls) == 1
    assert "serving it from memory" in caplog.text
    assert us.load_renewal_state().last_outcome == "renewed"


def test_a_held_back_request_waits_only_for_the_rest_of_the_minute(make_manager, clock):
    first, second = make_manager(), make_manager()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        for _ in range(4):
            mock.post(TOKEN_URL, status=503, body="<html>busy</html>")
        with pytest.raises(TokenUnavailableError):
            first.get_valid_token()
        clock.advance(55)
        with pytest.raises(TokenUnavailableError, match=r"next request possible in \d+ s") as held:
            second.get_valid_token()
        rest = int(re.search(r"possible in (\d+) s", str(held.value)).group(1))
        assert 0 < rest < 10
        mock.replace(responses.POST, TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
        clock.advance(rest + 1)  # the key's minute is over: the second process asks now, not 61 s later
        assert second.get_valid_token() == fake_token(2)


def test_a_clock_stepped_back_never_lifts_the_one_a_minute_memory(us, clock):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TOKEN_URL, status=403, json=refusal("EGW00133"))
        for _ in range(5):
            with pytest.raises(TokenUnavailableError):
                us.get_valid_token()
            clock.advance(-2 * 3600)  # the host's clock jumps back two hours, again and again
        assert len(token_calls(mock)) == 1
