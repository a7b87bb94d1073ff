"""AC2 (automatic renewal) and AC3 (refused renewals), with the renewal windows of SPEC §6."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
import responses

from common.credentials.records import TokenRecord
from common.errors import RateLimitedError, TokenUnavailableError
from common.renewal import policy
from tests.conftest import DAY, TOKEN_URL, fake_token, refusal, token_answer

HOUR = 3600.0


def issue(manager, clock, token=None, lifetime=DAY):
    """Give ``manager`` a token through a mocked broker; return it."""
    token = token or fake_token(1)
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(token, clock() + lifetime))
        assert manager.get_valid_token() == token
    return token


def move_to(clock, record: TokenRecord, seconds_left: float) -> None:
    clock.now = record.expires_at - seconds_left


# -- AC2: automatic renewal ----------------------------------------------------------------------


def test_expired_token_is_detected(us, clock):
    issue(us, clock)
    record = us.load_token()
    assert not us.is_token_expired()
    move_to(clock, record, policy.EXPIRY_MARGIN + 1)
    assert not us.is_token_expired()
    move_to(clock, record, policy.EXPIRY_MARGIN)
    assert us.is_token_expired()
    move_to(clock, record, -10)
    assert us.is_token_expired(record)


@responses.activate
def test_expired_token_triggers_automatic_renewal(us, clock):
    old = issue(us, clock)
    clock.advance(DAY + 10)
    responses.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
    assert us.get_valid_token() == fake_token(2) != old
    assert len(responses.calls) == 1
    assert json.loads(us.store.record.path.read_text())["access_token"] == fake_token(2)


@responses.activate
def test_expiry_comes_from_the_broker_not_from_issue_time_plus_a_day(us, clock):
    answer = token_answer(fake_token(), clock() + 3 * HOUR, expires_in=86400)
    responses.post(TOKEN_URL, json=answer)
    record = us.get_valid_record()
    assert record.expires_at == pytest.approx(clock() + 3 * HOUR)


@responses.activate
def test_expires_in_is_only_a_fallback(us, clock):
    answer = {"access_token": fake_token(), "token_type": "Bearer", "expires_in": 7200}
    responses.post(TOKEN_URL, json=answer)
    assert us.get_valid_record().expires_at == pytest.approx(clock() + 7200)


@responses.activate
def test_new_token_is_saved_to_the_keys_record_and_mirrored_in_the_market_file(us, clock):
    responses.post(TOKEN_URL, json=token_answer(fake_token(7), clock() + DAY))
    us.get_valid_token()
    assert us.mirror.record_path.name == "us_api_token.json"
    assert TokenRecord.from_json(us.mirror.record_path.read_text()).access_token == fake_token(7)
    assert TokenRecord.from_json(us.store.record.path.read_text()).access_token == fake_token(7)
    assert us.load_token().access_token == fake_token(7)


@responses.activate
def test_renewal_starts_in_the_advisory_window_and_never_serves_a_dying_token(us, clock):
    issue(us, clock)
    record = us.load_token()
    move_to(clock, record, policy.ADVISORY_WINDOW + 5)
    assert us.get_valid_token() == fake_token(1)  # fresh: no request
    responses.post(TOKEN_URL, json=token_answer(fake_token(2), record.expires_at + DAY))
    move_to(clock, record, policy.ADVISORY_WINDOW - 5)
    assert us.get_valid_token() == fake_token(2)
    assert len(responses.calls) == 1


def test_fresh_token_is_served_from_memory_without_reading_the_file(us, clock, monkeypatch):
    issue(us, clock)
    reads = []
    monkeypatch.setattr(us.store.record, "load", lambda: reads.append(1))
    stats = []
    real_signature = us.store.record.signature
    monkeypatch.setattr(us.store.record, "signature", lambda: stats.append(1) or real_signature())
    for _ in range(10_000):
        assert us.get_valid_token() == fake_token(1)
    assert reads == [] and stats == []
    clock.advance(policy.SYNC_INTERVAL + 0.01)
    us.get_valid_token()
    assert reads == [] and len(stats) == 1  # a cheap stat, once per interval


def test_renewal_by_another_process_is_picked_up_within_the_sync_interval(make_manager, clock):
    reader, other = make_manager(), make_manager()
    issue(reader, clock)
    clock.advance(2 * HOUR)
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
        other.refresh_token()
    assert reader.get_valid_token() in (fake_token(1), fake_token(2))
    clock.advance(policy.SYNC_INTERVAL + 0.01)
    assert reader.get_valid_token() == fake_token(2)


def test_renewal_does_not_disrupt_callers_while_another_process_renews(make_manager, clock):
    manager, other = make_manager(), make_manager()
    issue(manager, clock)
    record = manager.load_token()
    move_to(clock, record, policy.ADVISORY_WINDOW - 60)
    held, release = threading.Event(), threading.Event()

    def renewer():
        with other.store.lock.hold(5):
            held.set()
            release.wait(5)

    waits = []
    real_hold = manager.store.lock.hold
    manager.store.lock.hold = lambda timeout: waits.append(timeout) or real_hold(timeout)
    thread = threading.Thread(target=renewer)
    thread.start()
    held.wait(5)
    try:
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            assert manager.get_valid_token() == fake_token(1)
            assert waits == [0.0]  # one try at the lock, no wait, in the advisory window
            assert len(mock.calls) == 0
    finally:
        release.set()
        thread.join(5)


def test_late_arrival_takes_the_winners_token_without_asking(make_manager, clock):
    manager, winner = make_manager(), make_manager()
    issue(manager, clock)
    record = manager.load_token()
    move_to(clock, record, policy.MANDATORY_WINDOW - 60)
    held = threading.Event()
    fingerprint = manager.key_fingerprint()
    new = TokenRecord(fake_token(2), "Bearer", clock(), clock() + DAY, "us", "real", fingerprint)

    def renew_under_lock():
        with winner.store.lock.hold(5):
            held.set()
            time.sleep(0.2)  # hold the lock while the other caller waits for it
            winner.save_token(new)

    thread = threading.Thread(target=renew_under_lock)
    thread.start()
    held.wait(5)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        assert manager.get_valid_token() == fake_token(2)
        assert len(mock.calls) == 0
    thread.join(5)


# -- AC3: refused renewals -----------------------------------------------------------------------


@responses.activate
def test_rate_limited_renewal_keeps_valid_token(us, clock, caplog):
    issue(us, clock)
    record = us.load_token()
    before = us.store.record.path.read_bytes()
    move_to(clock, record, policy.ADVISORY_WINDOW - 60)
    responses.post(TOKEN_URL, status=403, json=refusal("EGW00133"))
    with caplog.at_level(logging.WARNING):
        for _ in range(1000):
            assert us.get_valid_token() == fake_token(1)
    assert len(responses.calls) == 1
    assert "EGW00133" in caplog.text and "keeping the current us token" in caplog.text
    assert us.store.record.path.read_bytes() == before
    state = us.load_renewal_state()
    assert (state.last_outcome, state.last_code, state.refusals) == ("refused", "EGW00133", {"EGW00133": 1})


@responses.activate
def test_refused_renewal_of_an_expired_token_is_a_clear_error(us, clock):
    issue(us, clock)
    clock.advance(DAY)
    responses.post(TOKEN_URL, status=403, json=refusal("EGW00133"))
    with pytest.raises(TokenUnavailableError, match="EGW00133"):
        us.get_valid_token()


@responses.activate
def test_refusals_never_loop_at_most_one_request_a_minute(us, clock):
    issue(us, clock)
    record = us.load_token()
    move_to(clock, record, policy.ADVISORY_WINDOW - 1)
    responses.post(TOKEN_URL, status=403, json=refusal("EGW00133"))
    for _ in range(50 * 60):  # fifty minutes, a call every second
        us.get_valid_token()
        clock.advance(1)
    assert 1 <= len(responses.calls) <= 50 * 60 / policy.MIN_REQUEST_INTERVAL + 1


@responses.activate
def test_refusal_is_remembered_by_other_processes(make_manager, clock):
    first, second = make_manager(), make_manager()
    responses.post(TOKEN_URL, status=403, json=refusal("EGW00133"))
    with pytest.raises(TokenUnavailableError, match="EGW00133"):
        first.get_valid_token()
    clock.advance(30)
    with pytest.raises(TokenUnavailableError, match="one a minute"):
        second.get_valid_token()
    assert len(responses.calls) == 1
    clock.advance(policy.MIN_REQUEST_INTERVAL)
    responses.replace(responses.POST, TOKEN_URL, json=token_answer(fake_token(3), clock() + DAY))
    assert second.get_valid_token() == fake_token(3)


@responses.activate
def test_forced_refresh_within_a_minute_is_held_back_without_a_request(us, clock):
    issue(us, clock)
    clock.advance(10)
    with pytest.raises(RateLimitedError, match="one a minute"):
        us.refresh_token()
    assert len(responses.calls) == 0
    assert us.get_valid_token() == fake_token(1)


@responses.activate
def test_same_token_answer_within_six_hours_is_a_success(us, clock):
    issue(us, clock)
    clock.advance(2 * HOUR)
    expires = us.load_token().expires_at
    responses.post(TOKEN_URL, json=token_answer(fake_token(1), expires, expires_in=70000))
    record = us.refresh_token()
    assert record.access_token == fake_token(1) and record.expires_at == expires
    assert us.load_renewal_state().last_outcome == "same_token"
    for _ in range(100):
        us.get_valid_token()
    assert len(responses.calls) == 1


@responses.activate
def test_broker_answer_with_an_expired_token_leaves_the_good_token(us, clock):
    issue(us, clock)
    before = us.store.record.path.read_bytes()
    clock.advance(2 * HOUR)
    responses.post(TOKEN_URL, json=token_answer(fake_token(9), clock() - 10))
    with pytest.raises(Exception, match="already expired"):
        us.refresh_token()
    assert us.store.record.path.read_bytes() == before
    assert us.get_valid_token() == fake_token(1)


@responses.activate
@pytest.mark.parametrize(
    "body",
    [
        "<html><body>502 Bad Gateway</body></html>",
        '{"access_token": "abc',
        json.dumps({"token_type": "Bearer"}),
        json.dumps({"access_token": 12345, "access_token_token_expired": "2030-01-01 00:00:00"}),
        json.dumps({"access_token": "tok", "access_token_token_expired": "tomorrow"}),
        json.dumps(["not", "an", "object"]),
    ],
    ids=["html", "truncated", "missing-token", "token-not-string", "bad-expiry", "array"],
)
def test_garbage_broker_answers_leave_the_good_token_on_disk(us, clock, sleeps, body):
    issue(us, clock)
    record = us.load_token()
    before = us.store.record.path.read_bytes()
    move_to(clock, record, policy.MANDATORY_WINDOW - 60)
    responses.post(TOKEN_URL, body=body, content_type="application/json")
    assert us.get_valid_token() == fake_token(1)
    assert us.store.record.path.read_bytes() == before
    assert us.load_renewal_state().last_outcome == "failed"
