"""The process's connection to a Redis/Valkey token store, and whether the server answers.

One client per server URL, shared by every key and piece in the process. Each call gives up after
:data:`SOCKET_TIMEOUT`; a failed call marks the server down for a while, during which the host
runs on its own files (``common.store.redis_store``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from common.errors import ConfigError, StoreUnreachableError
from common.settings import TOKEN_STORE_VAR, mask_url

PREFIX = "kis-token:v1:"
#: Each call to the server gives up after this long (connect, and each answer).
SOCKET_TIMEOUT = 0.5
#: After a call failed, the server is not asked again for this long (the host runs on its files).
RETRY_INTERVAL = 5.0
#: Errors that say the server answers but refuses this configuration (password, user, database).
MISCONFIGURED = ("AuthenticationError", "AuthenticationWrongNumberOfArgsError", "AuthorizationError",
                 "NoPermissionError", "ResponseError")

_log = logging.getLogger(__name__)


def key_name(key_id: str, piece: str) -> str:
    """The server's name of one piece kept for an app key: ``kis-token:v1:<id>:<piece>``."""
    return f"{PREFIX}{key_id}:{piece}"


def key_names(key_id: str, kind: str = "token") -> dict[str, str]:
    """The server's key names for one app key's credential of ``kind``: ``record``, ``lock``, ``state``."""
    stem = "" if kind == "token" else f"{kind}:"
    return {piece: key_name(key_id, stem + piece) for piece in ("record", "lock", "state")}



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
            StoreUnreachableError: the server is resting after a failure, or this call failed.
        """
        if self.down:
            raise StoreUnreachableError(self.error)
        try:
            result = function(*args)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            raise StoreUnreachableError(self.error) from None
        if self.error is not None:
            _log.warning("token store %s answers again", self.url)
            self.error = None
        return result

    def call_anyway(self, function: Callable[..., Any], *args: Any) -> Any:
        """:meth:`call`, sent even while the server rests after a failure (a call that must not be
        skipped for that long, such as a session lease's heartbeat); an answer ends the rest.

        Raises:
            StoreUnreachableError: this call failed.
        """
        self._retry_at = float("-inf")
        return self.call(function, *args)

    def ping(self) -> bool:
        """True if the server answers now (a failure starts an outage, as any call's does)."""
        try:
            return bool(self.call(self.client.ping))
        except StoreUnreachableError:
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
