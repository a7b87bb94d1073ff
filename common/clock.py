"""Time in the broker's zone: formatting and parsing epoch seconds.

The time itself comes from the clock a manager is given (``time.time`` by default; tests inject a
fake one, so that time moves in one place and no test has to sleep).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

#: The broker states expiries in Korea time without a zone designator (KIS_FACTS.md).
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
