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
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

from common.credentials.records import CorruptRecordError
from common.errors import (
    CREDENTIAL_CODES,
    AnswerLostError,
    BadResponseError,
    BrokerError,
    ConfigError,
    CredentialsError,
    DailyLimitError,
    KISTokenError,
    LockTimeoutError,
    NotSentError,
    RequestHeldBackError,
    StoreError,
    TokenUnavailableError,
)
from common.renewal.policy import NO_BACKOFF, Action, Backoff, Expiring, Windows, decide, serve_until
from common.settings import DAILY_LIMIT_VAR
from common.store.protocols import KeyStore, RenewalState

R = TypeVar("R", bound=Expiring)
R_contra = TypeVar("R_contra", contravariant=True)
_NEVER = float("-inf")
#: A last request stamped further than this in the future is looked at twice (the clock is checked).
FUTURE_TOLERANCE = 5.0
#: The broker's clock is read at most this often when the renewal state looks to be in the future.
CALIBRATE_INTERVAL = 60.0
#: The daily budget's window, and the longest in-memory pause after it refused.
DAY, DAILY_LIMIT_PAUSE = 86400.0, 300.0
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
#: Whatever is slow (a webhook) an observer returns as a callable, run once the key's lock is released.
Observer = Callable[[Outcome, RenewalState], "Callable[[], object] | None"]


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
        daily_limit: at most this many issuances per key in 24 h (0: no limit).
        calibrate: reads the broker's clock into ``clock`` (True if it could); asked before a request
            when the key's last request seems to lie in the future.
        copy: returns an intact copy of the record kept elsewhere (a market's mirror), served when
            the stored record cannot be used.
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
        daily_limit: int = 0,
        calibrate: Callable[[], bool] | None = None,
        copy: Callable[[], R | None] | None = None,
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
        self._mirror = mirror
        self._legacy = legacy
        self.daily_limit = daily_limit
        self._calibrate = calibrate
        self._copy = copy
        self._warned: str | None = None
        self._calibrated_at = _NEVER  # monotonic time of the last try
        self._mutex = threading.RLock()
        # (record, serve-from-memory-until, set-at), both in the local clock (what the broker's clock
        # reads less its offset; an offset learned later moves them by at most one sync interval):
        # swapped whole, read lock-free. Serving needs set-at <= now < until, so a clock stepped
        # back never extends it.
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
        if record is not None and since <= self._local() < until:
            return record
        now = self._clock()
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
        except KISTokenError as exc:
            if isinstance(exc, ConfigError) and not isinstance(exc, StoreError):
                raise  # a token directory this user cannot use still leaves the held token in service
            self.back_off(exc)
            now = self._clock()
            current = self.snapshot[0]
            if current is not None and current.seconds_left(now) > self.windows.expiry_margin:
                self._log_kept(current, exc, now)
                self._set(current, now)
                return current
            raise TokenUnavailableError(f"no valid {self.name}: {exc}") from exc

    def back_off(self, exc: KISTokenError) -> None:
        """After a failed attempt, ask nothing more for a while (this process only, in memory): the
        rest of the minute when held back, a few seconds when the lock was busy, else a minute."""
        if isinstance(exc, DailyLimitError):
            pause = min(exc.retry_in, DAILY_LIMIT_PAUSE)
        elif isinstance(exc, RequestHeldBackError):
            pause = exc.retry_in
        elif isinstance(exc, LockTimeoutError):
            pause = self.windows.mandatory_lock_wait
        else:
            pause = self.windows.min_request_interval
        now = self._clock()
        self.backoff = Backoff(now, now + pause, exc)

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
        if not needed(current, now):
            _log.debug("another process renewed the %s meanwhile", self.name)
            return current  # type: ignore[return-value]
        state = self.load_state()
        if state.last_request_at is not None and not self._clock_known() and self._read_broker_clock():
            now = self._clock()  # a clock running ahead would take a recent request for an old one
            if not needed(current, now):  # in the broker's time the held credential is still good
                return current  # type: ignore[return-value]
        now = self._hold_back_if_too_soon(state, now, current, after)
        left = None if current is None else current.seconds_left(now)
        self._keep_to_daily_limit(state, now, left, after)
        self.store.record.ready()  # a record that cannot be stored: say so before the broker texts
        self.store.lock.confirm()  # a lease that lapsed while this process stood still: do not send
        offset, previous = self._offset(), state.last_request_at
        state.last_request_at = now
        self.store.state.save(state)
        try:
            record = self._issue(current)
        except BrokerError as exc:
            self._restamp(state, now, offset)
            self._observe(state, Outcome("refused", self._clock(), exc.code, exc.broker_message, left), after)
            raise
        except KISTokenError as exc:
            self._restamp(state, now, offset)
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
            self._restamp(state, now, offset)
            error = BadResponseError(f"the broker's answer could not be read ({type(exc).__name__})")
            self._observe(state, Outcome("failed", self._clock(), None, str(error), left), after)
            raise error from exc
        self._restamp(state, now, offset)
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

    def _offset(self) -> float:
        return float(getattr(self._clock, "offset", 0.0))

    def _restamp(self, state: RenewalState, stamped: float, offset: float) -> None:
        """Put the last request in the broker's time if the request just taught the clock an offset
        (a host whose clock ran a day ahead must not leave a stamp that holds every host back a day)."""
        shift = self._offset() - offset
        if shift:
            state.last_request_at = stamped + shift

    @contextlib.contextmanager
    def hold(self, lock_wait: float) -> Iterator[None]:
        """Hold this process's mutex and the key's lock, in the order every renewal takes them."""
        with self._mutex, self.store.lock.hold(lock_wait):
            yield

    def _hold_back_if_too_soon(
        self, state: RenewalState, now: float, current: R | None, after: list[Callable[[], object]]
    ) -> float:
        """Refuse to send a request within ``min_request_interval`` of the key's last one; return the
        time now (in the broker's clock, read again if the last request seemed to lie in the future).

        A last request stamped in the future is either this host's clock running behind (the broker's
        clock is read, once a minute at most, and judged again) or a lie; a lie that the broker's
        clock confirms counts as a request made just now (re-stamped, so the hold lasts one interval).
        Without the broker's clock it holds back. The stamp never moves back otherwise.
        """
        last = state.last_request_at
        interval = self.windows.min_request_interval
        ago = None
        if last is not None and last > now + FUTURE_TOLERANCE:
            if self._read_broker_clock():
                now = self._clock()
            if last > now + FUTURE_TOLERANCE and self._clock_known():
                state.last_request_at = last = now
                ago = "just now (its stamp lay in the broker's future)"
            elif last > now + FUTURE_TOLERANCE:
                ago = (f"{last - now:.0f} s in this host's future (a clock that disagrees with another "
                       "host's, and the broker's clock could not be read)")
                last = now
        if last is None or now - last >= interval:
            return now
        retry_in = last + interval - now
        if state.unreadable:
            ago = "possibly just now (the key's renewal state was unreadable)"
        ago = ago or f"{max(0.0, now - last):.0f} s ago"
        message = (
            f"a {self.name} was requested {ago} for this app key; the broker allows one a minute "
            f"(next request possible in {retry_in:.0f} s)"
        )
        left = None if current is None else current.seconds_left(now)
        failed = state.last_outcome in ("refused", "failed") and (state.last_outcome_at or 0.0) >= last - 1
        if failed:
            reason = " ".join(part for part in (state.last_code, state.last_message) if part)
            message += f"; that request failed: {reason[:200] or state.last_outcome}"
        self._observe(state, Outcome("held_back", now, "LOCAL", message, left), after)
        if failed and state.last_code in CREDENTIAL_CODES:  # the same fix is needed: the same exit code
            raise RequestHeldBackError(message, retry_in) from CredentialsError(
                state.last_code, state.last_message or "")
        raise RequestHeldBackError(message, retry_in)

    def _read_broker_clock(self) -> bool:
        """Read the broker's clock (at most once per :data:`CALIBRATE_INTERVAL`); True if read now."""
        if self._calibrate is None or time.monotonic() - self._calibrated_at < CALIBRATE_INTERVAL:
            return False
        self._calibrated_at = time.monotonic()
        try:
            return bool(self._calibrate())
        except Exception as exc:
            _log.debug("cannot read the broker's clock: %s", type(exc).__name__)
            return False

    def _clock_known(self) -> bool:
        return getattr(self._clock, "calibrated_at", None) is not None

    def _keep_to_daily_limit(
        self, state: RenewalState, now: float, left: float | None, after: list[Callable[[], object]]
    ) -> None:
        """Refuse a request once the key's daily budget of issuances is spent (0: no budget)."""
        state.issuances = state.recent_issuances(now, DAY)
        if not self.daily_limit or len(state.issuances) < self.daily_limit:
            return
        from common.clock import format_duration

        retry_in = max(1.0, min(state.issuances) + DAY - now)
        message = (
            f"{len(state.issuances)} {self.name}s were issued to this app key in the last 24 h, its "
            f"daily limit ({DAILY_LIMIT_VAR}={self.daily_limit}); no request for {format_duration(retry_in)} "
            f"(raise {DAILY_LIMIT_VAR}, or set it to 0 for no limit)"
        )
        self._observe(state, Outcome("refused", now, DailyLimitError.CODE, message, left), after)
        raise DailyLimitError(message, retry_in)

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
        """The key's shared renewal memory. An unusable one counts as "a request may just have been
        made" (warning logged): the one-a-minute memory errs on the safe side."""
        try:
            state = self.store.state.load()
        except CorruptRecordError as exc:
            _log.warning("the %s renewal state is unusable (%s); counting it as a request made just now",
                         self.name, exc)
            state = RenewalState(last_request_at=self._clock())
            state.unreadable = True
            return state
        if state.unreadable:  # one copy of it (a shared store's) could not be read
            _log.warning("one copy of the %s renewal state is unusable; counting it as a request made "
                         "just now", self.name)
            state.last_request_at = max(state.last_request_at or 0.0, self._clock())
        return state

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
        """The usable stored record (or None), and whether anything was stored at all.

        A stored record that cannot be used is warned about once (naming the file), and its intact
        copy (a market's mirror of it) is served instead when there is one.
        """
        try:
            record = self.store.record.load()
        except CorruptRecordError as exc:
            self._warn_once(exc)
            return self._from_copy(), True
        if record is None:
            return self._adopt_legacy(locked), False
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

    def _from_copy(self) -> R | None:
        """The record's intact copy, if the kind keeps one that is this key's, usable, and newer than
        the one held in memory (it is served, never written back: the next renewal replaces the
        unusable record)."""
        if self._copy is None:
            return None
        try:
            copy = self._copy()
        except (KISTokenError, CorruptRecordError):
            return None
        if copy is None or self._accept(copy) is not None:
            return None
        held = self.snapshot[0]
        if held is not None and held.expires_at >= copy.expires_at:
            return None
        if copy.seconds_left(self._clock()) <= self.windows.expiry_margin:
            return None
        _log.info("serving the %s from its intact copy", self.name)
        return copy

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
        shift = self._offset()  # the bounds in the local clock: the hot path reads nothing else
        self.snapshot = (record, until - shift, now - shift)
