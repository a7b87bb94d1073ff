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
the process's one :class:`~common.store.redis_link.StoreLink` (each call gives up after 0.5 s; after
a failure the server is left alone for 5 s), so a server that is down costs one bounded timeout, not
one per call; and one warning per outage says the key is paced on this host alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import socket
from pathlib import Path
from typing import Any

from common.budget.file_backend import FileBudget
from common.budget.pacing import BUCKETS, MAX_WAIT, WINDOW, Pacing
from common.budget.protocol import Counts, NoSlotWithin
from common.errors import StoreUnreachableError
from common.store.redis_link import StoreLink, key_name

#: ``EVALSHA`` of this with KEYS = [the key's hash] and ARGV = [op, ...]:
#: ``reserve interval_us tolerance_us max_wait_us max_ahead_us window_us host not_before_us``
#:   -> {granted 0|1, wait_us}  (no slot sooner than ``not_before_us`` from now)
#: ``refuse`` -> {0, 0};  ``count`` -> {calls, refusals, refusals_total, hosts}
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
if op == 'count' then
  local calls, refusals, total, hosts = 0, 0, 0, 0
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    local field, value = all[i], all[i + 1]
    local kind = string.sub(field, 1, 1)
    local s, n = string.match(value, '^(%d+):(%d+)$')
    if s and tonumber(s) > second - BUCKETS and tonumber(s) <= second then
      if kind == 'c' then calls = calls + tonumber(n)
      elseif kind == 'r' then refusals = refusals + tonumber(n) end
    elseif field == 'rtotal' then total = tonumber(value)
    elseif string.sub(field, 1, 2) == 'h:' then
      if tonumber(value) > second - BUCKETS then hosts = hosts + 1 else redis.call('HDEL', key, field) end
    end
  end
  return {calls, refusals, total, hosts}
end
local tat = tonumber(redis.call('HGET', key, 'tat'))
local reply
if op == 'reserve' then
  local interval, tolerance = tonumber(ARGV[2]), tonumber(ARGV[3])
  local max_wait, max_ahead, window = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  if tat == nil then tat = now
  elseif tat - now > max_ahead then tat = now + window end
  local slot = math.max(now + (tonumber(ARGV[8]) or 0), tat - tolerance)
  if slot - now > max_wait then return {0, slot - now} end
  tat = math.max(tat, slot) + interval
  redis.call('HSET', key, 'tat', string.format('%.0f', tat), 'h:' .. ARGV[7], second)
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

#: How often a process asks the server how many hosts use the key (for the share it paces at alone).
HOSTS_EVERY = 10.0

_log = logging.getLogger(__name__)
_US = 1_000_000


class RedisBudget:
    """One key's budget on the server (see the module docstring).

    Args:
        link: the process's link to the server (``common.store.redis_link.link``).
        key_id: :attr:`Credential.key_id` of the key.
    """

    kind = "redis"

    def __init__(self, link: StoreLink, key_id: str) -> None:
        self.link = link
        self.name = key_name(key_id, "budget")
        self.location = f"{link.url} {self.name}"
        self._script = link.client.register_script(SCRIPT)

    def reserve(self, pacing: Pacing, max_wait: float, host: str = "", not_before: float = 0.0) -> float:
        """See :meth:`BudgetBackend.reserve`; ``host`` is noted as one that uses the key (see
        :attr:`Counts.hosts`); no slot comes sooner than ``not_before`` seconds from now.

        Raises:
            StoreUnreachableError: the server did not answer (nothing reserved as far as this host knows).
        """
        args = ["reserve", _micro(pacing.interval), _micro(pacing.tolerance), _micro(min(max_wait, MAX_WAIT)),
                _micro(pacing.max_ahead), _micro(WINDOW + pacing.slack), host, _micro(max(0.0, not_before))]
        granted, wait_us = self._run(args)
        if not granted:
            raise NoSlotWithin(int(wait_us) / _US)
        return max(0, int(wait_us)) / _US

    def note_refusal(self) -> None:
        """Count one ``EGW00201`` answer on the server.

        Raises:
            StoreUnreachableError: the server did not answer.
        """
        self._run(["refuse"])

    def counts(self) -> Counts:
        """The server's counters for the key.

        Raises:
            StoreUnreachableError: the server did not answer.
        """
        calls, refusals, total, hosts = self._run(["count"])
        return Counts(int(calls), int(refusals), int(total), int(hosts))

    def _run(self, args: list[Any]) -> list[Any]:
        answer: list[Any] = self.link.call(self._script, [self.name], args)
        return answer


class SharedBudget:
    """The key's budget on the server, and this host's file budget while the server does not answer.

    While the server is down each host paces the key on its own, at the rate divided by the number
    of hosts that used the key in the last minute (as the server said at most :data:`HOSTS_EVERY`
    seconds before): so the key stays within its rate as long as no host joins during the outage,
    and never sees an unpaced call. After the switch a process's first call on the file waits a
    whole window after the last slot the server gave it (slots already granted by the server are
    still being spent); and the other way, the first slot the server gives after the outage comes
    no sooner than the file's next free slot (the slots the file granted meanwhile, up to
    ``MAX_WAIT`` ahead, are unknown to the server). One warning when the fallback starts, one when
    the server answers again.

    Args:
        shared: the key's budget on the server.
        local: this host's file budget for the key.
        host: this host's name in the server's list of hosts (:func:`host_name`).
    """

    kind = "redis"

    def __init__(self, shared: RedisBudget, local: FileBudget, host: str = "") -> None:
        self.shared, self.local = shared, local
        self.host = host or host_name(local.path.parent)
        self.location = shared.location
        self.falling_back = False
        #: hosts that used the key in the last minute, as the server last said (at least 1)
        self.hosts = 1
        self._hosts_asked_at = -math.inf
        self._last_slot = -math.inf  # on the file's clock: the last slot the server gave this process

    @property
    def active(self) -> str:
        """``redis``, or ``file`` while the server does not answer."""
        return "file" if self.falling_back else "redis"

    def reserve(self, pacing: Pacing, max_wait: float) -> float:
        """See :meth:`BudgetBackend.reserve` (the server's, else this host's file's)."""
        now = self.local.clock()
        try:
            if now - self._hosts_asked_at >= HOSTS_EVERY:
                self._hosts_asked_at = now
                self.hosts = max(1, self.shared.counts().hosts)
            wait = self.shared.reserve(pacing, max_wait, self.host, self._comeback_delay(pacing, now))
        except StoreUnreachableError as exc:
            self._fell_back(exc)
            share = Pacing(pacing.rate / self.hosts, pacing.slack)
            return self.local.reserve(share, max_wait, self._last_slot + WINDOW + pacing.slack)
        self._last_slot = now + wait
        self._answered()
        return wait

    def _comeback_delay(self, pacing: Pacing, now: float) -> float:
        """While falling back: the seconds until the file's next free slot (the server's first slot
        must not come sooner); else 0. The file's state is read only while falling back."""
        if not self.falling_back:
            return 0.0
        return max(0.0, self.local.schedule_end(pacing) - now)

    def note_refusal(self) -> None:
        """Count one ``EGW00201`` answer (on the server, else in this host's file)."""
        try:
            self.shared.note_refusal()
        except StoreUnreachableError as exc:
            self._fell_back(exc)
            self.local.note_refusal()
            return
        self._answered()

    def counts(self) -> Counts:
        """The server's counters, else this host's file's (marked ``fallback``; reading them is not
        pacing, so it neither warns nor ends a fallback)."""
        try:
            found = self.shared.counts()
        except StoreUnreachableError:
            return dataclasses.replace(self.local.counts(), fallback=True)
        self.hosts = max(1, found.hosts)
        return found

    def _fell_back(self, exc: StoreUnreachableError) -> None:
        if not self.falling_back:
            self.falling_back = True
            _log.warning("call budget: the token store %s does not answer (%s); pacing the key on this "
                         "host's budget %s until it does, at the rate divided by the %d host%s that used "
                         "it in the last minute", self.shared.link.url, exc, self.local.location,
                         self.hosts, "" if self.hosts == 1 else "s")

    def _answered(self) -> None:
        if self.falling_back:
            self.falling_back = False
            _log.warning("call budget: the token store %s answers again; the key is paced there",
                         self.shared.link.url)


def host_name(directory: Path) -> str:
    """This host's name in the server's list of hosts: the machine's name and its token directory
    (two token directories on one machine are two hosts to the budget)."""
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:8]
    return f"{socket.gethostname()[:64]}:{digest}"


def _micro(seconds: float) -> int:
    return round(seconds * _US)
