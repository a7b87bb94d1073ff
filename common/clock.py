"""Time in the broker's zone and in the broker's clock.

Formatting and parsing epoch seconds in Korea time, and :class:`BrokerClock`: the local clock a
manager is given (``time.time`` by default; tests inject a fake one, so that time moves in one place
and no test has to sleep) corrected by the offset the broker's ``Date`` headers show.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone

#: Times outside 2000-01-01 .. 2100-01-01 UTC are garbage, not times (stored records, states, headers).
EARLIEST, LATEST = 946684800.0, 4102444800.0
#: The broker states expiries in Korea time (UTC+9, no daylight saving) without a zone designator
#: (``access_token_token_expired``: ``2026-11-25 08:00:00``).
KST = timezone(timedelta(hours=9), "KST")


def to_kst_iso(epoch: float) -> str:
    """Format an epoch time as ISO 8601 in Korea time, with its offset."""
    return datetime.fromtimestamp(epoch, KST).isoformat(timespec="seconds")


def parse_iso(text: str) -> float:
    """Parse an ISO 8601 time that carries a zone offset into epoch seconds.

    Raises:
        ValueError: ``text`` is not ISO 8601 or has no offset.
    """
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"time without a zone offset: {text!r}")
    return moment.timestamp()


def parse_kst(text: str) -> float:
    """Parse the broker's ``YYYY-MM-DD HH:MM:SS`` (Korea time, no zone) into epoch seconds.

    The result does not depend on the host's time zone.

    Raises:
        ValueError: ``text`` is not in that form.
    """
    moment = datetime.strptime(text, "%Y-%m-%d %H:%M:%S")
    return moment.replace(tzinfo=KST).timestamp()


def format_duration(seconds: float) -> str:
    """Render a duration for people: ``23h 59m``, ``4m 10s``, ``expired 3m ago``."""
    if seconds < 0:
        return f"expired {format_duration(-seconds)} ago"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


# -- the broker's time ---------------------------------------------------------------------------------

#: A host within this many seconds of the broker is taken as right (an HTTP date has 1 s resolution).
SKEW_TOLERANCE = 2.0
#: A host further than this from the broker is said to be wrong (log, ``check``, ``status``).
SKEW_REPORT = 120.0


def parse_http_date(value: object) -> float | None:
    """An HTTP ``Date`` header (``Sun, 06 Dec 2026 01:16:36 GMT``) as epoch seconds, or None."""
    if not isinstance(value, str) or not 20 <= len(value) <= 64:
        return None
    from email.utils import parsedate_to_datetime

    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        return None
    stamp = moment.timestamp()
    return stamp if EARLIEST <= stamp <= LATEST else None


class BrokerClock:
    """The broker's time as this process knows it: a local clock plus the offset that the ``Date``
    headers of the broker's answers show (botocore corrects clock skew from the same header).

    Expiry, the renewal windows and the one-a-minute memory are all judged in this time, so a host
    whose clock is hours off neither takes a fresh token for expired nor serves one the broker has
    expired. An offset within :data:`SKEW_TOLERANCE` counts as none.

    Args:
        local: the local clock, epoch seconds (``time.time``; tests inject a fake one).
        offset: the offset to start from (the host's last known one).
        on_change: called with the new offset whenever it changes (to keep it for the host).
    """

    def __init__(
        self,
        local: Callable[[], float],
        offset: float = 0.0,
        on_change: Callable[[float], None] | None = None,
    ) -> None:
        self.local = local
        self.offset = offset
        self.on_change = on_change
        #: local time of the last ``Date`` header read (None: none yet in this process)
        self.calibrated_at: float | None = None

    def __call__(self) -> float:
        """The broker's time now, epoch seconds."""
        return self.local() + self.offset

    def observe(self, date_header: object) -> bool:
        """Learn the offset from a ``Date`` header just received; return True if it was readable."""
        broker = parse_http_date(date_header)
        if broker is None:
            return False
        received = self.local()
        skew = broker + 0.5 - received  # the header is truncated to the second
        offset = 0.0 if abs(skew) <= SKEW_TOLERANCE else round(skew, 1)
        self.calibrated_at = received
        if abs(offset - self.offset) > SKEW_TOLERANCE or (offset == 0.0) != (self.offset == 0.0):
            self.offset = offset
            if self.on_change is not None:
                self.on_change(offset)
        return True


def describe_offset(offset: float) -> str | None:
    """``this host's clock is 1h 00m behind the broker's`` when off by more than :data:`SKEW_REPORT`."""
    if abs(offset) <= SKEW_REPORT:
        return None
    side = "behind" if offset > 0 else "ahead of"
    return f"this host's clock is {format_duration(abs(offset))} {side} the broker's (fix it with NTP)"
