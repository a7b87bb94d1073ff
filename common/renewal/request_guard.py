"""The key's request budget, kept before anything is sent: one request a minute, the daily budget of
issuances, and a look at the broker's clock when the key's last request seems to lie in the future.

The one-a-minute memory errs on the safe side: a last request stamped in the future is either this
host's clock running behind (the broker's clock is read, once a minute at most, and judged again) or
a lie; a lie that the broker's clock confirms counts as a request made just now (re-stamped, so the
hold lasts one interval). Without the broker's clock it holds back. The stamp never moves back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from common.clock import format_duration
from common.errors import (
    CREDENTIAL_CODES,
    CorruptRecordError,
    CredentialsError,
    DailyLimitError,
    RequestHeldBackError,
)
from common.renewal.outcomes import Outcome
from common.renewal.policy import Windows
from common.settings import DAILY_LIMIT_VAR
from common.store.protocols import RenewalState, StateStore

#: A last request stamped further than this in the future is looked at twice (the clock is checked).
FUTURE_TOLERANCE = 5.0
#: The broker's clock is read at most this often when the renewal state looks to be in the future.
CALIBRATE_INTERVAL = 60.0
#: The daily budget's window.
DAY = 86400.0
_log = logging.getLogger(__name__)

#: Records an outcome (observers, then the state is saved).
Observe = Callable[[RenewalState, Outcome], None]


class RequestGuard:
    """Says whether a request for the key may be sent now, and why not.

    Args:
        name: what the credential is called in messages (``us token``).
        windows: the renewal windows (``min_request_interval``).
        clock: the broker's time (a :class:`~common.clock.BrokerClock`, or any epoch clock).
        daily_limit: at most this many issuances per key in 24 h (0: no limit).
        calibrate: reads the broker's clock into ``clock`` (True if it could), or None.
    """

    def __init__(self, name: str, windows: Windows, clock: Callable[[], float], daily_limit: int = 0,
                 calibrate: Callable[[], bool] | None = None) -> None:
        self.name = name
        self.windows = windows
        self.daily_limit = daily_limit
        self._clock = clock
        self._calibrate = calibrate
        self._calibrated_at = float("-inf")  # monotonic time of the last try

    def offset(self) -> float:
        """The clock's offset from this host's (0 for a plain clock)."""
        return float(getattr(self._clock, "offset", 0.0))

    def restamp(self, state: RenewalState, stamped: float, offset: float) -> None:
        """Put the last request in the broker's time if the request just taught the clock an offset
        (a host whose clock ran a day ahead must not leave a stamp that holds every host back a day)."""
        shift = self.offset() - offset
        if shift:
            state.last_request_at = stamped + shift

    def clock_known(self) -> bool:
        """True once the clock has been set from the broker's (its offset is known)."""
        return getattr(self._clock, "calibrated_at", None) is not None

    def read_broker_clock(self) -> bool:
        """Read the broker's clock (at most once per :data:`CALIBRATE_INTERVAL`); True if read now."""
        if self._calibrate is None or time.monotonic() - self._calibrated_at < CALIBRATE_INTERVAL:
            return False
        self._calibrated_at = time.monotonic()
        try:
            return bool(self._calibrate())
        except Exception as exc:
            _log.debug("cannot read the broker's clock: %s", type(exc).__name__)
            return False

    def check(self, state: RenewalState, now: float, left: float | None, observe: Observe) -> float:
        """Refuse a request too soon after the key's last one, or past the daily budget; return the
        time now (in the broker's clock, read again if the last request seemed to lie in the future).

        Raises:
            RequestHeldBackError: a request for this key was sent less than a minute ago.
            DailyLimitError: the key's daily budget of issuances is spent.
        """
        now = self._one_a_minute(state, now, left, observe)
        self._daily_limit(state, now, left, observe)
        return now

    def _one_a_minute(self, state: RenewalState, now: float, left: float | None, observe: Observe) -> float:
        last = state.last_request_at
        interval = self.windows.min_request_interval
        ago = None
        if last is not None and last > now + FUTURE_TOLERANCE:
            if self.read_broker_clock():
                now = self._clock()
            if last > now + FUTURE_TOLERANCE and self.clock_known():
                state.last_request_at = last = now
                ago = "just now (its stamp lay in the broker's future)"
            elif last > now + FUTURE_TOLERANCE:
                ago = (f"{last - now:.0f} s in this host's future (a clock that disagrees with another "
                       "host's, and the broker's clock could not be read)")
                last = now
        if last is None or now - last >= interval:
            return now
        retry_in = last + interval - now
        if state.unreadable:
            ago = "possibly just now (the key's renewal state was unreadable)"
        ago = ago or f"{max(0.0, now - last):.0f} s ago"
        message = (
            f"a {self.name} was requested {ago} for this app key; the broker allows one a minute "
            f"(next request possible in {retry_in:.0f} s)"
        )
        failed = state.last_outcome in ("refused", "failed") and (state.last_outcome_at or 0.0) >= last - 1
        if failed:
            reason = " ".join(part for part in (state.last_code, state.last_message) if part)
            message += f"; that request failed: {reason[:200] or state.last_outcome}"
        observe(state, Outcome("held_back", now, "LOCAL", message, left))
        if failed and state.last_code in CREDENTIAL_CODES:  # the same fix is needed: the same exit code
            raise RequestHeldBackError(message, retry_in) from CredentialsError(
                state.last_code, state.last_message or "")
        raise RequestHeldBackError(message, retry_in)

    def _daily_limit(self, state: RenewalState, now: float, left: float | None, observe: Observe) -> None:
        state.issuances = state.recent_issuances(now, DAY)
        if not self.daily_limit or len(state.issuances) < self.daily_limit:
            return
        retry_in = max(1.0, min(state.issuances) + DAY - now)
        message = (
            f"{len(state.issuances)} {self.name}s were issued to this app key in the last 24 h, its "
            f"daily limit ({DAILY_LIMIT_VAR}={self.daily_limit}); no request for {format_duration(retry_in)} "
            f"(raise {DAILY_LIMIT_VAR}, or set it to 0 for no limit)"
        )
        observe(state, Outcome("refused", now, DailyLimitError.CODE, message, left))
        raise DailyLimitError(message, retry_in)


def read_state(store: StateStore, now: float, name: str) -> RenewalState:
    """The key's shared renewal memory. An unusable one counts as "a request may just have been
    made" at ``now`` (warning logged): the one-a-minute memory errs on the safe side."""
    try:
        state = store.load()
    except CorruptRecordError as exc:
        _log.warning("the %s renewal state is unusable (%s); counting it as a request made just now",
                     name, exc)
        state = RenewalState(last_request_at=now)
        state.unreadable = True
        return state
    if state.unreadable:  # one copy of it (a shared store's) could not be read
        _log.warning("one copy of the %s renewal state is unusable; counting it as a request made just now",
                     name)
        state.last_request_at = max(state.last_request_at or 0.0, now)
    return state
