"""The renewal policy, once for both markets.

A market subclass supplies three hooks: :meth:`BaseTokenManager.get_api_url`,
:meth:`BaseTokenManager.get_app_credentials` and :meth:`BaseTokenManager.get_token_file_prefix`.
Everything else (when to renew, who renews, what to do when the broker says no) lives here.

Renewal windows, measured back from the broker's expiry (a token lives 24 h):

* more than :data:`ADVISORY_WINDOW` (60 min, plus up to :data:`ADVISORY_JITTER` = 10 min picked
  once per process so that processes do not all renew in the same second) left: *fresh*, served
  from memory.
* inside the advisory window: one caller tries the cross-process lock without waiting and renews;
  if the lock is busy or the broker says no, everyone keeps the current token.
* inside :data:`MANDATORY_WINDOW` (20 min): the caller waits (at most :data:`MANDATORY_LOCK_WAIT`)
  for the lock and renews; a refusal is logged as an error and the current token is still served.
* under :data:`EXPIRY_MARGIN` (5 min) left, or past expiry: the token is never handed out (it could
  die in flight or under clock skew); a new one is required (waiting at most :data:`LOCK_WAIT` for
  another process's renewal), and a refusal is an error.

Within a process, one thread renews while the others keep the current token if it is still valid.
After a failed attempt the process backs off (:data:`MIN_REQUEST_INTERVAL`) without touching the
disk, so a refusal costs nothing per call.

All windows are far shorter than the 18 h after which the broker mints a new token (it answers
with the *same* token within 6 h of an issuance), so a renewal never becomes a storm of same-token
answers. Whatever the window, this host never sends a token request less than
:data:`MIN_REQUEST_INTERVAL` after the previous one for the same market (the broker allows one a
minute and every issuance messages the account holder); that memory is shared through the token
directory, so other processes and the next cron run keep to it too.
"""

from __future__ import annotations

import abc
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from common import clock as clock_module
from common.errors import (
    BrokerError,
    ConfigError,
    KISTokenError,
    LockTimeoutError,
    RequestHeldBackError,
    TokenUnavailableError,
)
from common.record import CorruptRecordError, TokenRecord, mask_token
from common.settings import Settings
from common.store import FileTokenStore, RenewalState, TokenStore

EXPIRY_MARGIN = 5 * 60.0
MANDATORY_WINDOW = 20 * 60.0
ADVISORY_WINDOW = 60 * 60.0
ADVISORY_JITTER = 10 * 60.0
SYNC_INTERVAL = 1.0
LOCK_WAIT = 30.0
MANDATORY_LOCK_WAIT = 5.0
MIN_REQUEST_INTERVAL = 61.0
#: A token lives 24 h and the broker re-sends the same one within 6 h of an issuance, so no
#: horizon beyond 18 h (less the expiry margin) can ever be met by a renewal.
MAX_HORIZON = 18 * 3600.0 - EXPIRY_MARGIN

ALERT_WEBHOOK_VAR = "KIS_ALERT_WEBHOOK_URL"

try:  # CPython's built-in SHA-256 loads in microseconds; hashlib loads OpenSSL (2 ms at start-up)
    from _sha2 import sha256 as _sha256  # CPython 3.12+
except ImportError:
    try:
        from _sha256 import sha256 as _sha256  # CPython 3.11
    except ImportError:
        from hashlib import sha256 as _sha256

_log = logging.getLogger(__name__)
_NEVER = float("-inf")


def key_fingerprint(app_key: str) -> str:
    """A short, one-way fingerprint of an app key (stored instead of the key)."""
    return "sha256:" + _sha256(app_key.encode()).hexdigest()[:16]


class BaseTokenManager(abc.ABC):
    """Keeps one market's token valid: cached in memory, shared on disk, renewed ahead of expiry.

    Args:
        settings: configuration source (default: the environment, then ``.env``).
        store: where the token is kept (default: :class:`FileTokenStore` in ``KIS_TOKEN_DIR``).
        clock: returns the time as epoch seconds (tests inject one).
        sleep: waits between retries of the token request (tests inject one).
        session: a ``requests.Session`` for the broker, if the caller has one.
        jitter: this process's extra advisory window in seconds (default: random up to 10 min).
        app_key, app_secret, environment, token_dir: values given in code; they win over the
            market's variables, ``KIS_ENV`` and ``KIS_TOKEN_DIR`` from the environment and ``.env``.
    """

    #: The market's ``config`` module (account variable, broker exchange, warm-up horizon).
    market_config: Any = None

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: TokenStore | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
        session: Any = None,
        jitter: float | None = None,
        app_key: str | None = None,
        app_secret: str | None = None,
        environment: str | None = None,
        token_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = (settings or Settings()).with_overrides({
            self.market_config.APP_KEY_VAR: app_key, self.market_config.APP_SECRET_VAR: app_secret,
            "KIS_ENV": environment, "KIS_TOKEN_DIR": token_dir,
        })
        self._store = store
        self._clock = clock or clock_module.now
        self._sleep = sleep or time.sleep
        self._session = session
        if jitter is None:
            jitter = random.uniform(0.0, ADVISORY_JITTER)
        self.advisory_window = ADVISORY_WINDOW + jitter
        self._mutex = threading.RLock()
        # (record, serve-from-memory-until, set-at): one tuple, swapped whole, read lock-free.
        # Serving needs set-at <= now < until, so a clock stepped back never extends it.
        self._cache: tuple[TokenRecord | None, float, float] = (None, _NEVER, _NEVER)
        self._signature: object = object()
        # After a failed renewal: (when, not-again-before, why); the same clock-step rule applies.
        self._backoff: tuple[float, float, KISTokenError | None] = (_NEVER, _NEVER, None)
        self._fingerprint: str | None = None

    # -- market hooks -------------------------------------------------------------------------

    @abc.abstractmethod
    def get_api_url(self) -> str:
        """The broker's base URL for this market (no trailing slash)."""

    @abc.abstractmethod
    def get_app_credentials(self) -> tuple[str, str]:
        """This market's ``(app_key, app_secret)``; raise :class:`ConfigError` if missing."""

    @abc.abstractmethod
    def get_token_file_prefix(self) -> str:
        """The prefix of this market's token files: ``us_`` or ``kr_``."""

    # -- identity -----------------------------------------------------------------------------

    @property
    def market(self) -> str:
        """``us`` or ``kr``, from the file prefix."""
        return self.get_token_file_prefix().rstrip("_")

    @property
    def environment(self) -> str:
        """``real`` or ``paper``."""
        return self.settings.environment

    @property
    def store(self) -> TokenStore:
        """Where this market's token is kept."""
        if self._store is None:
            self._store = FileTokenStore(self.settings.token_dir, self.get_token_file_prefix())
        return self._store

    def now(self) -> float:
        """The manager's clock: epoch seconds."""
        return self._clock()

    def key_fingerprint(self) -> str:
        """Fingerprint of this market's app key, as stored in its record."""
        if self._fingerprint is None:
            self._fingerprint = key_fingerprint(self.get_app_credentials()[0])
        return self._fingerprint

    # -- the seed API -------------------------------------------------------------------------

    def get_valid_token(self) -> str:
        """A token that is valid for at least :data:`EXPIRY_MARGIN`, renewing first if needed.

        Served from memory while fresh (no file read); another process's renewal is picked up
        within :data:`SYNC_INTERVAL`.

        Raises:
            TokenUnavailableError: no valid token is held and none could be obtained.
            ConfigError: this market is not configured.
        """
        record, fresh_until, since = self._cache
        if since <= self._clock() < fresh_until:
            return record.access_token  # type: ignore[union-attr]
        return self.get_valid_record().access_token

    def get_valid_record(self) -> TokenRecord:
        """Like :meth:`get_valid_token` but return the whole immutable record."""
        record, fresh_until, since = self._cache
        now = self._clock()
        if record is not None and since <= now < fresh_until:
            return record
        if not self._mutex.acquire(blocking=False):
            # Another thread is syncing or renewing: keep serving a token that is still valid.
            if record is not None and record.seconds_left(now) > EXPIRY_MARGIN:
                return record
            if not self._mutex.acquire(timeout=LOCK_WAIT + 30.0):
                raise TokenUnavailableError(f"no valid {self.market} token: another thread's renewal hangs")
        try:
            return self._ensure_valid()
        finally:
            self._mutex.release()

    def load_token(self) -> TokenRecord | None:
        """Read this market's record from the store; None if absent or unusable (warning logged)."""
        return self._load()[0]

    def _load(self) -> tuple[TokenRecord | None, bool]:
        """The usable stored record (or None), and whether anything was stored at all."""
        try:
            record = self.store.load()
        except CorruptRecordError as exc:
            _log.warning("ignoring the stored %s token: %s", self.market, exc)
            return None, True
        if record is None:
            return None, False
        reason = record.mismatch(self.market, self.environment, self.key_fingerprint())
        if reason is not None:
            _log.warning(
                "ignoring the stored %s token: %s (processes of different environments or keys "
                "need different KIS_TOKEN_DIRs)", self.market, reason,
            )
            return None, True
        return record, True

    def save_token(self, record: TokenRecord) -> None:
        """Store ``record`` atomically and serve it from memory from now on."""
        self.store.save(record)
        self._signature = self.store.signature()
        self._set_record(record, self._clock())

    def delete_token(self) -> list[str]:
        """Remove this market's local token files; return the paths removed."""
        with self._mutex:
            removed = self.store.delete()
            self._signature = None
            self._set_record(None, self._clock())
            return removed

    def is_token_expired(self, record: TokenRecord | None = None) -> bool:
        """True if ``record`` (default: the stored one) is absent or has under :data:`EXPIRY_MARGIN` left."""
        if record is None:
            record = self.load_token()
        return record is None or record.seconds_left(self._clock()) <= EXPIRY_MARGIN

    def refresh_token(self) -> TokenRecord:
        """Force a renewal now, whatever the current token's age.

        Returns:
            The new record. It holds the same token if the broker re-sent it (within 6 h of an
            issuance), which counts as success.

        Raises:
            RateLimitedError: the broker (or this host's one-a-minute memory) refused; the current
                token is kept.
            KISTokenError: any other failure; the current token is kept.
        """
        with self._mutex:
            return self._renew(LOCK_WAIT, lambda record, now: True)

    def replace_rejected_token(self, rejected: str) -> str:
        """Return a token other than ``rejected``, which the broker refused (``EGW00123``/``EGW00121``).

        Takes another process's newer token if there is one; otherwise renews (at most one request,
        still within the one-a-minute rule).

        Raises:
            KISTokenError: the renewal failed.
        """

        def needed(record: TokenRecord | None, now: float) -> bool:
            if record is None or record.access_token == rejected:
                return True
            return record.seconds_left(now) <= EXPIRY_MARGIN

        with self._mutex:
            return self._renew(LOCK_WAIT, needed).access_token

    def create_broker(self, acc_no: str | None = None, **kwargs: Any) -> Any:
        """Build a mojito2 ``KoreaInvestment`` broker for this market that runs on the managed token.

        ``acc_no`` defaults to the market's account variable; other keyword arguments go to mojito.
        """
        from common.broker import create_broker

        return create_broker(self, acc_no, **kwargs)

    def warm_up(self, valid_for: float) -> tuple[TokenRecord, bool]:
        """Make sure the token stays valid for ``valid_for`` seconds more, renewing only if not.

        Returns:
            The record and whether a renewal was made.

        Raises:
            ValueError: ``valid_for`` is over :data:`MAX_HORIZON` (no renewal could meet it).
            KISTokenError: a needed renewal failed.
        """
        if valid_for > MAX_HORIZON:
            raise ValueError(
                f"a horizon over {clock_module.format_duration(MAX_HORIZON)} can never be met: tokens "
                "live 24 h and the broker re-sends the same token within 6 h of issuing it, so a "
                "renewal gives at most 18 h, less the 5-min expiry margin"
            )
        horizon = valid_for + EXPIRY_MARGIN

        def needed(record: TokenRecord | None, now: float) -> bool:
            return record is None or record.seconds_left(now) <= horizon

        with self._mutex:
            self._sync()
            record = self._cache[0]
            if not needed(record, self._clock()):
                return record, False  # type: ignore[return-value]
            renewed = self._renew(LOCK_WAIT, needed)
            return renewed, record is None or renewed.access_token != record.access_token

    def revoke(self) -> list[str]:
        """Revoke this market's token at the broker, then delete the local files.

        Raises:
            TokenUnavailableError: there is no local token to revoke.
            KISTokenError: the broker refused or could not be reached; local files are kept.
        """
        from common import kis_client

        with self._mutex, self.store.lock(LOCK_WAIT):
            record = self.load_token()
            if record is None:
                raise TokenUnavailableError(f"no {self.market} token to revoke")
            app_key, app_secret = self.get_app_credentials()
            kis_client.revoke_token(
                self.get_api_url(), app_key, app_secret, record.access_token,
                sleep=self._sleep, session=self._session,
            )
            _log.info("revoked the %s token %s at the broker", self.market, mask_token(record.access_token))
            return self.delete_token()

    def get_token_info(self) -> dict[str, Any]:
        """Status of this market's token, as ``check --json`` prints it (see the README schema)."""
        now = self._clock()
        self.key_fingerprint()  # an unconfigured market is a ConfigError even with no record
        record = self.load_token()
        left = None if record is None else record.seconds_left(now)
        if record is None:
            status = "missing"
        elif left <= EXPIRY_MARGIN:  # type: ignore[operator]
            status = "expired"
        elif left <= ADVISORY_WINDOW:  # type: ignore[operator]
            status = "renewal_due"
        else:
            status = "ok"
        return {
            "schema": 1,
            "market": self.market,
            "environment": self.environment,
            "status": status,
            "present": record is not None,
            "valid": status in ("ok", "renewal_due"),
            "issued_at": None if record is None else clock_module.to_kst_iso(record.issued_at),
            "expires_at": None if record is None else clock_module.to_kst_iso(record.expires_at),
            "seconds_left": None if left is None else int(left),
            "token": None if record is None else mask_token(record.access_token),
            "renewal_window_seconds": int(ADVISORY_WINDOW),
            "last_renewal": self._last_renewal(),
            "files": self.store.locations(),
        }

    def load_renewal_state(self) -> RenewalState:
        """The shared renewal memory; an unusable file counts as empty (warning logged)."""
        try:
            return self.store.load_state()
        except CorruptRecordError as exc:
            _log.warning("ignoring the %s renewal state: %s", self.market, exc)
            return RenewalState()

    # -- policy -------------------------------------------------------------------------------

    def _ensure_valid(self) -> TokenRecord:
        self._sync()
        now = self._clock()
        record = self._cache[0]
        left = _NEVER if record is None else record.seconds_left(now)
        if left > self.advisory_window:
            return record  # type: ignore[return-value]
        usable = left > EXPIRY_MARGIN
        failed_at, retry_at, failure = self._backoff
        if failed_at <= now < retry_at:
            if usable:
                return record  # type: ignore[return-value]
            raise TokenUnavailableError(f"no valid {self.market} token: {failure}")
        if left > MANDATORY_WINDOW:
            wait = 0.0
        elif usable:
            wait = MANDATORY_LOCK_WAIT
        else:
            wait = LOCK_WAIT
        try:
            return self._renew(wait, self._renewal_needed)
        except ConfigError:
            raise
        except KISTokenError as exc:
            now = self._clock()
            current = self._cache[0]
            self._back_off(exc, now)
            if current is not None and current.seconds_left(now) > EXPIRY_MARGIN:
                self._log_kept(current, exc, now)
                self._set_record(current, now)
                return current
            raise TokenUnavailableError(f"no valid {self.market} token: {exc}") from exc

    def _renewal_needed(self, record: TokenRecord | None, now: float) -> bool:
        return record is None or record.seconds_left(now) <= self.advisory_window

    def _back_off(self, exc: KISTokenError, now: float) -> None:
        """No new attempt from this process for a while (the lock was busy: a short while)."""
        pause = MANDATORY_LOCK_WAIT if isinstance(exc, LockTimeoutError) else MIN_REQUEST_INTERVAL
        self._backoff = (now, now + pause, exc)

    def _log_kept(self, current: TokenRecord, exc: KISTokenError, now: float) -> None:
        if isinstance(exc, LockTimeoutError):
            _log.debug("another process is renewing the %s token; serving the current one", self.market)
            return
        in_mandatory = current.seconds_left(now) <= MANDATORY_WINDOW
        _log.log(
            logging.ERROR if in_mandatory else logging.WARNING,
            "%s token renewal failed (%s); keeping the current token, valid for %s more",
            self.market, exc, clock_module.format_duration(current.seconds_left(now)),
        )

    def _renew(
        self, lock_wait: float, needed: Callable[[TokenRecord | None, float], bool]
    ) -> TokenRecord:
        """Under the cross-process lock: re-read, then ask the broker only if still ``needed``."""
        with self.store.lock(lock_wait):
            self._sync(force=True)
            current = self._cache[0]
            now = self._clock()
            if not needed(current, now):
                _log.debug("another process renewed the %s token meanwhile", self.market)
                return current  # type: ignore[return-value]
            state = self.load_renewal_state()
            self._hold_back_if_too_soon(state, now)
            state.last_request_at = now
            self.store.save_state(state)
            return self._request_token(current, state)

    def _hold_back_if_too_soon(self, state: RenewalState, now: float) -> None:
        last = state.last_request_at
        if last is None or abs(now - last) >= MIN_REQUEST_INTERVAL:  # abs: a clock stepped back
            return
        message = (
            f"a {self.market} token was requested {abs(now - last):.0f} s ago; the broker allows one "
            f"a minute (next request possible in {last + MIN_REQUEST_INTERVAL - now:.0f} s)"
        )
        state.refusals["LOCAL"] = state.refusals.get("LOCAL", 0) + 1
        self.store.save_state(state)
        raise RequestHeldBackError(message)

    def _request_token(self, current: TokenRecord | None, state: RenewalState) -> TokenRecord:
        from common import kis_client

        app_key, app_secret = self.get_app_credentials()
        try:
            issued = kis_client.issue_token(
                self.get_api_url(), app_key, app_secret,
                now=self._clock, sleep=self._sleep, session=self._session, min_lifetime=EXPIRY_MARGIN,
            )
        except BrokerError as exc:
            self._note_outcome(state, "refused", code=exc.code, message=exc.broker_message)
            raise
        except KISTokenError as exc:
            self._note_outcome(state, "failed", message=str(exc))
            raise
        now = self._clock()
        same = current is not None and issued.access_token == current.access_token
        record = TokenRecord(
            access_token=issued.access_token,
            token_type=issued.token_type,
            issued_at=current.issued_at if same else now,  # type: ignore[union-attr]
            expires_at=issued.expires_at,
            market=self.market,
            environment=self.environment,
            key_fingerprint=self.key_fingerprint(),
        )
        self.save_token(record)
        self._backoff = (_NEVER, _NEVER, None)
        self._note_outcome(state, "same_token" if same else "renewed")
        _log.info(
            "%s %s token %s, expires %s",
            "kept the same" if same else "obtained a new", self.market,
            mask_token(record.access_token), clock_module.to_kst_iso(record.expires_at),
        )
        return record

    def _note_outcome(
        self, state: RenewalState, outcome: str, code: str | None = None, message: str | None = None
    ) -> None:
        now = self._clock()
        state.last_outcome, state.last_outcome_at = outcome, now
        state.last_code, state.last_message = code, message
        if outcome in ("renewed", "same_token"):
            state.last_success_at = now
            state.renewals += 1
        elif code is not None:
            state.refusals[code] = state.refusals.get(code, 0) + 1
        else:
            state.failures += 1
        if outcome in ("refused", "failed"):
            try:
                self._alert(state, outcome, code, message, now)
            except Exception as exc:  # an alert must never stop the token from being served
                _log.warning("%s renewal alert not sent: %s", self.market, type(exc).__name__)
        self.store.save_state(state)

    def _alert(
        self, state: RenewalState, outcome: str, code: str | None, message: str | None, now: float
    ) -> None:
        """Post a failed renewal to ``KIS_ALERT_WEBHOOK_URL`` if it is set (see ``common.alerts``)."""
        url = self.settings.get(ALERT_WEBHOOK_VAR)
        if url is None:
            return
        from common import alerts

        current = self._cache[0]
        alerts.send_renewal_alert(
            url,
            state,
            market=self.market,
            environment=self.environment,
            outcome=outcome,
            code=code,
            message=message,
            seconds_left=None if current is None else current.seconds_left(now),
            now=now,
        )

    def _last_renewal(self) -> dict[str, Any] | None:
        state = self.load_renewal_state()
        if state.last_outcome is None:
            return None
        return {
            "outcome": state.last_outcome,
            "at": clock_module.to_kst_iso(state.last_outcome_at or 0.0),
            "code": state.last_code,
            "message": state.last_message,
        }

    # -- memory cache -------------------------------------------------------------------------

    def _sync(self, force: bool = False) -> None:
        """Reload the record if the store changed since we last read it.

        A stored record that cannot be used (corrupt, or of another environment or key) does not
        replace a valid one held in memory: that one keeps being served until it is renewed. A
        record that was removed (``delete``, ``revoke``) is dropped.
        """
        now = self._clock()
        current = self._cache[0]
        signature = self.store.signature()
        if force or signature != self._signature:
            self._signature = signature
            record, stored = self._load()
            keep = record is None and stored and current is not None
            if keep and current.seconds_left(now) > EXPIRY_MARGIN:  # type: ignore[union-attr]
                record = current
            current = record
        self._set_record(current, now)

    def _set_record(self, record: TokenRecord | None, now: float) -> None:
        """Swap in ``record`` and how long it may be served without looking at the store again.

        A fresh record is served until the next sync or until it enters the advisory window. One
        inside a window is served from memory only while a failed renewal is backing off, and never
        past the next window boundary.
        """
        fresh_until = _NEVER
        if record is not None:
            boundaries = [
                record.expires_at - window
                for window in (self.advisory_window, MANDATORY_WINDOW, EXPIRY_MARGIN)
                if record.expires_at - window > now
            ]
            failed_at, retry_at, _ = self._backoff
            backing_off = failed_at <= now < retry_at
            in_window = len(boundaries) < 3
            if boundaries and (not in_window or backing_off):
                limit = now + SYNC_INTERVAL
                if in_window:
                    limit = min(limit, retry_at)
                fresh_until = min(limit, boundaries[0])
        self._cache = (record, fresh_until, now)
