"""The renewal policy as one pure function: given a record, the time and the back-off, what to do.

Windows are measured back from the broker's expiry (a token lives 24 h):

* more than ``advisory`` left (60 min plus a per-key jitter of up to 10 min): **serve**.
* inside the advisory window: **renew without waiting** (one caller tries the lock once; if it is
  busy or the broker says no, the current token keeps being served).
* inside ``mandatory`` (20 min): **renew and wait** (at most ``mandatory_lock_wait`` for the lock);
  a failure still serves the current token.
* under ``expiry_margin`` (5 min) left, or past expiry: the token is never handed out (it could die
  in flight or under clock skew): **renew and wait** up to ``lock_wait``, and a failure is an error.
* while a failed attempt backs off: **serve** a usable token, else **fail**; nothing is asked.

All windows are far shorter than the 18 h after which the broker mints a new token (it re-sends the
*same* token within 6 h of an issuance), so renewals never become a storm of same-token answers.
``check``, ``warmup``, the metrics and the live path all ask :func:`decide`.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Protocol

EXPIRY_MARGIN = 5 * 60.0
MANDATORY_WINDOW = 20 * 60.0
ADVISORY_WINDOW = 60 * 60.0
ADVISORY_JITTER = 10 * 60.0
LOCK_WAIT = 30.0
MANDATORY_LOCK_WAIT = 5.0
MIN_REQUEST_INTERVAL = 61.0
SYNC_INTERVAL = 1.0
#: A token lives 24 h and the broker re-sends the same one within 6 h of an issuance, so no
#: horizon beyond 18 h (less the expiry margin) can ever be met by a renewal.
MAX_HORIZON = 18 * 3600.0 - EXPIRY_MARGIN
#: The longest in-memory pause after a refusal that names its own wait (the daily budget's).
MAX_PAUSE = 300.0


class Expiring(Protocol):
    """Anything with an expiry: a token record, an approval key."""

    @property
    def expires_at(self) -> float:
        """When it expires, epoch seconds."""

    def seconds_left(self, now: float) -> float:
        """Seconds until expiry (negative once expired)."""


class Windows(NamedTuple):
    """Renewal windows and waits, in seconds (the defaults are the documented ones).

    Attributes:
        expiry_margin: a credential with no more than this left is never handed out.
        mandatory: inside it, a caller waits for the renewal lock.
        advisory: inside it, one caller renews without waiting (jitter included).
        lock_wait: the longest wait for the lock when no usable credential is held.
        mandatory_lock_wait: the longest wait for the lock inside the mandatory window.
        min_request_interval: no two requests for one key within this (the broker allows one a
            minute); also the back-off after a failed attempt.
        sync_interval: how long a fresh credential is served from memory before the store's
            signature is looked at again (another process's renewal shows up within it).
    """

    expiry_margin: float = EXPIRY_MARGIN
    mandatory: float = MANDATORY_WINDOW
    advisory: float = ADVISORY_WINDOW
    lock_wait: float = LOCK_WAIT
    mandatory_lock_wait: float = MANDATORY_LOCK_WAIT
    min_request_interval: float = MIN_REQUEST_INTERVAL
    sync_interval: float = SYNC_INTERVAL


class Backoff(NamedTuple):
    """No new attempt from ``since`` until ``until`` (a clock stepped back before ``since`` ends it)."""

    since: float
    until: float
    error: Exception | None = None

    def active(self, now: float) -> bool:
        """True while ``now`` lies inside the back-off."""
        return self.since <= now < self.until


NO_BACKOFF = Backoff(float("-inf"), float("-inf"))


def usable(record: Expiring | None, now: float, windows: Windows) -> bool:
    """True if ``record`` may be handed out at ``now``: it has more than the expiry margin left."""
    return record is not None and record.seconds_left(now) > windows.expiry_margin


def backoff_after(
    error: Exception, now: float, windows: Windows, *, retry_in: float | None = None, lock_busy: bool = False
) -> Backoff:
    """The pause after a failed attempt (this process only, in memory): the wait the refusal named
    (held back by the one-a-minute memory, at most :data:`MAX_PAUSE` for the daily budget), a few
    seconds when another process held the lock, else one request interval."""
    if retry_in is not None:
        pause = min(retry_in, MAX_PAUSE)
    elif lock_busy:
        pause = windows.mandatory_lock_wait
    else:
        pause = windows.min_request_interval
    return Backoff(now, now + pause, error)


class Action(enum.Enum):
    """What :func:`decide` tells the caller to do."""

    SERVE = "serve"
    RENEW_NO_WAIT = "renew without waiting"
    RENEW_AND_WAIT = "renew and wait"
    FAIL = "fail"


class Decision(NamedTuple):
    """The verdict: the action, how long to wait for the lock, and whether the held one is usable."""

    action: Action
    lock_wait: float
    usable: bool


def decide(
    record: Expiring | None,
    now: float,
    backoff: Backoff,
    windows: Windows,
    horizon: float = 0.0,
) -> Decision:
    """Say what to do with ``record`` at ``now``.

    Args:
        record: the credential held (None: none).
        now: epoch seconds.
        backoff: the current back-off after a failed attempt (:data:`NO_BACKOFF` if none).
        windows: the renewal windows.
        horizon: a warm-up's horizon: renew (waiting for the lock) unless the credential stays
            usable for this many seconds more.

    Returns:
        The :class:`Decision`. ``usable`` says whether ``record`` may be served if a renewal fails.
    """
    left = float("-inf") if record is None else record.seconds_left(now)
    servable = usable(record, now, windows)
    if left > max(windows.advisory, horizon + windows.expiry_margin):
        return Decision(Action.SERVE, 0.0, servable)
    if backoff.active(now):
        return Decision(Action.SERVE if servable else Action.FAIL, 0.0, servable)
    if not servable or horizon:
        return Decision(Action.RENEW_AND_WAIT, windows.lock_wait, servable)
    if left > windows.mandatory:
        return Decision(Action.RENEW_NO_WAIT, 0.0, servable)
    return Decision(Action.RENEW_AND_WAIT, windows.mandatory_lock_wait, servable)


def check_horizon(valid_for: float) -> None:
    """Refuse a warm-up horizon that no renewal could meet.

    Raises:
        ValueError: ``valid_for`` is over :data:`MAX_HORIZON`.
    """
    if valid_for > MAX_HORIZON:
        hours, minutes = divmod(int(MAX_HORIZON) // 60, 60)
        raise ValueError(
            f"a horizon over {hours}h {minutes:02d}m can never be met: tokens live 24 h and the broker "
            "re-sends the same token within 6 h of issuing it, so a renewal gives at most 18 h, less "
            "the 5-min expiry margin"
        )


def status(record: Expiring | None, now: float, windows: Windows) -> str:
    """``missing``, ``expired`` (no usable credential), ``renewal_due`` or ``ok``, per :func:`decide`."""
    if record is None:
        return "missing"
    decision = decide(record, now, NO_BACKOFF, windows)
    if not decision.usable:
        return "expired"
    return "ok" if decision.action is Action.SERVE else "renewal_due"


def serve_until(record: Expiring, now: float, backoff: Backoff, windows: Windows) -> float:
    """Until when ``record`` may be served from memory without asking :func:`decide` again.

    A fresh record: until the next sync or its advisory boundary. One inside a window: only while
    a back-off lasts, and never past its next window boundary. Otherwise: not at all.
    """
    boundaries = [
        record.expires_at - window
        for window in (windows.advisory, windows.mandatory, windows.expiry_margin)
        if record.expires_at - window > now
    ]
    in_window = len(boundaries) < 3
    if not boundaries or (in_window and not backoff.active(now)):
        return float("-inf")
    limit = now + windows.sync_interval
    if in_window:
        limit = min(limit, backoff.until)
    return min(limit, boundaries[0])
