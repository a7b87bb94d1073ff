"""The renewal engine: one key's credential in this process, for any credential kind.

It keeps the credential in memory (served lock-free while fresh; the store's cheap signature looked
at once per ``sync_interval``), asks :func:`common.policy.decide` what to do, and runs the locked
transaction: take the key's lock, re-read the store (another process may have renewed), keep to one
request a minute, ask the broker through the kind's ``issue`` function, write, publish. Outcomes go
to observers (bookkeeping, alerts); the engine knows nothing of markets, files or webhooks.

Within a process one thread renews while the others keep serving a usable credential. After a failed
attempt the engine backs off in memory, so a refusal costs nothing per call.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

from common.errors import (
    BrokerError,
    ConfigError,
    KISTokenError,
    LockTimeoutError,
    RequestHeldBackError,
    StoreError,
    TokenUnavailableError,
)
from common.policy import NO_BACKOFF, Action, Backoff, Expiring, Windows, decide, serve_until
from common.record import CorruptRecordError
from common.store import KeyStore, RenewalState

R = TypeVar("R", bound=Expiring)
R_contra = TypeVar("R_contra", contravariant=True)
_NEVER = float("-inf")
_log = logging.getLogger(__name__)


class Outcome(NamedTuple):
    """What one credential request came to.

    Attributes:
        kind: ``renewed``, ``same_token`` (the broker re-sent the one held), ``refused`` (a broker
            code), ``failed`` (network, 5xx, garbage) or ``held_back`` (not sent: one a minute).
        at: epoch seconds.
        code: the broker's code for a refusal, ``LOCAL`` when held back, else None.
        message: the broker's or the transport's message, if any.
        seconds_left: time left on the credential held when it happened (None: none held).
    """

    kind: str
    at: float
    code: str | None = None
    message: str | None = None
    seconds_left: float | None = None


#: Observers see every outcome with the key's shared state, which they may update (it is saved after).
Observer = Callable[[Outcome, RenewalState], None]


class Mirror(Protocol[R_contra]):
    """Copies of the key's record kept elsewhere (a market's story files)."""

    def holds(self, record: R_contra) -> bool:
        """True if the copies already show ``record`` (cheap: no lock, no write)."""

    def write(self, record: R_contra) -> None:
        """Bring the copies up to date with ``record`` (called under the key's lock)."""


class RenewalEngine(Generic[R]):
    """Keeps one key's credential valid in this process.

    Args:
        name: what the credential is called in messages (``us token``).
        store: the key's record, lock and state.
        issue: asks the broker for a new credential, given the one held (or None); raises a
            :class:`KISTokenError` on failure.
        accept: says why a stored record does not belong to this key (or None if it does).
        windows: the renewal windows.
        clock: epoch seconds.
        observers: called with each :class:`Outcome`.
        mirror: copies of the record to keep up to date with each record this process takes up.
        legacy: returns a record left by an older version, to adopt when the store has none.
    """

    def __init__(
        self,
        *,
        name: str,
        store: KeyStore[R],
        issue: Callable[[R | None], R],
        accept: Callable[[R], str | None],
        windows: Windows,
        clock: Callable[[], float],
        observers: Sequence[Observer] = (),
        mirror: Mirror[R] | None = None,
        legacy: Callable[[], R | None] | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.windows = windows
        self.backoff = NO_BACKOFF
        self._issue = issue
        self._accept = accept
        self._clock = clock
        self._observers = tuple(observers)
        self._mirror = mirror
        self._legacy = legacy
        self._mutex = threading.RLock()
        # (record, serve-from-memory-until, set-at): swapped whole, read lock-free. Serving needs
        # set-at <= now < until, so a clock stepped back never extends it.
        self.snapshot: tuple[R | None, float, float] = (None, _NEVER, _NEVER)
        self._signature: object = object()
        self._mirror_pending = False

    # -- serving ----------------------------------------------------------------------------------

    def serve(self) -> R:
        """A usable credential, renewing first if :func:`decide` says so.

        Raises:
            TokenUnavailableError: none is usable and none could be obtained.
            ConfigError: the credential is not configured.
        """
        record, until, since = self.snapshot
        now = self._clock()
        if record is not None and since <= now < until:
            return record
        if not self._mutex.acquire(blocking=False):
            # Another thread is syncing or renewing: keep serving a credential that is still usable.
            if record is not None and record.seconds_left(now) > self.windows.expiry_margin:
                return record
            if not self._mutex.acquire(timeout=self.windows.lock_wait + 30.0):
                raise TokenUnavailableError(f"no valid {self.name}: another thread's renewal hangs")
        try:
            return self._ensure()
        finally:
            self._mutex.release()

    def current(self) -> R | None:
        """The credential as the store has it now (synced; no renewal)."""
        with self._mutex:
            self._sync()
            return self.snapshot[0]

    def due(self, record: R | None, now: float) -> bool:
        """True if ``record`` should be renewed now (ignoring any back-off)."""
        return decide(record, now, NO_BACKOFF, self.windows).action is not Action.SERVE

    def _ensure(self) -> R:
        self._sync()
        now = self._clock()
        record = self.snapshot[0]
        decision = decide(record, now, self.backoff, self.windows)
        if decision.action is Action.SERVE:
            return record  # type: ignore[return-value]
        if decision.action is Action.FAIL:
            raise TokenUnavailableError(f"no valid {self.name}: {self.backoff.error}")
        try:
            return self.renew(decision.lock_wait, self.due)
        except ConfigError:
            raise
        except KISTokenError as exc:
            now = self._clock()
            current = self.snapshot[0]
            if isinstance(exc, RequestHeldBackError):
                pause = exc.retry_in
            elif isinstance(exc, LockTimeoutError):
                pause = self.windows.mandatory_lock_wait
            else:
                pause = self.windows.min_request_interval
            self.backoff = Backoff(now, now + pause, exc)
            if current is not None and current.seconds_left(now) > self.windows.expiry_margin:
                self._log_kept(current, exc, now)
                self._set(current, now)
                return current
            raise TokenUnavailableError(f"no valid {self.name}: {exc}") from exc

    def _log_kept(self, current: R, exc: KISTokenError, now: float) -> None:
        from common.clock import format_duration

        if isinstance(exc, LockTimeoutError):
            _log.debug("another process is renewing the %s; serving the current one", self.name)
            return
        left = current.seconds_left(now)
        _log.log(
            logging.ERROR if left <= self.windows.mandatory else logging.WARNING,
            "%s renewal failed (%s); keeping the current %s, valid for %s more",
            self.name, exc, self.name, format_duration(left),
        )

    # -- the locked transaction ---------------------------------------------------------------------

    def renew(self, lock_wait: float, needed: Callable[[R | None, float], bool]) -> R:
        """Under the key's lock: re-read, then ask the broker only if still ``needed``.

        Raises:
            RequestHeldBackError: a request for this key was sent less than a minute ago.
            LockTimeoutError: the lock was not had within ``lock_wait``.
            KISTokenError: the broker refused or could not be reached (the held credential is kept).
        """
        with self.hold(lock_wait):
            self._sync(force=True, locked=True)
            current = self.snapshot[0]
            now = self._clock()
            if not needed(current, now):
                _log.debug("another process renewed the %s meanwhile", self.name)
                return current  # type: ignore[return-value]
            state = self.load_state()
            left = None if current is None else current.seconds_left(now)
            self._hold_back_if_too_soon(state, now, left)
            state.last_request_at = now
            self.store.state.save(state)
            try:
                record = self._issue(current)
            except BrokerError as exc:
                self._observe(state, Outcome("refused", self._clock(), exc.code, exc.broker_message, left))
                raise
            except KISTokenError as exc:
                self._observe(state, Outcome("failed", self._clock(), None, str(exc), left))
                raise
            try:
                record = self.put(record, locked=True)
            except StoreError as exc:  # the broker issued it (and texted the user): never drop it
                _log.error("cannot store the new %s (%s); serving it from memory", self.name, exc)
                self._set(record, self._clock())
            same = current is not None and record == current
            self.backoff = NO_BACKOFF
            kind = "same_token" if same else "renewed"
            self._observe(state, Outcome(kind, self._clock(), seconds_left=left))
            return record

    @contextlib.contextmanager
    def hold(self, lock_wait: float) -> Iterator[None]:
        """Hold this process's mutex and the key's lock, in the order every renewal takes them."""
        with self._mutex, self.store.lock.hold(lock_wait):
            yield

    def _hold_back_if_too_soon(self, state: RenewalState, now: float, left: float | None) -> None:
        """Refuse to send a request within ``min_request_interval`` of the key's last one.

        A last request "in the future" means the clock stepped back: how long ago it really was is
        unknown, so the request is held back for one interval from now (and the memory re-stamped).
        """
        last = state.last_request_at
        interval = self.windows.min_request_interval
        if last is None or now - last >= interval:
            return
        if now < last:
            state.last_request_at = last = now
            ago = "just now (the clock stepped back)"
        else:
            ago = f"{now - last:.0f} s ago"
        retry_in = last + interval - now
        message = (
            f"a {self.name} was requested {ago} for this app key; the broker allows one a minute "
            f"(next request possible in {retry_in:.0f} s)"
        )
        self._observe(state, Outcome("held_back", now, "LOCAL", message, left))
        raise RequestHeldBackError(message, retry_in)

    def _observe(self, state: RenewalState, outcome: Outcome) -> None:
        for observer in self._observers:
            try:
                observer(outcome, state)
            except Exception as exc:  # an observer must never stop the credential from being served
                _log.warning("%s outcome observer failed: %s", self.name, type(exc).__name__)
        self.store.state.save(state)

    def load_state(self) -> RenewalState:
        """The key's shared renewal memory; an unusable one counts as empty (warning logged)."""
        try:
            return self.store.state.load()
        except CorruptRecordError as exc:
            _log.warning("ignoring the %s renewal state: %s", self.name, exc)
            return RenewalState()

    # -- store and memory ---------------------------------------------------------------------------

    def put(self, record: R, locked: bool = False) -> R:
        """Store ``record`` and serve it from memory from now on; return it as stored (a store may
        keep times to the second, and what is served must equal what other processes read)."""
        self.store.record.save(record)
        self._signature = self.store.record.signature()
        with contextlib.suppress(CorruptRecordError):
            record = self.store.record.load() or record
        self._set(record, self._clock())
        self._publish(record, locked)
        return record

    def forget(self) -> list[str]:
        """Remove the stored record and the one in memory; return what was removed.

        Files an older version left are closed too, so that the deleted token never comes back.
        """
        with self.hold(self.windows.lock_wait):
            try:
                return self.store.record.delete()
            finally:  # also when a shared store did not take the deletion: this host forgets it
                self._signature = None
                self._set(None, self._clock())
                state = self.load_state()
                if not state.legacy_closed:
                    state.legacy_closed = True
                    self.store.state.save(state)

    def _sync(self, force: bool = False, locked: bool = False) -> None:
        """Reload the record if the store changed since it was last read.

        A stored record that cannot be used (corrupt, of another environment or key) or read does
        not replace a usable one held in memory: that one keeps being served until it is renewed. A
        record that was removed (``delete``, ``revoke``) is dropped.
        """
        now = self._clock()
        current = self.snapshot[0]
        signature = self.store.record.signature()
        if force or signature != self._signature:
            held = current is not None and current.seconds_left(now) > self.windows.expiry_margin
            try:
                record, stored = self._load(locked)
            except StoreError as exc:
                if not held:
                    raise  # (the signature stays unknown: the next call reads again)
                _log.warning("%s; serving the %s held in memory", exc, self.name)
                record, stored = None, True
            self._signature = signature
            if record is None and stored and held:
                record = current
            if record is not None and record != current:
                self._mirror_pending = True
            current = record
        self._set(current, now)
        if self._mirror_pending and current is not None:
            self._publish(current, locked)

    def _load(self, locked: bool) -> tuple[R | None, bool]:
        """The usable stored record (or None), and whether anything was stored at all."""
        try:
            record = self.store.record.load()
        except CorruptRecordError as exc:
            _log.warning("ignoring the stored %s: %s", self.name, exc)
            return None, True
        if record is None:
            return self._adopt_legacy(locked), False
        reason = self._accept(record)
        if reason is not None:
            _log.warning("ignoring the stored %s: %s", self.name, reason)
            return None, True
        return record, True

    def _adopt_legacy(self, locked: bool) -> R | None:
        """Take up a record an older version left, writing it as the key's record under the lock.

        Once one was taken up, or the key's token deleted, left-over files are never looked at again.
        """
        if self._legacy is None or self.load_state().legacy_closed:
            return None
        try:
            record = self._legacy()
        except (CorruptRecordError, StoreError) as exc:
            _log.warning("ignoring the stored %s: %s", self.name, exc)
            return None
        if record is None or record.seconds_left(self._clock()) <= self.windows.expiry_margin:
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

    def _publish(self, record: R, locked: bool) -> None:
        """Bring the mirrors up to date with ``record``, under the key's lock so none goes stale.

        Without the lock already held, only a mirror that is behind costs a lock try (``check``
        stays free of the lock's import); a busy lock leaves it for the next sync.
        """
        if self._mirror is None:
            return
        try:
            if not self._mirror.holds(record):
                if locked:
                    self._mirror.write(record)
                else:
                    with self.store.lock.hold(0):
                        if self.store.record.load() != record:
                            return  # already replaced: the next sync publishes the newer one
                        self._mirror.write(record)
        except LockTimeoutError:
            return  # the holder may be renewing; try again at the next sync
        except (KISTokenError, CorruptRecordError) as exc:
            _log.warning("cannot update the %s mirrors: %s", self.name, exc)
        self._mirror_pending = False

    def _set(self, record: R | None, now: float) -> None:
        until = _NEVER if record is None else serve_until(record, now, self.backoff, self.windows)
        self.snapshot = (record, until, now)
