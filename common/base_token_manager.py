"""The token manager's facade: the market hooks, the public methods, and the wiring.

A market subclass supplies three hooks: :meth:`BaseTokenManager.get_api_url`,
:meth:`BaseTokenManager.get_app_credentials` and :meth:`BaseTokenManager.get_token_file_prefix`.
The token belongs to the app key (``common.credentials.identity``): markets that share a key share
its record, lock and one-a-minute memory, and each market keeps its own story files as mirrors.
When to renew is :func:`common.renewal.policy.decide`; the locked transaction is
:class:`common.renewal.engine.RenewalEngine`; the token as a credential kind is
``common.credentials.token_kind``; files are ``common.store``.
"""

from __future__ import annotations

import abc
import os
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import TYPE_CHECKING, Any

from common.budget.limiter import CallBudget
from common.clock import BrokerClock
from common.credentials.approval_kind import ApprovalKind, ApprovalRecord
from common.credentials.identity import Credential
from common.credentials.records import TokenRecord
from common.credentials.timeouts import DEFAULT_TIMEOUTS, Timeouts
from common.credentials.token_kind import TokenKind
from common.errors import KISTokenError, TokenUnavailableError
from common.renewal import outcomes
from common.renewal.aio import AsyncMethods
from common.renewal.engine import RenewalEngine
from common.renewal.policy import ADVISORY_JITTER, NO_BACKOFF, Action, Windows, check_horizon, decide, usable
from common.settings import Settings
from common.store import host_clock, selection
from common.store.mirror import MarketMirror, StoryFiles
from common.store.protocols import KeyStore, RenewalState

if TYPE_CHECKING:
    from common.session.holder import SessionTimes
    from common.session.lease import SessionLease

ALERT_WEBHOOK_VAR = "KIS_ALERT_WEBHOOK_URL"


class BaseTokenManager(AsyncMethods, abc.ABC):
    """Keeps one market's token valid: cached in memory, shared per app key, renewed ahead of expiry.

    The asyncio methods (``get_valid_token_async`` ...) come from :class:`common.renewal.aio.AsyncMethods`.

    Args:
        settings: configuration source (default: the environment, then ``.env``).
        store: the key's store (default: the one ``KIS_TOKEN_STORE`` selects, see ``common.store.selection``).
        clock: returns the local time as epoch seconds (tests inject one); the manager judges time
            in the broker's clock (:attr:`now`), this one corrected by the broker's ``Date`` headers.
        sleep: waits between retries of the token request (tests inject one).
        session: a ``requests.Session`` for the broker, if the caller has one.
        windows: renewal windows and waits (default: :class:`common.renewal.policy.Windows`).
        jitter: seconds added to the advisory window (default: 0 to 10 min derived from the key, so
            that every process of a key, and ``check``, agree on when renewal is due).
        timeouts: the token endpoint's deadlines and retries (default: ``kis_client.Timeouts()``).
        app_key, app_secret, environment, token_dir: values given in code; they win over the
            market's variables, ``KIS_ENV`` and ``KIS_TOKEN_DIR`` from the environment and ``.env``.
    """

    #: The market's ``config`` module (account variable, broker exchange, warm-up horizon).
    market_config: Any = None

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: KeyStore[TokenRecord] | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
        session: Any = None,
        windows: Windows | None = None,
        jitter: float | None = None,
        timeouts: Timeouts | None = None,
        app_key: str | None = None,
        app_secret: str | None = None,
        environment: str | None = None,
        token_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = (settings or Settings()).with_overrides({
            self.market_config.APP_KEY_VAR: app_key, self.market_config.APP_SECRET_VAR: app_secret,
            "KIS_ENV": environment, "KIS_TOKEN_DIR": token_dir,
        })
        self._local = clock or time.time  # the hot path compares the snapshot with this clock alone
        self.now = BrokerClock(self._local)  # the broker's time; tests inject the local clock
        self.sleep = sleep or time.sleep
        self.session = session
        self.timeouts = timeouts
        self._windows, self._jitter, self._key_store = windows or Windows(), jitter, store
        self._built: tuple[RenewalEngine[TokenRecord], TokenKind, StoryFiles] | None = None
        self._token_engine: RenewalEngine[TokenRecord] | None = None  # the hot path's one lookup
        self._approval: RenewalEngine[ApprovalRecord] | None = None

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

    # -- identity and wiring ------------------------------------------------------------------

    @property
    def market(self) -> str:
        """``us`` or ``kr``, from the file prefix."""
        return self.get_token_file_prefix().rstrip("_")

    @property
    def environment(self) -> str:
        """``real`` or ``paper``."""
        return self.settings.environment

    @property
    def credential(self) -> Credential:
        """Whose token this market uses: (environment, broker host, app key fingerprint)."""
        return self._wired()[1].credential

    def key_fingerprint(self) -> str:
        """Fingerprint of this market's app key, as stored in its record."""
        return self.credential.key_fingerprint

    @property
    def windows(self) -> Windows:
        """The renewal windows in force (the advisory window includes the key's jitter)."""
        return self._wired()[0].windows

    @property
    def store(self) -> KeyStore[TokenRecord]:
        """The key's record, renewal lock and renewal state."""
        return self._wired()[0].store

    @property
    def mirror(self) -> MarketMirror:
        """This market's story files (``<prefix>api_token.json`` ...), mirrors of the key's record."""
        return self._wired()[2].files

    def _wired(self) -> tuple[RenewalEngine[TokenRecord], TokenKind, StoryFiles]:
        if self._built is None:
            kept = self._start_clock()
            credential = Credential.of(self.environment, self.get_api_url(), self.get_app_credentials()[0])
            kind = TokenKind(self, credential, self._windows.expiry_margin)
            if kept:  # another process's clock may not be this one's: read the broker's (one GET)
                kind.calibrate()
            story = StoryFiles(self.settings.token_dir, self.get_token_file_prefix(), credential.key_id,
                               kind.accept)
            engine = self._engine(credential, "token", kind, store=self._key_store, copies=story)
            self._built, self._token_engine = (engine, kind, story), engine
        return self._built

    def _start_clock(self) -> bool:
        """Start from the offset the host's last process learned (True if there is one: a host whose
        clock is off); keep every change for the host's next process."""
        directory = self.settings.token_dir
        kept = 0.0
        if not self.now.offset:
            kept = self.now.offset = host_clock.load_offset(directory)
        self.now.on_change = lambda offset: host_clock.save_offset(directory, offset, self.now())
        return bool(kept)

    def _approval_engine(self) -> RenewalEngine[ApprovalRecord]:
        if self._approval is None:
            credential = self.credential
            self._approval = self._engine(credential, "approval", ApprovalKind(self, credential))
        return self._approval

    def _engine(self, credential: Credential, kind_name: str, kind: TokenKind | ApprovalKind,
                **extra: Any) -> RenewalEngine[Any]:
        """An engine for one credential kind (``token``, ``approval``) of this market's key."""
        jitter = self._jitter
        if jitter is None:
            jitter = int(credential.key_fingerprint[-6:], 16) % int(ADVISORY_JITTER)
        lease = selection.lease(self._windows.lock_wait, (self.timeouts or DEFAULT_TIMEOUTS).longest_request)
        store = extra.pop("store", None) or selection.key_store(self.settings, credential.key_id, kind_name,
                                                                lease=lease)
        webhook = self.settings.get(ALERT_WEBHOOK_VAR) if kind_name == "token" else None  # alerts: tokens
        return RenewalEngine(
            name=f"{self.market} {kind_name.replace('approval', 'approval key')}",
            store=store,
            issue=kind.issue,
            accept=kind.accept,
            windows=self._windows._replace(advisory=self._windows.advisory + jitter),
            clock=self.now,
            observers=outcomes.observers(webhook, self.market, self.environment, self._windows.expiry_margin),
            daily_limit=self.settings.daily_limit,
            calibrate=kind.calibrate,
            **extra,
        )

    # -- the seed API -------------------------------------------------------------------------

    def get_valid_token(self) -> str:
        """A token valid for more than the expiry margin (5 min), renewing first if needed.

        Served from memory while fresh (no file read); another process's renewal is picked up
        within a second.

        Raises:
            TokenUnavailableError: no valid token is held and none could be obtained.
            ConfigError: this market is not configured.
        """
        engine = self._token_engine
        if engine is not None:
            record = engine.fresh()
            if record is not None:
                return record.access_token
        return self._wired()[0].serve().access_token

    def get_valid_record(self) -> TokenRecord:
        """Like :meth:`get_valid_token` but return the whole immutable record."""
        return self._wired()[0].serve()._replace(market=self.market)

    def load_token(self) -> TokenRecord | None:
        """The key's stored record, or None if absent or unusable (warning logged)."""
        record = self._wired()[0].current()
        return None if record is None else record._replace(market=self.market)

    def save_token(self, record: TokenRecord) -> None:
        """Store ``record`` atomically as the key's record and serve it from memory from now on."""
        self._wired()[0].put(record)

    def delete_token(self) -> list[str]:
        """Remove the key's token, this market's story files, and any other market's that mirror the
        key's token (so that the deleted token never comes back from a copy); return the paths removed."""
        return self._delete("deleted")

    def _delete(self, how: str) -> list[str]:
        engine, _, story = self._wired()
        try:
            removed = engine.forget(how)
        finally:
            mirrored = story.delete()
        return removed + mirrored

    def is_token_expired(self, record: TokenRecord | None = None) -> bool:
        """True if ``record`` (default: the stored one) is absent or has no more than the margin left."""
        return not usable(record or self.load_token(), self.now(), self.windows)

    def get_token_info(self) -> dict[str, Any]:
        """Status of this market's token, as ``check --json`` prints it (see the README schema)."""
        from common.renewal.report import token_info

        return token_info(self)

    def load_renewal_state(self) -> RenewalState:
        """The key's shared renewal memory; an unusable file counts as empty (warning logged)."""
        return self._wired()[0].load_state()

    def get_approval_key(self) -> str:
        """The key's WebSocket approval key (``POST /oauth2/Approval``), issued first if needed.

        Managed like the token: cached in memory and in a 0600 file per key, shared by every process
        (and market) of the key, single flight, renewed before it is 24 h old.

        Raises:
            TokenUnavailableError: none is held and none could be obtained.
        """
        return self._approval_engine().serve().approval_key

    def load_approval_key(self) -> ApprovalRecord | None:
        """The key's stored approval key record, or None (no request)."""
        return self._approval_engine().current()

    # -- the WebSocket session (common.session) ----------------------------------------------

    def websocket_session(self, wait: float = 0.0, *, times: SessionTimes | None = None
                          ) -> AbstractContextManager[str]:
        """``with manager.websocket_session() as approval_key:`` holds the key's one WebSocket session
        lease (every process and host of the key, ``common.session``) for the block, which gets the
        key's approval key; released on leaving it (an exception too).

        Args:
            wait: seconds to wait for another holder to let go (default: none).
            times: the lease's bounds (a :class:`common.session.SessionTimes`; tests pass short ones).

        Raises:
            SessionHeldError: another process or host held it all that time (the message names it).
            TokenUnavailableError: no approval key could be had (the lease is given back).
        """
        return self._session_lease(times).hold(wait, self.get_approval_key)

    def websocket_session_async(self, wait: float = 0.0, *, times: SessionTimes | None = None
                                ) -> AbstractAsyncContextManager[str]:
        """``async with manager.websocket_session_async() as approval_key:``: :meth:`websocket_session`
        for asyncio (the waits run in a worker thread; the loop keeps running)."""
        return self._session_lease(times).hold_async(wait, self.get_approval_key_async)

    def _session_lease(self, times: SessionTimes | None) -> SessionLease:
        from common.session import open_session

        return open_session(self.settings, self.settings.token_dir, self.credential.key_id, self.market,
                            times=times)

    # -- operations ---------------------------------------------------------------------------

    def refresh_token(self) -> TokenRecord:
        """Force a renewal now; the same token back (within 6 h of an issuance) is a success.

        Raises:
            RateLimitedError: the broker (or the key's one-a-minute memory) refused; the token is kept.
            KISTokenError: any other failure; the current token is kept.
        """
        engine = self._wired()[0]
        return engine.renew(engine.windows.lock_wait, lambda record, now: True)

    def replace_rejected_token(self, rejected: str) -> str:
        """A token other than ``rejected``, which the broker refused (``EGW00123``/``EGW00121``):
        another process's newer one if there is one, else a renewal (one request at most)."""
        engine = self._wired()[0]
        record, now = engine.snapshot[0], self.now()
        if engine.backoff.active(now):  # a failed attempt a moment ago: no lock, no disk
            if record is not None and record.access_token != rejected and usable(record, now, engine.windows):
                return record.access_token
            raise TokenUnavailableError(f"no {self.market} token to replace the rejected one: "
                                        f"{engine.backoff.error}")

        def needed(record: TokenRecord | None, now: float) -> bool:
            return record is None or record.access_token == rejected or engine.due(record, now)

        try:
            return engine.renew(engine.windows.lock_wait, needed).access_token
        except KISTokenError as exc:
            engine.back_off(exc)
            raise

    def warm_up(self, valid_for: float) -> tuple[TokenRecord, bool]:
        """Make sure the key's token stays valid ``valid_for`` seconds more; return it and whether a
        new one was obtained.

        Raises:
            ValueError: no renewal could meet ``valid_for`` (over 18 h less the margin).
            KISTokenError: a needed renewal failed.
        """
        check_horizon(valid_for)
        engine = self._wired()[0]

        def needed(record: TokenRecord | None, now: float) -> bool:
            return decide(record, now, NO_BACKOFF, engine.windows, valid_for).action is not Action.SERVE

        before = engine.current()
        if before is not None and not needed(before, self.now()):
            return before._replace(market=self.market), False
        record = engine.renew(engine.windows.lock_wait, needed)
        renewed = before is None or record.access_token != before.access_token
        return record._replace(market=self.market), renewed

    def revoke(self) -> list[str]:
        """Revoke the key's token at the broker, then delete the local files.

        Raises:
            TokenUnavailableError: there is no local token to revoke.
            KISTokenError: the broker refused or could not be reached; local files are kept.
        """
        engine, kind, _ = self._wired()
        with engine.hold(engine.windows.lock_wait):
            record = engine.current()
            if record is None:
                raise TokenUnavailableError(f"no {self.market} token to revoke")
            kind.revoke(record)
            return self._delete("revoked")

    def create_broker(self, acc_no: str | None = None, **kwargs: Any) -> Any:
        """A mojito2 ``KoreaInvestment`` for this market that runs on the managed token (``acc_no``
        defaults to the market's account variable; other keyword arguments go to mojito)."""
        from common.auth.broker import create_broker

        return create_broker(self, acc_no, **kwargs)

    # -- the key's call budget (issue 19; README "Per-key call budget") ----------------------

    _call_budget: CallBudget | None = None

    def call_budget(self) -> CallBudget:
        """The app key's calls-a-second budget (``KIS_RATE_LIMIT``), shared by the key's processes
        (token directory) and hosts (``KIS_TOKEN_STORE``); one per key per process (both markets)."""
        if self._call_budget is None:
            from common.budget.shared import budget_for

            self._call_budget = budget_for(self.settings, self.settings.token_dir, self.credential.key_id)
        return self._call_budget

    def acquire_call(self, timeout: float | None = None) -> float:
        """Wait for the key's next free slot before a REST request sent without ``KISAuth``; return
        the seconds waited. Raises ``BudgetTimeoutError`` at once if none comes within ``timeout``
        (default 30 s). On an ``EGW00201`` answer call ``call_budget().note_refusal()``."""
        return self.call_budget().acquire(timeout)

    async def acquire_call_async(self, timeout: float | None = None) -> float:
        """:meth:`acquire_call` for asyncio code (awaited; never blocks the event loop)."""
        return await self.call_budget().acquire_async(timeout)
