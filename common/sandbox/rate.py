"""The broker's calls-per-second limit per app key, as the sandbox keeps it on its REST paths.

The broker's limits notice of 2026-04-20 allows real accounts 18 REST calls a second and paper
accounts 1, counted per app key; a call beyond that is answered ``EGW00201`` (HTTP 500, the usual
envelope) and executes nothing. :class:`RestRateLimit` keeps that rule in a sliding one-second
window measured where the calls arrive (the server), so a client that spaces its calls by the rate
never sees ``EGW00201``, and one that bursts does.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

#: The broker's rate for real accounts (calls a second per app key); paper accounts get 1.
REAL_RATE = 18
PAPER_RATE = 1
#: The broker's answer to a call beyond the rate.
EGW00201_STATUS = 500
EGW00201_BODY: dict[str, str] = {
    "rt_cd": "1",
    "msg_cd": "EGW00201",
    "msg1": "초당 거래건수를 초과하였습니다.",
}


def check_rate(value: Any, name: str = "rest_rate") -> int:
    """Return ``value`` as a rate (a whole number of calls a second, 0 for no limit), or raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a whole number of calls a second")
    if value < 0 or value != int(value):
        raise ValueError(f"{name} must be a whole number of calls a second, 0 for no limit")
    return int(value)


class RestRateLimit:
    """Calls per second per app key in a sliding window, with injected ``EGW00201`` on demand.

    Args:
        rate: calls an app key may make in any one window (0: no limit).
        rates: a rate per app key that overrides ``rate`` (e.g. ``{paper_key: 1}``).
        window: the window's length in seconds (the broker's is one second).
        clock: monotonic seconds (default ``time.monotonic``).

    Thread-safe. Refused calls do not take a place in the window (they executed nothing).

    Raises:
        ValueError: a rate is not a whole number of at least 0, or ``window`` is not positive.
    """

    def __init__(
        self,
        rate: int = REAL_RATE,
        rates: Mapping[str, int] | None = None,
        window: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int | float) or not window > 0:
            raise ValueError("window must be a positive number of seconds")
        self._lock = threading.Lock()
        self._clock = clock
        self._window = float(window)
        self.rate = check_rate(rate)
        self.rates = self._check_rates(rates or {})
        self._forget()

    @staticmethod
    def _check_rates(rates: Mapping[str, Any]) -> dict[str, int]:
        if not isinstance(rates, Mapping):
            raise ValueError("rest_rates must map app keys to rates")
        checked = {}
        for key, value in rates.items():
            if not isinstance(key, str) or not key:
                raise ValueError("rest_rates keys must be non-empty app keys")
            checked[key] = check_rate(value, "a rest_rates value")
        return checked

    def _forget(self) -> None:
        self._arrivals: dict[str, deque[float]] = {}
        self._injected: dict[str | None, int] = {}
        self._served: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()
        self._injected_served = 0

    def rate_for(self, app_key: str) -> int:
        """The rate that applies to ``app_key`` (0: no limit)."""
        with self._lock:
            return self.rates.get(app_key, self.rate)

    def admit(self, app_key: str) -> bool:
        """Count one call of ``app_key``: ``True`` if it is served, ``False`` if it gets ``EGW00201``."""
        with self._lock:
            if self._take_injected(app_key):
                self._refused[app_key] += 1
                self._injected_served += 1
                return False
            rate = self.rates.get(app_key, self.rate)
            now = self._clock()
            arrivals = self._arrivals.setdefault(app_key, deque())
            while arrivals and arrivals[0] <= now - self._window:
                arrivals.popleft()
            if rate and len(arrivals) >= rate:
                self._refused[app_key] += 1
                return False
            arrivals.append(now)
            self._served[app_key] += 1
            return True

    def _take_injected(self, app_key: str) -> bool:
        """Spend one injected refusal meant for ``app_key`` or for any key (lock held)."""
        for target in (app_key, None):
            left = self._injected.get(target, 0)
            if left:
                if left == 1:
                    del self._injected[target]
                else:
                    self._injected[target] = left - 1
                return True
        return False

    def inject(self, count: int, app_key: str | None = None) -> None:
        """Answer the next ``count`` calls (of ``app_key``, or of any key) ``EGW00201``, whatever the rate.

        Raises:
            ValueError: ``count`` is not an integer of at least 1, or ``app_key`` is empty.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError("count must be an integer of at least 1")
        if app_key is not None and (not isinstance(app_key, str) or not app_key):
            raise ValueError("appkey must be a non-empty string")
        with self._lock:
            self._injected[app_key] = self._injected.get(app_key, 0) + count

    def clear_injected(self) -> None:
        """Drop the injected refusals not served yet."""
        with self._lock:
            self._injected.clear()

    def configure(self, rate: int | None = None, rates: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Change the rate and/or the per-key rates (``rates`` replaces them all); return :meth:`limits`."""
        checked_rate = None if rate is None else check_rate(rate)
        checked_rates = None if rates is None else self._check_rates(rates)
        with self._lock:
            if checked_rate is not None:
                self.rate = checked_rate
            if checked_rates is not None:
                self.rates = checked_rates
            return {"rest_rate": self.rate, "rest_rates": dict(self.rates)}

    def limits(self) -> dict[str, Any]:
        """``{"rest_rate", "rest_rates"}``."""
        with self._lock:
            return {"rest_rate": self.rate, "rest_rates": dict(self.rates)}

    def reset(self) -> None:
        """Forget the window, the counters and the injected refusals (the rates stay)."""
        with self._lock:
            self._forget()

    def snapshot(self) -> dict[str, Any]:
        """The counters: calls served and ``EGW00201`` answered per app key, and how many were injected."""
        with self._lock:
            return {
                "rest_calls": dict(self._served),
                "rest_egw00201": dict(self._refused),
                "rest_egw00201_injected": self._injected_served,
            }
