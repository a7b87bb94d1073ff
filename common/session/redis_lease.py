"""The session lease of several hosts: a hash with a bounded time to live on the Redis/Valkey server.

Per key, next to its ``record``, ``lock`` and ``state`` (``common.store.redis_store``):

``kis-token:v1:<id>:session``        the lease: ``owner`` (a random value per acquisition), ``host``,
                                     ``pid``, ``market``, ``since`` (ms on the server's clock); it
                                     lives :attr:`SessionTimes.ttl` seconds unless its owner extends it
``kis-token:v1:<id>:session:start``  the last lease's start (ms on the server's clock), kept for the
                                     pacing interval

Each operation is one short Lua script, so it is atomic and reads the time from the server
(``TIME``: hosts whose clocks disagree share one timeline). Taking the lease also paces it: a lease
taken less than ``pace`` after the last one's start is granted with a start that far ahead, and the
caller sleeps until then. Extending and releasing compare the owner value first, as redis-py's
``Lock`` does (a holder whose lease lapsed and was taken by another never extends or deletes the
new holder's). Every call goes through :class:`common.store.redis_link.StoreLink` (0.5 s timeouts,
the server left alone for 5 s after a failure, except by the heartbeat, which asks anyway).
"""

from __future__ import annotations

import secrets
from typing import Any

from common.session.holder import Holder, LeaseHeld
from common.store.redis_link import StoreLink, key_name

_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, pace = tonumber(ARGV[2]), tonumber(ARGV[3])
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then
  return {0, now, 0, redis.call('HGETALL', KEYS[1])}
end
local start = now
local last = tonumber(redis.call('GET', KEYS[2]) or '')
if last and pace > 0 and not owner then
  start = math.max(now, math.min(last, now) + pace)
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'host', ARGV[4], 'pid', ARGV[5], 'market', ARGV[6],
           'since', string.format('%d', start))
redis.call('PEXPIRE', KEYS[1], ttl + start - now)
if pace > 0 then
  redis.call('SET', KEYS[2], string.format('%d', start), 'PX', pace + start - now)
end
return {1, now, start, {}}
"""

_EXTEND = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_MS = 1000.0


class RedisLease:
    """One key's session lease on the server (see the module docstring).

    Args:
        link: the process's link to the server (``common.store.redis_link.link``).
        key_id: :attr:`Credential.key_id` of the key.
    """

    def __init__(self, link: StoreLink, key_id: str) -> None:
        self.link = link
        self.name = key_name(key_id, "session")
        self.names = [self.name, self.name + ":start"]
        self.location = f"{link.url} {self.name}"
        self.owner = secrets.token_hex(16)
        register = link.client.register_script
        self._take, self._extend, self._release = (register(s) for s in (_TAKE, _EXTEND, _RELEASE))

    def take(self, holder: Holder, ttl: float, pace: float, *, insist: bool = False) -> float:
        """Take (or re-take) the lease for ``holder``; return the seconds until its paced start
        (``insist``: ask even while the link rests after a failure, as the heartbeat does).

        Raises:
            LeaseHeld: another owner holds it.
            StoreUnreachableError: the server did not answer (the lease may or may not be ours: the
                next :meth:`take` with the same owner value settles it).
        """
        args = [self.owner, _ms(ttl), _ms(pace), holder.host, holder.pid, holder.market]
        call = self.link.call_anyway if insist else self.link.call
        status, now, start, fields = call(self._take, self.names, args)
        if not status:
            raise LeaseHeld(Holder.from_fields(_fields(fields)))
        return max(0.0, (int(start) - int(now)) / _MS)

    def extend(self, ttl: float, *, insist: bool = False) -> bool:
        """Give the lease its whole ``ttl`` again if it is still ours; False if it is not (it lapsed).
        ``insist``: ask even while the link rests after a failure (the heartbeat does).

        Raises:
            StoreUnreachableError: the server did not answer.
        """
        call = self.link.call_anyway if insist else self.link.call
        return bool(call(self._extend, [self.name], [self.owner, _ms(ttl)]))

    def release(self) -> bool:
        """Delete the lease if it is still ours (the pacing key stays); True if it was.

        Raises:
            StoreUnreachableError: the server did not answer (the lease lapses within its ttl).
        """
        return bool(self.link.call(self._release, [self.name], [self.owner]))

    def holder(self) -> Holder | None:
        """Who holds the lease on the server now (None: no one).

        Raises:
            StoreUnreachableError: the server did not answer.
        """
        return Holder.from_fields(_fields(self.link.call(self.link.client.hgetall, self.name)))


def _fields(raw: Any) -> dict[str, Any]:
    """A hash's fields as text, whether the server gave a flat list (scripts) or a dict (``HGETALL``)."""
    items = list(raw.items()) if isinstance(raw, dict) else list(zip(raw[::2], raw[1::2], strict=False))
    fields = {_text(k): _text(v) for k, v in items}
    if "since" in fields:
        try:
            fields["since"] = float(fields["since"]) / _MS
        except ValueError:
            fields.pop("since")
    return fields


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * _MS)) if seconds > 0 else 0
