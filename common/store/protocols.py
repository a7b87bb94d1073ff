"""What the renewal engine needs from a place that keeps a credential: three small pieces.

* a :class:`RecordStore` holds the key's current record (token or approval key);
* a :class:`RenewalLock` lets one renewal at a time run for the key, across processes (and hosts);
* a :class:`StateStore` holds the key's :class:`RenewalState`: the one-a-minute memory, the last
  outcome, counters and alert stamps.

They are bundled per key in a :class:`KeyStore`. ``common.store.file_store`` implements them on files in
the token directory; a network store (Redis) implements the same protocols. Everything is per
(environment, broker, app key) -- see ``common.credentials.identity`` -- never per market.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Generic, NamedTuple, Protocol, TypeGuard, TypeVar

from common.clock import EARLIEST, LATEST
from common.errors import CorruptRecordError

R = TypeVar("R")

_STATE_DEFAULTS: dict[str, Any] = {
    "last_request_at": None,
    "last_outcome": None,
    "last_outcome_at": None,
    "last_code": None,
    "last_message": None,
    "last_success_at": None,
    "renewals": 0,
    "refusals": {},
    "failures": 0,
    "alerts_sent": {},
    "legacy_closed": False,
    "issuances": [],
    "removed_at": None,
    "removed_by": None,
}
#: Issuances remembered for the daily budget: the last 24 h, at most this many.
MAX_ISSUANCES = 1000


class RenewalState:
    """What every process (and host) remembers about one key's credential requests.

    Attributes:
        last_request_at: when a token request was last sent (epoch), to keep to one a minute.
        last_outcome: ``renewed``, ``same_token``, ``refused`` or ``failed``.
        last_outcome_at: when that outcome happened.
        last_code: the broker's code for a refusal (``EGW00133``), else None.
        last_message: the broker's or the transport's message for a failure, else None.
        last_success_at: when a token was last obtained.
        renewals: tokens obtained (new or same) since the state was created.
        refusals: refusals counted by broker code (``LOCAL`` when this host held back).
        failures: requests that failed without a broker code (network, 5xx, garbage).
        alerts_sent: cause -> epoch of the last alert sent for it.
        legacy_closed: a record left by version 0.1 was taken up, or the key's token deleted: such
            left-over files are never taken up again (a deleted token must not come back).
        issuances: when the broker issued (or may have issued) a new credential, for the daily
            budget (the last 24 h; broker time).
        removed_at: when the key's credential was last deleted or revoked (None: never).
        removed_by: ``deleted`` or ``revoked`` (None: never).

    Every time is in the broker's time (``common.clock.BrokerClock``). A state that cannot be
    parsed, or whose times are not finite or out of range, is refused whole
    (:class:`CorruptRecordError`): the engine then counts it as "a request may just have been made".
    """

    last_request_at: float | None
    last_outcome: str | None
    last_outcome_at: float | None
    last_code: str | None
    last_message: str | None
    last_success_at: float | None
    renewals: int
    refusals: dict[str, int]
    failures: int
    alerts_sent: dict[str, float]
    legacy_closed: bool
    issuances: list[float]
    removed_at: float | None
    removed_by: str | None
    #: True for the stand-in the engine builds when the stored state could not be read (not stored).
    unreadable: bool = False

    def __init__(self, **values: Any) -> None:
        for name, default in _STATE_DEFAULTS.items():
            value = values.get(name, default)
            setattr(self, name, type(value)(value) if isinstance(value, (dict, list)) else value)

    def to_dict(self) -> dict[str, Any]:
        """The state as a JSON-ready dict."""
        data = {name: getattr(self, name) for name in _STATE_DEFAULTS}
        data["issuances"] = self.issuances[-MAX_ISSUANCES:]  # never more than a reader accepts
        return data

    @classmethod
    def from_json(cls, text: str) -> RenewalState:
        """Parse the state file; raise :class:`CorruptRecordError` if it is not usable."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise CorruptRecordError("not valid JSON") from None
        if not isinstance(data, dict):
            raise CorruptRecordError("expected a JSON object")
        for name, default in _STATE_DEFAULTS.items():
            if name in data and not _same_kind(data[name], default, name):
                raise CorruptRecordError(f"field {name!r} has the wrong type or an impossible value")
        return cls(**data)

    def recent_issuances(self, now: float, window: float = 86400.0) -> list[float]:
        """The issuances within ``window`` seconds of ``now`` (one stamped ahead by a clock that ran
        ahead still counts: the budget errs on the safe side)."""
        return [at for at in self.issuances if now - window < at <= now + window]


def _same_kind(value: object, default: object, name: str) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if name.endswith("_at"):
        return value is None or _is_time(value)
    if name in ("last_outcome", "last_code", "last_message", "removed_by"):
        return value is None or isinstance(value, str)
    if name == "issuances":
        return isinstance(value, list) and len(value) <= MAX_ISSUANCES and all(map(_is_time, value))
    if name == "alerts_sent":
        return isinstance(value, dict) and all(_is_time(v) for v in value.values())
    if isinstance(default, dict):  # counters by code: finite numbers only
        return isinstance(value, dict) and all(_is_count(v) for v in value.values())
    return _is_count(value)


def _is_count(value: object) -> TypeGuard[float]:
    """A finite, non-negative number (NaN and the infinities fail every comparison)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e15


def _is_time(value: object) -> bool:
    return _is_count(value) and EARLIEST <= value <= LATEST


class RecordStore(Protocol[R]):
    """Holds one key's current record."""

    location: str

    def signature(self) -> object:
        """A cheap value that changes whenever the stored record changes (no full read)."""

    def load(self) -> R | None:
        """The stored record, or None if there is none.

        Raises:
            CorruptRecordError: a record is there but cannot be used.
            StoreError: it cannot be read (permissions), or the store cannot be reached.
        """

    def save(self, record: R) -> None:
        """Store ``record`` atomically, replacing the previous one."""

    def delete(self) -> list[str]:
        """Remove the stored record; return what was removed."""

    def ready(self) -> None:
        """Raise unless a record could be written now; called under the lock right before a request
        is sent, so that a token the broker issues is never one that cannot be stored.

        Raises:
            StoreError: one line naming the path and what is wrong (``…/key-real-x.json is a
                directory, not a file: remove it``).
        """

    def problem(self) -> str | None:
        """What :meth:`ready` would raise, as one line (None: nothing is wrong), for ``check``."""


class RenewalLock(Protocol):
    """The key's renewal lock, shared by every process that may renew it."""

    location: str

    def hold(self, timeout: float) -> contextlib.AbstractContextManager[None]:
        """Hold the lock; wait at most ``timeout`` seconds (0: one try).

        Raises:
            LockTimeoutError: not acquired in time.
            StoreError: the lock cannot be taken at all.
        """

    def confirm(self) -> None:
        """Raise unless the lock this thread holds is still its own; called right before a request
        is sent (a lease may have lapsed while its holder was stopped, and another taken it).

        Raises:
            LockTimeoutError: not held by this thread, or no longer ours.
            StoreError: ownership cannot be checked (the store stopped answering).
        """


class StateStore(Protocol):
    """The key's shared renewal memory."""

    location: str

    def load(self) -> RenewalState:
        """The state; a missing one is fresh (raises :class:`CorruptRecordError` if unusable)."""

    def save(self, state: RenewalState) -> None:
        """Store the state atomically."""


class KeyStore(NamedTuple, Generic[R]):
    """The three pieces of one key's store, and which backend holds them (``file`` or ``redis``)."""

    record: RecordStore[R]
    lock: RenewalLock
    state: StateStore
    backend: str = "file"
