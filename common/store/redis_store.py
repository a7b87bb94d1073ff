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
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic

from common.credentials.records import RECORD_TYPES
from common.errors import CorruptRecordError, StoreError, StoreUnreachableError
from common.store import file_store
from common.store.protocols import KeyStore, RenewalState
from common.store.redis_link import MISCONFIGURED, RETRY_INTERVAL, StoreLink, key_names, link
from common.store.redis_pieces import R, RedisRecordStore, RedisRenewalLock, RedisStateStore

__all__ = ["RETRY_INTERVAL", "RedisRecordStore", "describe", "key_names", "link", "shared_key_store"]

_log = logging.getLogger(__name__)



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
        except StoreUnreachableError:
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
        except StoreUnreachableError:
            return self.local.load()
        if record is not None and record != copy:
            self.local.save(record)
        return record

    def save(self, record: R) -> None:
        """Store ``record`` on the server (if it answers) and in the host's file."""
        with contextlib.suppress(StoreUnreachableError):
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
        except StoreUnreachableError:
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
            except StoreUnreachableError:
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
        except StoreUnreachableError:
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
            except StoreUnreachableError:
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
        with contextlib.suppress(StoreUnreachableError):
            self.link.call(self.shared.save, state)
        self.local.save(state)


def shared_key_store(url: str, directory: Path, key_id: str, kind: str = "token", *, lease: float,
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
    codec = RECORD_TYPES[kind]
    record = RedisRecordStore(server.client, names["record"], codec.from_json, codec.to_json, where["record"])
    return KeyStore(
        SharedRecordStore(server, record, files.record),
        SharedRenewalLock(server, RedisRenewalLock(server.client, names["lock"], lease, where["lock"]),
                          files.lock),
        SharedStateStore(server, RedisStateStore(server.client, names["state"], where["state"]), files.state),
        "redis",
    )


def describe(store: KeyStore[Any]) -> dict[str, Any]:
    """What ``check`` shows of a shared store: ``kind``, ``url`` (password masked), ``reachable``,
    ``misconfigured`` (it answers but refuses our password, user or database), ``error`` (why not)
    and ``prefix`` (of the key's names on the server)."""
    record = store.record
    if not isinstance(record, SharedRecordStore):
        raise TypeError(f"not a shared store: {type(record).__name__}")
    server: StoreLink = record.link
    reachable = not server.down and server.ping()
    error = None if reachable else server.error
    return {
        "kind": "redis",
        "url": server.url,
        "reachable": reachable,
        "misconfigured": error is not None and error.startswith(MISCONFIGURED),
        "error": error,
        "prefix": record.shared.name.rsplit(":", 1)[0] + ":",
    }
