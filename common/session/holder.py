"""Who holds a key's WebSocket session, the lease's times, and the pacing rule (pure, no I/O).

:class:`Holder` is what the lease records (host, pid, market, since) and what
:class:`common.errors.SessionHeldError` names; :class:`SessionTimes` are the bounds (a test or the
bench passes others); :func:`pace_delay` is the minimum interval between two leases' starts.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass
from typing import Any, NamedTuple

from common.clock import format_duration, to_kst_iso
from common.errors import SessionHeldError


class SessionTimes(NamedTuple):
    """The session lease's bounds, in seconds.

    Attributes:
        ttl: the server's lease (``KIS_TOKEN_STORE``) lives this long without a heartbeat: a host
            that is lost (power, network, SIGKILL) frees the key within this long.
        heartbeat: a holder extends its server lease this often: a quarter of ``ttl``, and each beat
            asks the server even while its link rests after a failure (5 s), so that two beats may
            fail (each after up to a 0.5 s timeout) and the third still renews the lease in time.
        pace: the minimum interval between two leases' starts on a key, so that a crash loop cannot
            connect and close often enough to get the key or the IP blocked.
        poll: a caller that waits for the lease looks again this often (no busy spinning).
    """

    ttl: float = 15.0
    heartbeat: float = 3.75
    pace: float = 5.0
    poll: float = 0.1


DEFAULT_TIMES = SessionTimes()


def pace_delay(last_start: float | None, now: float, pace: float) -> float:
    """Seconds to wait before a lease may start, the key's last one having started at ``last_start``.

    A start "in the future" (the clock stepped back, or an unreadable record: ``nan``) never makes a
    caller wait longer than ``pace``.
    """
    if last_start is None or pace <= 0:
        return 0.0
    if math.isnan(last_start):
        return pace
    return min(pace, max(0.0, last_start + pace - now))


@dataclass(frozen=True)
class Holder:
    """One holder of a key's session lease.

    Attributes:
        host: the holder's machine name.
        pid: its process id.
        market: ``us`` or ``kr``, the manager that took it.
        since: when its session started (epoch seconds; on the server's clock for a server lease).
    """

    host: str
    pid: int
    market: str
    since: float

    @classmethod
    def this_process(cls, market: str, since: float) -> Holder:
        """This process as a holder."""
        return cls(socket.gethostname()[:64], os.getpid(), market, since)

    def describe(self, now: float | None = None) -> str:
        """``host H, pid P (us), since 2026-11-24T09:00:00+09:00 (12s ago)``."""
        text = f"host {self.host}, pid {self.pid} ({self.market}), since {to_kst_iso(self.since)}"
        if now is not None and now >= self.since:
            text += f" ({format_duration(now - self.since)} ago)"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The holder as JSON-ready fields."""
        return {"host": self.host, "pid": self.pid, "market": self.market, "since": self.since}

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Holder | None:
        """A holder from stored fields (strings from the server are fine); None if they are not one."""
        try:
            host, market = str(fields["host"]), str(fields["market"])
            pid, since = int(fields["pid"]), float(fields["since"])
        except (KeyError, TypeError, ValueError):
            return None
        return cls(host, pid, market, since) if math.isfinite(since) else None


class LeaseHeld(Exception):
    """A lease (the host's file or the server's) is held by another; ``holder`` says who, when known."""

    def __init__(self, holder: Holder | None) -> None:
        super().__init__("held")
        self.holder = holder


def held_error(market: str, holder: Holder | None, now: float, waited: float = 0.0) -> SessionHeldError:
    """The error a second holder gets: ``the us key's WebSocket session is held by host H, pid P,
    since T``."""
    who = holder.describe(now) if holder is not None else "another process of this host (starting)"
    text = f"the {market} key's WebSocket session is held by {who}"
    if waited > 0:
        text += f"; waited {waited:g} s"
    return SessionHeldError(text + " (the broker allows one session per app key)", holder)


def encode_record(holder: Holder | None, start: float) -> str:
    """The lease file's JSON: the holder (None once released) and the last lease's start."""
    return json.dumps({"v": 1, "holder": None if holder is None else holder.to_dict(), "start": start})


def decode_record(text: str) -> tuple[Holder | None, float] | None:
    """``(holder, last start)`` from a lease file's text; None if it is not a lease record."""
    try:
        data = json.loads(text)
        start = float(data["start"])
    except (ValueError, TypeError, KeyError):
        return None
    holder = data.get("holder")
    return (Holder.from_fields(holder) if isinstance(holder, dict) else None), start
