"""The renewal decision as a table: (time left, back-off, horizon) -> action (SPEC §6, STYLE.md)."""

from __future__ import annotations

import pytest

from common.credentials.records import TokenRecord
from common.renewal.policy import NO_BACKOFF, Action, Backoff, Windows, decide, serve_until, status

NOW = 1_800_000_000.0
W = Windows(expiry_margin=300, mandatory=1200, advisory=3600, lock_wait=30, mandatory_lock_wait=5)
BACKING_OFF = Backoff(NOW - 10, NOW + 50, RuntimeError("EGW00133"))
MIN, HOUR = 60.0, 3600.0


def record(left: float) -> TokenRecord:
    return TokenRecord("t" * 20, "Bearer", NOW + left - 86400, NOW + left, "us", "real", "sha256:0")


@pytest.mark.parametrize(
    ("left", "backoff", "horizon", "action", "wait", "usable", "check"),
    [
        (None, NO_BACKOFF, 0, Action.RENEW_AND_WAIT, 30, False, "missing"),
        (20 * HOUR, NO_BACKOFF, 0, Action.SERVE, 0, True, "ok"),
        (61 * MIN, NO_BACKOFF, 0, Action.SERVE, 0, True, "ok"),
        (59 * MIN, NO_BACKOFF, 0, Action.RENEW_NO_WAIT, 0, True, "renewal_due"),
        (21 * MIN, NO_BACKOFF, 0, Action.RENEW_NO_WAIT, 0, True, "renewal_due"),
        (19 * MIN, NO_BACKOFF, 0, Action.RENEW_AND_WAIT, 5, True, "renewal_due"),
        (6 * MIN, NO_BACKOFF, 0, Action.RENEW_AND_WAIT, 5, True, "renewal_due"),
        (4 * MIN, NO_BACKOFF, 0, Action.RENEW_AND_WAIT, 30, False, "expired"),
        (-1 * HOUR, NO_BACKOFF, 0, Action.RENEW_AND_WAIT, 30, False, "expired"),
        # a back-off after a failed attempt: serve what is usable, ask nothing
        (59 * MIN, BACKING_OFF, 0, Action.SERVE, 0, True, "renewal_due"),
        (10 * MIN, BACKING_OFF, 0, Action.SERVE, 0, True, "renewal_due"),
        (4 * MIN, BACKING_OFF, 0, Action.FAIL, 0, False, "expired"),
        (None, BACKING_OFF, 0, Action.FAIL, 0, False, "missing"),
        (20 * HOUR, BACKING_OFF, 0, Action.SERVE, 0, True, "ok"),
        # a warm-up's horizon: renew, waiting for the lock, unless the token outlives it
        (9 * HOUR + 50 * MIN, NO_BACKOFF, 9 * HOUR, Action.SERVE, 0, True, "ok"),
        (9 * HOUR + 4 * MIN, NO_BACKOFF, 9 * HOUR, Action.RENEW_AND_WAIT, 30, True, "ok"),
        (None, NO_BACKOFF, 8 * HOUR, Action.RENEW_AND_WAIT, 30, False, "missing"),
    ],
)
def test_decide(left, backoff, horizon, action, wait, usable, check):
    held = None if left is None else record(left)
    assert decide(held, NOW, backoff, W, horizon) == (action, wait, usable)
    assert status(held, NOW, W) == check


def test_a_clock_stepped_back_ends_a_back_off():
    assert BACKING_OFF.active(NOW)
    assert not BACKING_OFF.active(NOW - 60)  # before it began: the clock went back
    assert decide(record(59 * MIN), NOW - 60, BACKING_OFF, W).action is Action.RENEW_NO_WAIT


def test_serve_until_never_crosses_a_window_boundary():
    fresh = record(3600 + 0.4)
    assert serve_until(fresh, NOW, NO_BACKOFF, W) == pytest.approx(NOW + 0.4)  # the advisory boundary
    assert serve_until(record(20 * HOUR), NOW, NO_BACKOFF, W) == NOW + W.sync_interval
    assert serve_until(record(30 * MIN), NOW, NO_BACKOFF, W) == float("-inf")  # due: ask decide each call
    assert serve_until(record(30 * MIN), NOW, BACKING_OFF, W) == NOW + W.sync_interval
    assert serve_until(record(-1), NOW, BACKING_OFF, W) == float("-inf")
