"""The arithmetic of the call budget, pure: the GCRA spacing and the per-second counters.

GCRA (the generic cell rate algorithm, "virtual scheduling") keeps one number per key, the
*theoretical arrival time* ``tat``: the time at which the key's budget is free again. A caller asking
at ``now`` gets the slot ``max(now, tat - tolerance)`` and moves ``tat`` to ``max(tat, slot) +
interval``. Slots are reserved (the caller sleeps until its slot outside any lock), so callers that
wait queue in order and never spin.

**Why not a bucket of R.** A token bucket (or GCRA) with a burst of R lets R calls go at once after
a quiet second and then one every 1/R: about 2R in the following second. The broker counts calls
per second, so the budget's guarantee is about any window:

    GCRA with interval T and tolerance tau lets at most n calls into a window of length W with
    (n - 1) * T - tau < W; so with T = (W + slack + tau) / R no window of W + slack seconds holds
    more than R calls (for a whole R; for a fractional one, ceil(R)).

``slack`` widens the window the guarantee holds for: a call that reaches the broker up to ``slack``
later than one after it (network jitter, a process woken late) still cannot put R + 1 calls into
one of the broker's seconds, whether it counts by calendar second or by sliding window. A ``burst``
of b calls at once costs b - 1 calls of every window (T = (W + slack) / (R - b + 1)), which is why
the default is 1 (no burst): the rate achieved is R / (1 + slack), 0.97 R with the default 30 ms.

The counters are per-second buckets for the last :data:`BUCKETS` seconds (``calls``: slots granted;
``refusals``: ``EGW00201`` answers noted by callers), a fixed-size structure kept with ``tat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The broker's window: calls are counted per second.
WINDOW = 1.0
#: Seconds of lateness absorbed: a call held up this much cannot crowd one of the broker's seconds.
DEFAULT_SLACK = 0.03
#: The longest wait a caller may ask for; a ``tat`` further ahead than this (and a slot) is garbage.
MAX_WAIT = 600.0
#: Seconds the counters cover (one bucket a second).
BUCKETS = 60


@dataclass(frozen=True)
class Pacing:
    """How one key's calls are spaced.

    Args:
        rate: the broker's limit, calls a second (``KIS_RATE_LIMIT``; real 18, paper 1).
        slack: seconds of lateness absorbed (see the module docstring).
        burst: calls that may go at once after a quiet spell (1: none; at most the whole rate).

    Raises:
        ValueError: a rate that is not a finite number above 0, a negative slack, or a burst outside
            1 .. max(1, floor(rate)).
    """

    rate: float
    slack: float = DEFAULT_SLACK
    burst: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.rate < math.inf:
            raise ValueError(f"rate must be a finite number above 0, not {self.rate!r}")
        if not 0 <= self.slack < math.inf:
            raise ValueError(f"slack must be 0 or more, not {self.slack!r}")
        if not 1 <= self.burst <= max(1, math.floor(self.rate)):
            raise ValueError(f"burst must be 1 .. {max(1, math.floor(self.rate))}, not {self.burst!r}")

    @property
    def interval(self) -> float:
        """Seconds between two slots when the budget is busy (T)."""
        return (WINDOW + self.slack) / (self.rate - self.burst + 1)

    @property
    def tolerance(self) -> float:
        """How far ahead of ``tat`` a slot may be granted (tau = (burst - 1) * T)."""
        return (self.burst - 1) * self.interval

    @property
    def achieved_rate(self) -> float:
        """Calls a second when every slot is used."""
        return 1.0 / self.interval

    @property
    def max_ahead(self) -> float:
        """The furthest ``tat`` may legitimately be ahead of now (a wait of :data:`MAX_WAIT`, plus its
        own slot): anything further is garbage (a corrupt state, a clock that jumped)."""
        return MAX_WAIT + self.interval + self.tolerance


def reserve(tat: float, now: float, pacing: Pacing, max_wait: float) -> tuple[float, float] | None:
    """The next slot, if it is at most ``max_wait`` seconds away.

    Args:
        tat: the key's theoretical arrival time (see :func:`sane_tat`).
        now: the current time, on the clock ``tat`` is in.
        pacing: the key's pacing.
        max_wait: the caller's timeout, seconds.

    Returns:
        ``(slot, new_tat)``; None when the slot is further away (nothing is reserved then).
    """
    slot = max(now, tat - pacing.tolerance)
    if slot - now > max_wait:
        return None
    return slot, max(tat, slot) + pacing.interval


def sane_tat(tat: float, written_at: float, now: float, pacing: Pacing) -> float:
    """``tat`` as read from a state written at ``written_at``, made safe to use at ``now``.

    * ``-inf``: the key's budget was never used; it is free.
    * Otherwise not finite, or further ahead than :attr:`Pacing.max_ahead`: garbage; the budget is taken as
      spent just now (the next slot in one window and the slack), never as free.
    * Written "in the future" (the clock went back, or restarted at a reboot): kept as far ahead of
      now as it was of its writing, so no slot granted before is given again.
    """
    if tat == -math.inf:
        return tat
    if not (math.isfinite(tat) and math.isfinite(written_at)):
        return now + WINDOW + pacing.slack
    if written_at > now:
        tat = now + (tat - written_at)
    if tat - now > pacing.max_ahead:
        return now + WINDOW + pacing.slack
    return tat


def bump(seconds: list[int], counts: list[int], second: int, by: int = 1) -> None:
    """Add ``by`` to the bucket of ``second`` (a bucket of an older second is reset first)."""
    index = second % BUCKETS
    if seconds[index] != second:
        seconds[index], counts[index] = second, 0
    counts[index] += by


def recent(seconds: list[int], counts: list[int], second: int) -> int:
    """The sum of the buckets of the :data:`BUCKETS` seconds up to and including ``second``."""
    return sum(n for s, n in zip(seconds, counts, strict=True) if second - BUCKETS < s <= second)


def empty_buckets() -> tuple[list[int], list[int]]:
    """``(seconds, counts)`` of no calls."""
    return [-1] * BUCKETS, [0] * BUCKETS
