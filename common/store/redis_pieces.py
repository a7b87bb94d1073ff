"""The three pieces of a key's store on a Redis/Valkey server: the record (with its tombstone after a
deletion, and a check-and-set), the renewal lock (a lease) and the renewal state. What they hold is
described in ``common.store.redis_store``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import redis
from redis.exceptions import LockNotOwnedError, RedisError, WatchError
from redis.lock import Lock

from common.credentials.records import ApprovalRecord, TokenRecord
from common.errors import CorruptRecordError, LockTimeoutError, StoreError
from common.store.protocols import RenewalState

TOMBSTONE = b"deleted"  # followed by ":<expiry of the deleted record>"
TOMBSTONE_TTL = 2 * 86400  # tokens live 24 h: by then no host holds the deleted one any more
#: A check-and-set of the record that loses the race to another writer this many times in a row
#: gives up (a :class:`StoreError`) instead of spinning its caller.
WATCH_TRIES = 10

R = TypeVar("R", TokenRecord, ApprovalRecord)
T = TypeVar("T")
_log = logging.getLogger(__name__)



class RedisRecordStore(Generic[R]):
    """One key's record in one string key on the server."""

    def __init__(self, client: redis.Redis, name: str, parse: Callable[[str], R],
                 dump: Callable[[R], str], location: str) -> None:
        self.name = name
        self.location = location
        self._client = client
        self._parse = parse
        self._dump = dump

    def signature(self) -> object:
        """The stored bytes themselves (one ``GET``; a record is a few hundred bytes)."""
        return self._client.get(self.name)

    def load(self) -> R | None:
        """The stored record (None if there is none, or it was deleted)."""
        return self._decode(self._client.get(self.name))

    def save(self, record: R) -> None:
        """Replace the stored record."""
        self._client.set(self.name, self._dump(record))

    def delete(self) -> list[str]:
        """Mark the record deleted, so that no host puts its copy back; return it if it was there.

        The mark carries the deleted record's expiry: a copy that expires no later is that token (or
        an older one) and is dropped; one that expires later was renewed since, and stays.
        """

        def attempt(pipe: Any) -> list[str]:
            raw = pipe.get(self.name)
            if raw is None or raw.startswith(TOMBSTONE):
                return []
            expires = float("inf")
            with contextlib.suppress(CorruptRecordError, UnicodeDecodeError, ValueError):
                expires = self._parse(raw.decode()).expires_at
            pipe.multi()
            pipe.set(self.name, TOMBSTONE + f":{expires}".encode(), ex=TOMBSTONE_TTL)
            return [self.location]

        return self._check_and_set(attempt)

    def put_back(self, record: R) -> R | None:
        """Store ``record`` unless the server holds one that expires no earlier, or a deletion.

        Returns:
            The record the server holds afterwards (None: the record was deleted).
        """

        def attempt(pipe: Any) -> R | None:
            raw = pipe.get(self.name)
            if raw is not None and raw.startswith(TOMBSTONE) and record.expires_at <= _deleted_expiry(raw):
                return None
            with contextlib.suppress(CorruptRecordError, UnicodeDecodeError):
                current = self._decode(raw)
                if current is not None and current.expires_at >= record.expires_at:
                    return current
            pipe.multi()
            pipe.set(self.name, self._dump(record))
            return record

        return self._check_and_set(attempt)

    def ready(self) -> None:
        """Nothing to check: the server takes any record (an unreachable one is the caller's fallback)."""

    def problem(self) -> str | None:
        """None: see :meth:`ready`."""
        return None

    def _check_and_set(self, attempt: Callable[[Any], T]) -> T:
        """``attempt(pipe)`` under ``WATCH`` of the record, then ``EXEC``; again if another writer
        changed the record in between, at most :data:`WATCH_TRIES` times (redis-py's
        ``transaction()`` would retry without bound).

        Raises:
            StoreError: every try lost the race.
            RedisError: the server did not answer.
        """
        for _ in range(WATCH_TRIES):
            with self._client.pipeline() as pipe:
                try:
                    pipe.watch(self.name)
                    result = attempt(pipe)
                    pipe.execute()
                    return result
                except WatchError:
                    continue
        raise StoreError(
            f"{self.location} kept changing under this host's write ({WATCH_TRIES} tries); try again"
        )

    def _decode(self, raw: bytes | None) -> R | None:
        if raw is None or raw.startswith(TOMBSTONE):
            return None
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise CorruptRecordError(f"{self.name} is not UTF-8") from None
        return self._parse(text)


def _deleted_expiry(raw: bytes) -> float:
    """The expiry a deletion mark names (a bare ``deleted`` from before: every token)."""
    try:
        return float(raw[len(TOMBSTONE) + 1:] or "inf")
    except ValueError:
        return float("inf")


class RedisRenewalLock:
    """A lease on the server (redis-py's ``Lock``: ``SET NX PX`` with a random owner value, released
    or extended only by its owner). A holder that dies holds it until the lease runs out.

    Re-entrant within a thread; each acquisition has a ``Lock`` object of its own, so threads (and
    asyncio tasks run in threads) never release each other's lease.
    """

    def __init__(self, client: redis.Redis, name: str, lease: float, location: str) -> None:
        self.name = name
        self.lease = lease
        self.location = location
        self._client = client
        self._held = threading.local()
        self._orphans: list[tuple[Lock, bytes]] = []

    def _release_orphans(self) -> None:
        """Release leases whose acquisition lost its answer (only if still ours: owner-checked)."""
        while self._orphans:
            lock, token = self._orphans[0]
            try:
                lock.do_release(token)
            except LockNotOwnedError:
                pass
            except RedisError:
                return
            self._orphans.pop(0)

    @contextlib.contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        """Hold the lease, waiting at most ``timeout`` seconds (0: one try).

        Raises:
            LockTimeoutError: another owner held it all that time.
            RedisError: the server did not answer.
        """
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        self._release_orphans()
        lock = Lock(self._client, self.name, timeout=self.lease, blocking=False, thread_local=False)
        token = secrets.token_hex(16).encode()
        deadline = time.monotonic() + max(timeout, 0.0)
        seen_held = False
        while True:
            try:
                if lock.acquire(token=token):
                    break
            except RedisError:
                # The SET may have reached the server and only its answer got lost: release that
                # lease as soon as the server answers again, so that it does not block everyone.
                self._orphans.append((lock, token))
                if seen_held:  # another owner holds it and may be renewing: busy, not unreachable
                    raise LockTimeoutError(
                        f"another host or process holds {self.name}, and the store stopped answering"
                    ) from None
                raise
            seen_held = True
            if time.monotonic() >= deadline:
                raise LockTimeoutError(f"another host or process held {self.name} for over {timeout:g} s")
            time.sleep(0.02)
        self._held.depth, self._held.lock = 1, lock
        try:
            yield
        finally:
            self._held.depth, self._held.lock = 0, None
            try:
                lock.release()
            except LockNotOwnedError:
                _log.warning("the lease on %s ran out before its holder was done", self.name)
            except RedisError as exc:
                _log.warning("cannot release %s (%s); its lease runs out in %g s",
                             self.name, type(exc).__name__, self.lease)

    def confirm(self) -> None:
        """Raise unless the lease this thread holds is still ours; if it is, give it its whole
        ``lease`` again (one script: compare the owner value, then ``PEXPIRE``).

        Raises:
            LockTimeoutError: not held by this thread, or the lease lapsed (another owner may hold it).
            RedisError: the server did not answer.
        """
        lock = getattr(self._held, "lock", None)
        if lock is None:
            raise LockTimeoutError(f"{self.name} is not held by this thread")
        try:
            lock.reacquire()
        except LockNotOwnedError:
            raise LockTimeoutError(
                f"the lease on {self.name} ran out before the request was sent; another host or "
                "process may be renewing"
            ) from None


class RedisStateStore:
    """The key's :class:`RenewalState` in one string key on the server."""

    def __init__(self, client: redis.Redis, name: str, location: str) -> None:
        self.name = name
        self.location = location
        self._client = client

    def stored(self) -> RenewalState | None:
        """The stored state, or None if the server has none."""
        raw = self._client.get(self.name)
        if raw is None:
            return None
        try:
            return RenewalState.from_json(raw.decode())
        except UnicodeDecodeError:
            raise CorruptRecordError(f"{self.name} is not UTF-8") from None

    def load(self) -> RenewalState:
        """The stored state; a missing one is fresh."""
        return self.stored() or RenewalState()

    def save(self, state: RenewalState) -> None:
        """Replace the stored state."""
        self._client.set(self.name, json.dumps(state.to_dict()))
