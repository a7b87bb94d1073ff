"""The renewal engine: one key's credential in this process, for any credential kind.

It keeps the credential in memory (served lock-free while fresh; the store's cheap signature looked
at once per ``sync_interval``), asks :func:`common.renewal.policy.decide` what to do, and runs the locked
transaction: take the key's lock, re-read the store (another process may have renewed), keep to one
request a minute, ask the broker through the kind's ``issue`` function, write, publish. Outcomes go
to observers (bookkeeping, alerts); the engine knows nothing of markets, files or webhooks.

Within a process one thread renews while the others keep serving a usable credential. After a failed
attempt the engine backs off in memory, so a refusal costs nothing per call.

Nothing it reads is trusted blindly: a renewal state that is corrupt, not finite, out of range or in
the broker's future counts as "a request may just have been made" (the one-a-minute memory errs on
the safe side); a daily budget of issuances per key bounds any runaway; whatever the ``issue``
function raises becomes a :class:`KISTokenError` that keeps the held credential in service; and
observers' slow work (an alert's webhook) runs only after the key's lock is released.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from common.clock import format_duration
from common.errors import (
    AnswerLostError,
    BadResponseError,
    BrokerError,
    ConfigError,
    CorruptRecordError,
    KISTokenError,
    LockTimeoutError,
    NotSentError,
    StoreError,
    TokenUnavailableError,
)
from common.renewal.copies import Copies, CopyKeeper
from common.renewal.outcomes import Observer, Outcome
from common.renewal.policy import (
    NO_BACKOFF,
    Action,
    Expiring,
    Windows,
    backoff_after,
    decide,
    serve_until,
    usable,
)
from common.renewal.request_guard import RequestGuard, read_state
from common.store.protocols import KeyStore, RenewalState

R = TypeVar("R", bound=Expiring)
_NEVER = float("-inf")
_log = logging.getLogger(__name__)


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
        observers: called with each :class:`~common.renewal.outcomes.Outcome`.
        copies: copies of the record kept elsewhere (a market's story files): kept up to date with
            each record this process takes up, their intact copy served when the stored record
            cannot be used, and an older version's record adopted when the store has none.
        daily_limit: at most this many issuances per key in 24 h (0: no limit).
        calibrate: reads the broker's clock into ``clock`` (True if it could); asked before a request
            when the key's last request seems to lie in the future.
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
        copies: Copies[R] | None = None,
        daily_limit: int = 0,
        calibrate: Callable[[], bool] | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.windows = windows
        self.backoff = NO_BACKOFF
        self._issue = issue
        self._accept = accept
        self._clock = clock
        self._local: Callable[[], float] = getattr(clock, "local", clock)
        self._observers = tuple(observers)
        self.guard = RequestGuard(name, windows, clock, daily_limit, calibrate)
        self._copies = None if copies is None else CopyKeeper(name, store, copies, windows, clock, accept,
                                                              self.load_state)
        self._warned: str | None = None
        self._mutex = threading.RLock()
        # (record, serve-from-memory-until, set-at), both in the local clock (what the broker's clock
        # reads less its offset; an offset learned later moves them by at most one sync interval):
        # swapped whole, read lock-free. Serving needs set-at <= now < until, so a clock stepped
        # back never extends it.
        self.snapshot: tuple[R | None, float, float] = (None, _NEVER, _NEVER)
        self._signature: object = object()

    # -- serving ----------------------------------------------------------------------------------

    def serve(self) -> R:
        """A usable credential, renewing first if :func:`decide` says so.

        Raises:
            TokenUnavailableError: none is usable and none could be obtained.
            ConfigError: the credential is not configured.
        """
        record = self.fresh()
        if record is not None:
            return record
        record = self.snapshot[0]
        if not self._mutex.acquire(blocking=False):
            # Another thread is syncing or renewing: keep serving a credential that is still usable.
            if record is not None and usable(record, self._clock(), self.windows):
                return record
            if not self._mutex.acquire(timeout=self.windows.lock_wait + 30.0):
                raise TokenUnavailableError(f"no valid {self.name}: another thread's renewal hangs")
        try:
            return self._ensure()
        finally:
            self._mutex.release()

    def fresh(self) -> R | None:
        """The credential held in memory while it may be served without a look at the store (the
        hot path: one clock read, no lock), else None."""
        record, until, since = self.snapshot
        return record if since <= self._local() < until else None

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
        if decision.action is Action.SERVE and record is not None:  # (SERVE implies one is held)
            return record
        if decision.action is Action.FAIL:
            raise TokenUnavailableError(f"no valid {self.name}: {self.backoff.error}")
        try:
            return self.renew(decision.lock_wait, self.due)
        except KISTokenError as exc:
            if isinstance(exc, ConfigError) and not isinstance(exc, StoreError):
                raise  # a token directory this user cannot use still leaves the held token in service
            self.back_off(exc)
            now = self._clock()
            current = self.snapshot[0]
            if current is not None and usable(current, now, self.windows):
                self._log_kept(current, exc, now)
                self._set(current, now)
                return current
            raise TokenUnavailableError(f"no valid {self.name}: {exc}") from exc

    def back_off(self, exc: KISTokenError) -> None:
        """After a failed attempt, ask nothing more for a while (this process only, in memory): the
        rest of the minute when held back, a few seconds when the lock was busy, else a minute
        (:func:`~common.renewal.policy.backoff_after`)."""
        retry_in, busy = getattr(exc, "retry_in", None), isinstance(exc, LockTimeoutError)
        self.backoff = backoff_after(exc, self._clock(), self.windows, retry_in=retry_in, lock_busy=busy)

    def _log_kept(self, current: R, exc: KISTokenError, now: float) -> None:
        if isinstance(exc, LockTimeoutError):
            _log.debug("another process is renewing the %s; serving the current one", self.name)
            return
        left = current.seconds_left(now)
        _log.log(logging.ERROR if left <= self.windows.mandatory else logging.WARNING,
                 "%s renewal failed (%s); keeping the current %s, valid for %s more",
                 self.name, exc, self.name, format_duration(left))

    # -- the locked transaction ---------------------------------------------------------------------

    def renew(self, lock_wait: float, needed: Callable[[R | None, float], bool]) -> R:
        """Under the key's lock: re-read, then ask the broker only if still ``needed``.

        Raises:
            RequestHeldBackError: a request for this key was sent less than a minute ago.
            DailyLimitError: the key's daily budget of issuances is spent.
            LockTimeoutError: the lock was not had within ``lock_wait``.
            StoreError: the record could not be stored (checked before anything is sent).
            KISTokenError: the broker refused or could not be reached (the held credential is kept).
        """
        after: list[Callable[[], object]] = []  # observers' slow work, run once the lock is released
        try:
            with self.hold(lock_wait):
                return self._renew_locked(needed, after)
        finally:
            for action in after:
                try:
                    action()
                except Exception as exc:  # an observer must never stop the credential from being served
                    _log.warning("%s outcome observer failed: %s", self.name, type(exc).__name__)

    def _renew_locked(
        self, needed: Callable[[R | None, float], bool], after: list[Callable[[], object]]
    ) -> R:
        self._sync(force=True, locked=True)
        current = self.snapshot[0]
        now = self._clock()
        if current is not None and not needed(current, now):
            _log.debug("another process renewed the %s meanwhile", self.name)
            return current
        state = self.load_state()
        guard = self.guard
        if state.last_request_at is not None and not guard.clock_known() and guard.read_broker_clock():
            now = self._clock()  # a clock running ahead would take a recent request for an old one
            if current is not None and not needed(current, now):  # in the broker's time it is still good
                return current
        left = None if current is None else current.seconds_left(now)
        now = self.guard.check(state, now, left, lambda state, outcome: self._observe(state, outcome, after))
        left = None if current is None else current.seconds_left(now)
        self.store.record.ready()  # a record that cannot be stored: say so before the broker texts
        self.store.lock.confirm()  # a lease that lapsed while this process stood still: do not send
        offset, previous = self.guard.offset(), state.last_request_at
        state.last_request_at = now
        self.store.state.save(state)
        try:
            record = self._issue(current)
        except BrokerError as exc:
            self.guard.restamp(state, now, offset)
            self._observe(state, Outcome("refused", self._clock(), exc.code, exc.broker_message, left), after)
            raise
        except KISTokenError as exc:
            self.guard.restamp(state, now, offset)
            if isinstance(exc, NotSentError):  # it never reached the broker: the minute is not spent
                state.last_request_at = previous
            if isinstance(exc, AnswerLostError) and exc.succeeded:  # most likely issued: count it
                state.issuances.append(state.last_request_at or now)
            self._observe(state, Outcome("failed", self._clock(), None, str(exc), left), after)
            raise
        except ImportError:  # a dependency missing from this Python: nothing was sent
            state.last_request_at = previous
            self.store.state.save(state)
            raise
        except Exception as exc:  # a garbled answer the client did not foresee: a failure like any other
            self.guard.restamp(state, now, offset)
            error = BadResponseError(f"the broker's answer could not be read ({type(exc).__name__})")
            self._observe(state, Outcome("failed", self._clock(), None, str(error), left), after)
            raise error from exc
        self.guard.restamp(state, now, offset)
        try:
            record = self.put(record, locked=True)
        except StoreError as exc:  # the broker issued it (and texted the user): never drop it
            _log.error("cannot store the new %s (%s); serving it from memory", self.name, exc)
            self._set(record, self._clock())
        same = current is not None and record == current
        self.backoff = NO_BACKOFF
        if not same:
            state.issuances.append(self._clock())
        kind = "same_token" if same else "renewed"
        self._observe(state, Outcome(kind, self._clock(), seconds_left=left), after)
        return record

    @contextlib.contextmanager
    def hold(self, lock_wait: float) -> Iterator[None]:
        """Hold this process's mutex and the key's lock, in the order every renewal takes them."""
        with self._mutex, self.store.lock.hold(lock_wait):
            yield

    def _observe(self, state: RenewalState, outcome: Outcome, after: list[Callable[[], object]]) -> None:
        for observer in self._observers:
            try:
                later = observer(outcome, state)
            except Exception as exc:  # an observer must never stop the credential from being served
                _log.warning("%s outcome observer failed: %s", self.name, type(exc).__name__)
                continue
            if later is not None:
                after.append(later)
        self.store.state.save(state)

    def load_state(self) -> RenewalState:
        """The key's shared renewal memory (:func:`~common.renewal.request_guard.read_state`)."""
        return read_state(self.store.state, self._clock(), self.name)

    # -- store and memory ---------------------------------------------------------------------------

    def put(self, record: R, locked: bool = False) -> R:
        """Store ``record`` and serve it from memory from now on; return it as stored (a store may
        keep times to the second, and what is served must equal what other processes read)."""
        self.store.record.save(record)
        self._signature = self.store.record.signature()
        with contextlib.suppress(CorruptRecordError):
            record = self.store.record.load() or record
        self._set(record, self._clock())
        if self._copies is not None:
            self._copies.publish(record, locked)
        return record

    def forget(self, how: str = "deleted") -> list[str]:
        """Remove the stored record and the one in memory; return what was removed.

        Files an older version left are closed too, so that the deleted token never comes back; the
        state remembers when and ``how`` (``deleted``, ``revoked``), for ``check``.
        """
        with self.hold(self.windows.lock_wait):
            try:
                return self.store.record.delete()
            finally:  # also when a shared store did not take the deletion: this host forgets it
                self._signature = None
                self._set(None, self._clock())
                state = self.load_state()
                closing = not state.legacy_closed
                state.legacy_closed = True
                state.removed_at, state.removed_by = self._clock(), how
                try:
                    self.store.state.save(state)
                except StoreError:
                    if closing:  # the left-over files must stay closed: say it
                        raise

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
            held = usable(current, now, self.windows)
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
            if record is not None and record != current and self._copies is not None:
                self._copies.pending = True
            current = record
        self._set(current, now)
        if self._copies is not None and self._copies.pending and current is not None:
            self._copies.publish(current, locked)

    def _load(self, locked: bool) -> tuple[R | None, bool]:
        """The usable stored record (or None), and whether anything was stored at all.

        A stored record that cannot be used is warned about once (naming the file), and its intact
        copy (a market's mirror of it) is served instead when there is one.
        """
        try:
            record = self.store.record.load()
        except CorruptRecordError as exc:
            self._warn_once(exc)
            return (None if self._copies is None else self._copies.intact_copy(self.snapshot[0])), True
        if record is None:
            return (None if self._copies is None else self._copies.adopt_legacy(locked)), False
        reason = self._accept(record)
        if reason is not None:
            self._warn_once(reason)
            return None, True
        self._warned = None
        return record, True

    def _warn_once(self, problem: object) -> None:
        """Warn that the stored record is ignored, once per distinct problem (not at every re-read)."""
        text = str(problem)
        location = self.store.record.location
        message = text if location in text else f"{location}: {text}"
        if message != self._warned:
            self._warned = message
            _log.warning("ignoring the stored %s: %s", self.name, message)

    def _set(self, record: R | None, now: float) -> None:
        until = _NEVER if record is None else serve_until(record, now, self.backoff, self.windows)
        shift = self.guard.offset()  # the bounds in the local clock: the hot path reads nothing else
        self.snapshot = (record, until - shift, now - shift)
