"""Copies of a key's record kept outside its store, as the renewal sees them: a market's story files
(published after each record this process takes up), their intact copy (served when the stored
record cannot be used) and the files version 0.1 left (adopted once, when the store has none).

What the files hold and where they lie is ``common.store.mirror``; this module decides when they are
written, read and adopted, under the key's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from common.errors import CorruptRecordError, KISTokenError, LockTimeoutError, StoreError
from common.renewal.policy import Expiring, Windows, usable
from common.store.protocols import KeyStore, RenewalState

R = TypeVar("R", bound=Expiring)
_log = logging.getLogger(__name__)


class Copies(Protocol[R]):
    """Where copies of the key's record are kept (a market's story files)."""

    def holds(self, record: R) -> bool:
        """True if the copies already show ``record`` (cheap: no lock, no write)."""

    def write(self, record: R) -> None:
        """Bring the copies up to date with ``record`` (called under the key's lock)."""

    def copy(self) -> R | None:
        """The intact copy of the key's record, or None."""

    def legacy(self) -> R | None:
        """The record an older version left, or None."""


@dataclass
class CopyKeeper(Generic[R]):
    """Keeps one key's copies in step with the record the engine serves.

    Args:
        name: what the credential is called in messages.
        store: the key's store.
        copies: the copies.
        windows: the renewal windows (a copy is used only while usable).
        clock: the broker's time.
        accept: says why a record is not this key's (None: it is).
        load_state: the key's renewal state, as the engine reads it.
    """

    name: str
    store: KeyStore[R]
    copies: Copies[R]
    windows: Windows
    clock: Callable[[], float]
    accept: Callable[[R], str | None]
    load_state: Callable[[], RenewalState]
    #: True while the copies may be behind the record served (published at the next sync).
    pending: bool = False

    def publish(self, record: R, locked: bool) -> None:
        """Bring the copies up to date with ``record``, under the key's lock so none goes stale.

        Without the lock already held, only copies that are behind cost a lock try (``check`` stays
        free of the lock's import); a busy lock leaves it for the next sync.
        """
        try:
            if not self.copies.holds(record):
                if locked:
                    self.copies.write(record)
                else:
                    with self.store.lock.hold(0):
                        if self.store.record.load() != record:
                            return  # already replaced: the next sync publishes the newer one
                        self.copies.write(record)
        except LockTimeoutError:
            return  # the holder may be renewing; try again at the next sync
        except (KISTokenError, CorruptRecordError) as exc:
            _log.warning("cannot update the %s mirrors: %s", self.name, exc)
        self.pending = False

    def intact_copy(self, held: R | None) -> R | None:
        """The record's intact copy, if it is this key's, usable, and newer than ``held`` (it is
        served, never written back: the next renewal replaces the unusable record)."""
        try:
            copy = self.copies.copy()
        except (KISTokenError, CorruptRecordError):
            return None
        if copy is None or self.accept(copy) is not None:
            return None
        if held is not None and held.expires_at >= copy.expires_at:
            return None
        if not usable(copy, self.clock(), self.windows):
            return None
        _log.info("serving the %s from its intact copy", self.name)
        return copy

    def adopt_legacy(self, locked: bool) -> R | None:
        """Take up a record an older version left, writing it as the key's record under the lock.

        Once one was taken up, or the key's token deleted, left-over files are never looked at again.
        """
        if self.load_state().legacy_closed:
            return None
        try:
            record = self.copies.legacy()
        except (CorruptRecordError, StoreError) as exc:
            _log.warning("ignoring the stored %s: %s", self.name, exc)
            return None
        if record is None or not usable(record, self.clock(), self.windows):
            return None
        try:
            with self.store.lock.hold(self.windows.lock_wait if locked else 0):
                state = self.load_state()
                if state.legacy_closed:
                    return None
                if self.store.record.load() is None:
                    self.store.record.save(record)
                    _log.info("adopted the %s left by an older version", self.name)
                state.legacy_closed = True
                self.store.state.save(state)
        except (KISTokenError, CorruptRecordError):
            pass  # another process is on it; serve what we read
        return record
