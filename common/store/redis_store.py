"""The Redis/Valkey backend of the store (several hosts on one app key).

``KIS_TOKEN_STORE=redis://[user:password@]host[:port][/db]`` (or ``rediss://`` for TLS, or
``unix:///path/to/socket``) names the server. Per key (``<id>`` is :attr:`Credential.key_id`, e.g.
``real-5fda05f056d87ade``) it holds three keys under the prefix ``kis-token:v1:<id>:``:

``kis-token:v1:<id>:record``  the key's token record, the JSON of ``key-<id>.json``
                              (``deleted:<expiry>`` for two days after a ``delete`` or ``revoke``,
                              so no host puts that token back)
``kis-token:v1:<id>:lock``    the renewal lock: a random owner value with a lease (``SET NX PX``)
``kis-token:v1:<id>:state``   the key's renewal memory, the JSON of ``key-<id>.state``

and the same three under ``kis-token:v1:<id>:approval:`` for the key's WebSocket approval key
(``key-<id>.approval.json|.lock|.state`` on the host).

None of them holds an app key, a secret, or anything they could be recovered from (the record has
a 16-hex-digit SHA-256 fingerprint of the key, as the files do). Another layout of these keys or
their values would come under a new ``v<N>``.

:func:`shared_key_store` is what a manager uses: the three pieces on the server, each falling back
to the same piece on the host's files (``common.store.file_store``) whenever the server does not answer
within :data:`SOCKET_TIMEOUT`. The files stay a full copy (the host's tools, ``check`` and mojito
read them), so with the server down the host serves its token and renews it under its own file
lock; and a server restarted empty gets the record back from the first host that holds it.

Right before a request is sent, the engine calls the lock's ``confirm()``: one script compares the
lease's owner value with ours and, if it is still ours, sets its time to live back to the whole
lease (redis-py's ``Lock.reacquire``), so the request that follows has the same margin as right
after the lease was taken; a lease that lapsed (its holder was stopped longer than the lease) is an
error, never a second request. A check-and-set of the record (``WATCH``/``MULTI``/``EXEC``) is
tried at most :data:`WATCH_TRIES` times, then is a :class:`StoreError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import LockNotOwnedError, RedisError, WatchError
from redis.lock import Lock
from redis.retry import Retry

from common.credentials.records import CorruptRecordError, TokenRecord
from common.errors import ConfigError, LockTimeoutError, StoreError
from common.renewal.policy import LOCK_WAIT, Expiring
from common.settings import TOKEN_STORE_VAR, mask_url
from common.store import file_store
from common.store.protocols import KeyStore, RenewalState

PREFIX = "kis-token:v1:"
#: Each call to the server gives up after this long (connect, and each answer).
SOCKET_TIMEOUT = 0.5
#: After a call failed, the server is not asked again for this long (the host runs on its files).
RETRY_INTERVAL = 5.0
#: The lock's lease outlives anything its holder may do under it: the longest wait for the lock
#: (``Windows.lock_wait``), the token request's whole retry budget with its last attempt
#: (``kis_client.Timeouts``: ``budget`` 20 s + ``attempt`` 10 s), and a margin for the writes.
LEASE = LOCK_WAIT + 20.0 + 10.0 + 30.0
#: Errors that say the server answers but refuses this configuration (password, user, database).
MISCONFIGURED = ("AuthenticationError", "AuthenticationWrongNumberOfArgsError", "AuthorizationError",
                 "NoPermissionError", "ResponseError")
TOMBSTONE = b"deleted"  # followed by ":<expiry of the deleted record>"
TOMBSTONE_TTL = 2 * 86400  # tokens live 24 h: by then no host holds the deleted one any more
#: A check-and-set of the record that loses the race to another writer this many times in a row
#: gives up (a :class:`StoreError`) instead of spinning its caller.
WATCH_TRIES = 10

R = TypeVar("R", bound=Expiring)
T = TypeVar("T")
_log = logging.getLogger(__name__)


def key_names(key_id: str, kind: str = "token") -> dict[str, str]:
    """The server's key names for one app key's credential of ``kind``: ``record``, ``lock``, ``state``."""
    stem = f"{PREFIX}{key_id}:" + ("" if kind == "token" else f"{kind}:")
    return {piece: stem + piece for piece in ("record", "lock", "state")}


# -- the three pieces on the server --------------------------------------------------------------------


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


# -- the server, and whether it answers -----------------------------------------------------------------


class Unreachable(Exception):
    """The server did not answer (or is resting after a failure): use the host's files."""


class StoreLink:
    """One client of one server, shared by every key and piece in the process, and its health.

    A failed call marks the server down for ``retry_interval`` seconds, during which nothing is sent
    to it (so a server that swallows packets costs one timeout, not one per call); the first failure
    of an outage is logged once as a warning naming the server (never its password).
    """

    def __init__(self, url: str, retry_interval: float = RETRY_INTERVAL) -> None:
        self.url = mask_url(url)
        self.retry_interval = retry_interval
        try:
            self.client = redis.Redis.from_url(
                url,
                socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=SOCKET_TIMEOUT,
                # One immediate retry on a dropped connection (a restarted server), none on a timeout.
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{TOKEN_STORE_VAR} cannot be used ({exc}): {self.url}") from None
        self._secret = self.client.get_connection_kwargs().get("password") or None
        self._retry_at = float("-inf")
        self.error: str | None = None  # why the last call failed, while down

    @property
    def down(self) -> bool:
        """True while the server is resting after a failed call."""
        return time.monotonic() < self._retry_at

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` against the server.

        Raises:
            Unreachable: the server is resting after a failure, or this call failed.
        """
        if self.down:
            raise Unreachable(self.error)
        try:
            result = function(*args)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            raise Unreachable(self.error) from None
        if self.error is not None:
            _log.warning("token store %s answers again", self.url)
            self.error = None
        return result

    def ping(self) -> bool:
        """True if the server answers now (a failure starts an outage, as any call's does)."""
        try:
            return bool(self.call(self.client.ping))
        except Unreachable:
            return False

    def _failed(self, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        if self._secret:
            reason = reason.replace(str(self._secret), "***")
        first = self.error is None
        self.error = reason
        self._retry_at = time.monotonic() + self.retry_interval
        if first:
            _log.warning("token store %s unreachable (%s); this host serves and renews its tokens "
                         "from its own files until it answers", self.url, reason)


_links: dict[tuple[str, float], StoreLink] = {}
_links_lock = threading.Lock()


def link(url: str, retry_interval: float = RETRY_INTERVAL) -> StoreLink:
    """The process's :class:`StoreLink` to ``url`` (one per URL, shared by both markets)."""
    with _links_lock:
        found = _links.get((url, retry_interval))
        if found is None:
            found = _links[(url, retry_interval)] = StoreLink(url, retry_interval)
        return found


# -- shared pieces with the host's files as fallback and copy --------------------------------------------


class SharedRecordStore(Generic[R]):
    """The key's record on the server, copied to (and, when the server is down, served from) the
    host's file. A server that lost the record (restarted empty) gets the host's copy back when
    that one expires later than anything the server holds."""

    def __init__(self, link: StoreLink, shared: RedisRecordStore[R],
                 local: file_store.FileRecordStore[R]) -> None:
        self.link, self.shared, self.local = link, shared, local
        self.location = local.location

    def signature(self) -> object:
        """The server's bytes (one ``GET``), or the file's signature while the server is down."""
        try:
            return self.link.call(self.shared.signature)
        except Unreachable:
            return ("file", self.local.signature())

    def load(self) -> R | None:
        """The server's record (putting the host's copy back if the server lost it), else the file's.

        Raises:
            CorruptRecordError: the record cannot be used (and the host has no copy to put back).
            StoreError: the host's file cannot be read.
        """
        copy = None
        with contextlib.suppress(CorruptRecordError):
            copy = self.local.load()
        try:
            try:
                record = self.link.call(self.shared.load)
            except CorruptRecordError:
                if copy is None:
                    raise
                record = None
            if copy is not None and (record is None or copy.expires_at > record.expires_at):
                record = self.link.call(self.shared.put_back, copy)
                if record is None:  # deleted on another host: drop this host's copy too
                    self.local.delete()
                elif record == copy:
                    _log.info("put this host's copy of the token back into the token store %s",
                              self.link.url)
        except Unreachable:
            return self.local.load()
        if record is not None and record != copy:
            self.local.save(record)
        return record

    def save(self, record: R) -> None:
        """Store ``record`` on the server (if it answers) and in the host's file."""
        with contextlib.suppress(Unreachable):
            self.link.call(self.shared.save, record)
        self.local.save(record)

    def ready(self) -> None:
        """Raise unless the host's file can be written (it is the copy the host falls back on).

        Raises:
            StoreError: see :meth:`file_store.FileRecordStore.ready`.
        """
        self.local.ready()

    def problem(self) -> str | None:
        """What :meth:`ready` would raise (one line), or None."""
        return self.local.problem()

    def delete(self) -> list[str]:
        """Delete the host's file and the record on the server.

        Raises:
            StoreError: the server did not answer: its copy would come back once it does, so the
                caller must say so (and run the deletion again then).
        """
        removed = self.local.delete()
        try:
            return self.link.call(self.shared.delete) + removed
        except Unreachable:
            raise StoreError(
                f"removed this host's copy, but the token store {self.link.url} did not answer, and "
                "its copy would come back: run the command again once it answers"
            ) from None


class SharedRenewalLock:
    """The host's file lock, then the server's lease: processes of one host queue on the file lock,
    hosts on the lease. While the server is down only the file lock is held (a warning says so)."""

    def __init__(self, link: StoreLink, shared: RedisRenewalLock, local: file_store.FileRenewalLock) -> None:
        self.link, self.shared, self.local = link, shared, local
        self.location = local.location
        self._leased = threading.local()  # .on: this thread's hold took the server's lease

    @contextlib.contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        """Hold both locks, waiting at most ``timeout`` seconds in all (0: one try of each).

        Raises:
            LockTimeoutError: either was held by another owner all that time.
            StoreError: the file lock cannot be taken.
        """
        deadline = time.monotonic() + timeout
        outer = getattr(self._leased, "on", False)
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.local.hold(timeout))
            remaining = 0.0 if timeout <= 0 else max(0.0, deadline - time.monotonic())
            try:
                self.link.call(stack.enter_context, self.shared.hold(remaining))
                leased = True
            except Unreachable:
                _log.warning("token store %s unreachable: holding only this host's lock %s",
                             self.link.url, self.local.location)
                leased = False
            self._leased.on = leased
            try:
                yield
            finally:
                self._leased.on = outer

    def confirm(self) -> None:
        """Raise unless this thread still holds the host's lock and, if it took it, the server's lease
        (which gets its whole lease again). Held while the server was unreachable, only the file
        lock is checked.

        Raises:
            LockTimeoutError: either is no longer ours.
            StoreError: the lease cannot be checked (the server stopped answering).
        """
        self.local.confirm()
        if not getattr(self._leased, "on", False):
            return
        try:
            self.link.call(self.shared.confirm)
        except Unreachable:
            raise StoreError(
                f"cannot confirm the lease on {self.shared.name}: the token store {self.link.url} "
                "stopped answering"
            ) from None


class SharedStateStore:
    """The key's renewal memory on the server, copied to (and, when the server has none or is down,
    read from) the host's file, so the one-a-minute rule holds across a restart of the server."""

    def __init__(self, link: StoreLink, shared: RedisStateStore, local: file_store.FileStateStore) -> None:
        self.link, self.shared, self.local = link, shared, local
        self.location = local.location

    def load(self) -> RenewalState:
        """The server's state or the host's, whichever saw the later request; an unusable copy never
        wipes the usable one's memory, but marks it ``unreadable`` (the engine then counts a request
        as made just now: the unusable copy may have known of one).

        Raises:
            CorruptRecordError: neither can be used.
        """
        found: list[RenewalState] = []
        problems: list[CorruptRecordError] = []
        for read in (lambda: self.link.call(self.shared.stored), self.local.load):
            try:
                state = read()
            except Unreachable:
                continue
            except CorruptRecordError as exc:
                problems.append(exc)
                continue
            if state is not None:
                found.append(state)
        if not found and problems:
            raise problems[0]
        state = max(found, key=lambda state: state.last_request_at or 0.0, default=RenewalState())
        state.unreadable = bool(problems)  # the other copy may know of a request this one does not
        return state

    def save(self, state: RenewalState) -> None:
        """Store the state on the server (if it answers) and in the host's file."""
        with contextlib.suppress(Unreachable):
            self.link.call(self.shared.save, state)
        self.local.save(state)


def shared_key_store(url: str, directory: Path, key_id: str, kind: str = "token", *, lease: float = LEASE,
                     retry_interval: float = RETRY_INTERVAL) -> KeyStore[Any]:
    """One key's store of ``kind`` on the server at ``url``, with the host's files in ``directory``.

    Args:
        url: the server (``KIS_TOKEN_STORE``).
        directory: the host's token directory (``KIS_TOKEN_DIR``).
        key_id: :attr:`Credential.key_id` of the key.
        kind: ``token`` or ``approval``.
        lease: how long the renewal lock outlives a holder that died (tests pass a short one).
        retry_interval: how long the server rests after a failed call.
    """
    server = link(url, retry_interval)
    files = file_store.key_store(directory, key_id, kind)
    names = key_names(key_id, kind)
    where = {piece: f"{server.url} {name}" for piece, name in names.items()}
    record = RedisRecordStore(server.client, names["record"], *_codec(kind), where["record"])
    return KeyStore(
        SharedRecordStore(server, record, files.record),
        SharedRenewalLock(server, RedisRenewalLock(server.client, names["lock"], lease, where["lock"]),
                          files.lock),
        SharedStateStore(server, RedisStateStore(server.client, names["state"], where["state"]), files.state),
    )


def _codec(kind: str) -> tuple[Callable[[str], Any], Callable[[Any], str]]:
    if kind == "approval":
        from common.credentials.approval_kind import ApprovalRecord

        return ApprovalRecord.from_json, ApprovalRecord.to_json
    return TokenRecord.from_json, TokenRecord.to_json


def describe(store: KeyStore[Any]) -> dict[str, Any]:
    """What ``check`` shows of a shared store: ``kind``, ``url`` (password masked), ``reachable``,
    ``misconfigured`` (it answers but refuses our password, user or database), ``error`` (why not)
    and ``prefix`` (of the key's names on the server)."""
    record = store.record
    server: StoreLink = record.link  # type: ignore[attr-defined]
    reachable = not server.down and server.ping()
    error = None if reachable else server.error
    return {
        "kind": "redis",
        "url": server.url,
        "reachable": reachable,
        "misconfigured": error is not None and error.startswith(MISCONFIGURED),
        "error": error,
        "prefix": record.shared.name.rsplit(":", 1)[0] + ":",  # type: ignore[attr-defined]
    }
