"""The call budget of several hosts: GCRA in one Lua script on the Redis/Valkey server.

Per key, one hash ``kis-token:v1:<id>:budget`` (next to the key's ``record``, ``lock`` and ``state``,
``common.store.redis_store``) holds ``tat`` (microseconds on the server's clock), the per-second
buckets ``c0`` .. ``c59`` (calls granted) and ``r0`` .. ``r59`` (``EGW00201`` noted), each
``<second>:<count>``, and ``rtotal``. It expires a minute after its ``tat`` passed: an idle key
costs the server nothing.

:data:`SCRIPT` does the whole read-modify-write atomically on the server and reads the time with
the server's ``TIME``, so hosts whose clocks disagree share one timeline; the caller gets back a
*duration* (how long to sleep before its slot), which no clock skew can shift.

:class:`SharedBudget` is what a host with ``KIS_TOKEN_STORE`` uses: the server, and this host's
:class:`~common.budget.file_backend.FileBudget` whenever the server does not answer. The client is
the process's one :class:`~common.store.redis_store.StoreLink` (each call gives up after 0.5 s; after
a failure the server is left alone for 5 s), so a server that is down costs one bounded timeout, not
one per call; and one warning per outage says the key is paced on this host alone.
"""

from __future__ import annotations

import logging
from typing import Any

from common.budget.file_backend import FileBudget
from common.budget.pacing import BUCKETS, MAX_WAIT, WINDOW, Pacing
from common.budget.protocol import Counts, NoSlotWithin
from common.store.redis_store import PREFIX, StoreLink, Unreachable

#: ``EVALSHA`` of this with KEYS = [the key's hash] and ARGV = [op, ...]:
#: ``reserve interval_us tolerance_us max_wait_us max_ahead_us window_us`` -> {granted 0|1, wait_us}
#: ``refuse`` -> {0, 0};  ``count`` -> {calls, refusals, refusals_total}
SCRIPT = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local key, op = KEYS[1], ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local second = tonumber(t[1])
local function bump(prefix)
  local field = prefix .. (second % BUCKETS)
  local s, n = string.match(redis.call('HGET', key, field) or '', '^(%d+):(%d+)$')
  n = (tonumber(s) == second) and tonumber(n) + 1 or 1
  redis.call('HSET', key, field, second .. ':' .. n)
end
local function recent(prefix)
  local total = 0
  for i = 0, BUCKETS - 1 do
    local s, n = string.match(redis.call('HGET', key, prefix .. i) or '', '^(%d+):(%d+)$')
    if s and tonumber(s) > second - BUCKETS and tonumber(s) <= second then total = total + tonumber(n) end
  end
  return total
end
local tat = tonumber(redis.call('HGET', key, 'tat'))
if op == 'count' then
  return {recent('c'), recent('r'), tonumber(redis.call('HGET', key, 'rtotal') or '0')}
end
local reply
if op == 'reserve' then
  local interval, tolerance = tonumber(ARGV[2]), tonumber(ARGV[3])
  local max_wait, max_ahead, window = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  if tat == nil then tat = now
  elseif tat - now > max_ahead then tat = now + window end
  local slot = math.max(now, tat - tolerance)
  if slot - now > max_wait then return {0, slot - now} end
  tat = math.max(tat, slot) + interval
  redis.call('HSET', key, 'tat', string.format('%.0f', tat))
  bump('c')
  reply = {1, slot - now}
else
  bump('r')
  redis.call('HINCRBY', key, 'rtotal', 1)
  reply = {0, 0}
end
redis.call('PEXPIRE', key, math.floor(math.max((tat or now) - now, 0) / 1000) + 1000 * (BUCKETS + 1))
return reply
""".replace("BUCKETS", str(BUCKETS))

_log = logging.getLogger(__name__)
_US = 1_000_000


def budget_key(key_id: str) -> str:
    """The server's key name for one app key's budget: ``kis-token:v1:<id>:budget``."""
    return f"{PREFIX}{key_id}:budget"


class RedisBudget:
    """One key's budget on the server (see the module docstring).

    Args:
        link: the process's link to the server (``common.store.redis_store.link``).
        key_id: :attr:`Credential.key_id` of the key.
    """

    kind = "redis"

    def __init__(self, link: StoreLink, key_id: str) -> None:
        self.link = link
        self.name = budget_key(key_id)
        self.location = f"{link.url} {self.name}"
        self._script = link.client.register_script(SCRIPT)

    def reserve(self, pacing: Pacing, max_wait: float) -> float:
        """See :meth:`BudgetBackend.reserve`.

        Raises:
            Unreachable: the server did not answer (nothing reserved as far as this host knows).
        """
        args = ["reserve", _micro(pacing.interval), _micro(pacing.tolerance), _micro(min(max_wait, MAX_WAIT)),
                _micro(pacing.max_ahead), _micro(WINDOW + pacing.slack)]
        granted, wait_us = self._run(args)
        if not granted:
            raise NoSlotWithin(int(wait_us) / _US)
        return max(0, int(wait_us)) / _US

    def note_refusal(self) -> None:
        """Count one ``EGW00201`` answer on the server.

        Raises:
            Unreachable: the server did not answer.
        """
        self._run(["refuse"])

    def counts(self) -> Counts:
        """The server's counters for the key.

        Raises:
            Unreachable: the server did not answer.
        """
        calls, refusals, total = self._run(["count"])
        return Counts(int(calls), int(refusals), int(total))

    def _run(self, args: list[Any]) -> list[Any]:
        return self.link.call(self._script, [self.name], args)  # type: ignore[no-any-return]


class SharedBudget:
    """The key's budget on the server, and this host's file budget while the server does not answer.

    While the server is down each host paces the key on its own: the key may then see up to the
    rate once per host (the broker answers ``EGW00201`` beyond it, and callers retry), never more
    than the rate from one host and never an unpaced call. One warning when the fallback starts,
    one when the server answers again.
    """

    kind = "redis"

    def __init__(self, shared: RedisBudget, local: FileBudget) -> None:
        self.shared, self.local = shared, local
        self.location = shared.location
        self.falling_back = False

    @property
    def active(self) -> str:
        """``redis``, or ``file`` while the server does not answer."""
        return "file" if self.falling_back else "redis"

    def reserve(self, pacing: Pacing, max_wait: float) -> float:
        """See :meth:`BudgetBackend.reserve` (the server's, else this host's file's)."""
        try:
            wait = self.shared.reserve(pacing, max_wait)
        except Unreachable as exc:
            self._fell_back(exc)
            return self.local.reserve(pacing, max_wait)
        self._answered()
        return wait

    def note_refusal(self) -> None:
        """Count one ``EGW00201`` answer (on the server, else in this host's file)."""
        try:
            self.shared.note_refusal()
        except Unreachable as exc:
            self._fell_back(exc)
            self.local.note_refusal()
            return
        self._answered()

    def counts(self) -> Counts:
        """The server's counters, else this host's file's."""
        try:
            found = self.shared.counts()
        except Unreachable as exc:
            self._fell_back(exc)
            return self.local.counts()
        self._answered()
        return found

    def _fell_back(self, exc: Unreachable) -> None:
        if not self.falling_back:
            self.falling_back = True
            _log.warning("call budget: the token store %s does not answer (%s); pacing the key on this "
                         "host's budget %s until it does (every host now spends the whole rate on its "
                         "own)", self.shared.link.url, exc, self.local.location)

    def _answered(self) -> None:
        if self.falling_back:
            self.falling_back = False
            _log.warning("call budget: the token store %s answers again; the key is paced there",
                         self.shared.link.url)


def _micro(seconds: float) -> int:
    return round(seconds * _US)
