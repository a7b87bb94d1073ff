"""The token manager's facade: the market hooks, the public methods, and the wiring.

A market subclass supplies three hooks: :meth:`BaseTokenManager.get_api_url`,
:meth:`BaseTokenManager.get_app_credentials` and :meth:`BaseTokenManager.get_token_file_prefix`.
The token belongs to the app key (``common.identity``): markets that share a key share its record,
lock and one-a-minute memory, and each market keeps its own story files as mirrors. When to renew is
:func:`common.policy.decide`; the locked transaction is :class:`common.engine.RenewalEngine`; the
files are ``common.file_store``; HTTP is ``common.kis_client``; status is ``common.report``.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from common import clock as clock_module
from common import file_store, outcomes
from common.engine import RenewalEngine
from common.errors import TokenUnavailableError
from common.identity import Credential
from common.policy import ADVISORY_JITTER, MAX_HORIZON, NO_BACKOFF, Action, Windows, decide
from common.record import TokenRecord, mask_token
from common.settings import Settings
from common.store import KeyStore, RenewalState

ALERT_WEBHOOK_VAR = "KIS_ALERT_WEBHOOK_URL"

_log = logging.getLogger(__name__)


class BaseTokenManager(abc.ABC):
    """Keeps one market's token valid: cached in memory, shared per app key, renewed ahead of expiry.

    Args:
        settings: configuration source (default: the environment, then ``.env``).
        store: the key's store (default: files in ``KIS_TOKEN_DIR``, see ``common.file_store``).
        clock: returns the time as epoch seconds (tests inject one).
        sleep: waits between retries of the token request (tests inject one).
        session: a ``requests.Session`` for the broker, if the caller has one.
        windows: renewal windows and waits (default: :class:`common.policy.Windows`).
        jitter: seconds added to the advisory window (default: 0 to 10 min, derived from the key so
            that every process of a key, and ``check``, agree on when renewal is due).
        timeouts: the token endpoint's deadlines and retries (default: ``kis_client.Timeouts``).
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
        timeouts: Any = None,
    ) -> None:
        self.settings = settings or Settings()
        self._clock = clock or clock_module.now
        self._sleep = sleep or time.sleep
        self._session = session
        self._base_windows = windows or Windows()
        self._jitter = jitter
        self._timeouts = timeouts
        self._key_store = store
        self._built: RenewalEngine[TokenRecord] | None = None
        self._credential: Credential

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
        self._engine()
        return self._credential

    def key_fingerprint(self) -> str:
        """Fingerprint of this market's app key, as stored in its record."""
        return self.credential.key_fingerprint

    @property
    def windows(self) -> Windows:
        """The renewal windows in force (the advisory window includes the key's jitter)."""
        return self._engine().windows

    @property
    def store(self) -> KeyStore[TokenRecord]:
        """The key's record, renewal lock and renewal state."""
        return self._engine().store

    @property
    def mirror(self) -> file_store.MarketMirror:
        """This market's story files (``<prefix>api_token.json`` ...), mirrors of the key's record."""
        return file_store.MarketMirror(self.settings.token_dir, self.get_token_file_prefix())

    def now(self) -> float:
        """The manager's clock: epoch seconds."""
        return self._clock()

    def _engine(self) -> RenewalEngine[TokenRecord]:
        if self._built is not None:
            return self._built
        credential = Credential.of(self.environment, self.get_api_url(), self.get_app_credentials()[0])
        jitter = self._jitter
        if jitter is None:
            jitter = int(credential.key_fingerprint[-6:], 16) % int(ADVISORY_JITTER)
        windows = replace(self._base_windows, advisory=self._base_windows.advisory + jitter)
        observers: list[outcomes.Observer] = [outcomes.bookkeeping]
        webhook = self.settings.get(ALERT_WEBHOOK_VAR)
        if webhook is not None:
            observers.append(outcomes.AlertObserver(webhook, self.market, self.environment))
        self._credential = credential
        mirror = self.mirror
        engine = RenewalEngine(
            name=f"{self.market} token",
            store=self._key_store or file_store.key_store(self.settings.token_dir, credential.key_id),
            issue=self._issue,
            accept=lambda record: record.mismatch(None, credential.environment, credential.key_fingerprint),
            windows=windows,
            clock=self._clock,
            observers=observers,
            on_change=self._update_mirror,
            legacy=mirror.load_legacy,
        )
        self._built = engine
        return engine

    def _update_mirror(self, record: TokenRecord) -> None:
        """Bring this market's story files up to date with the key's ``record``."""
        mine = record._replace(market=self.market)
        mirror = self.mirror
        if not mirror.holds(mine):
            mirror.write(mine, self._credential.key_id)

    def _issue(self, current: TokenRecord | None) -> TokenRecord:
        """The token kind's request: one ``/oauth2/tokenP`` (with retries) for this market's key."""
        from common import kis_client

        app_key, app_secret = self.get_app_credentials()
        issued = kis_client.issue_token(
            self.get_api_url(), app_key, app_secret, now=self._clock, sleep=self._sleep,
            session=self._session, min_lifetime=self.windows.expiry_margin,
            timeouts=self._timeouts or kis_client.DEFAULT_TIMEOUTS,
        )
        if current is not None and issued.access_token == current.access_token:
            _log.info("the broker re-sent the same %s token", self.market)
            return current._replace(expires_at=issued.expires_at)
        _log.info("obtained a new %s token %s, expires %s", self.market, mask_token(issued.access_token),
                  clock_module.to_kst_iso(issued.expires_at))
        return TokenRecord(issued.access_token, issued.token_type, self._clock(), issued.expires_at,
                           self.market, self.environment, self.key_fingerprint())

    # -- the seed API -------------------------------------------------------------------------

    def get_valid_token(self) -> str:
        """A token valid for at least the expiry margin (5 min), renewing first if needed.

        Served from memory while fresh (no file read); another process's renewal is picked up
        within a second.

        Raises:
            TokenUnavailableError: no valid token is held and none could be obtained.
            ConfigError: this market is not configured.
        """
        engine = self._built
        if engine is not None:
            record, fresh_until, since = engine.snapshot
            if since <= self._clock() < fresh_until:
                return record.access_token  # type: ignore[union-attr]
        return self._engine().serve().access_token

    def get_valid_record(self) -> TokenRecord:
        """Like :meth:`get_valid_token` but return the whole immutable record."""
        return self._engine().serve()._replace(market=self.market)

    def load_token(self) -> TokenRecord | None:
        """The key's stored record, or None if absent or unusable (warning logged)."""
        record = self._engine().current()
        return None if record is None else record._replace(market=self.market)

    def save_token(self, record: TokenRecord) -> None:
        """Store ``record`` atomically as the key's record and serve it from memory from now on."""
        self._engine().put(record)

    def delete_token(self) -> list[str]:
        """Remove the key's token and this market's story files; return the paths removed."""
        return self._engine().forget() + self.mirror.delete()

    def is_token_expired(self, record: TokenRecord | None = None) -> bool:
        """True if ``record`` (default: the stored one) is absent or has no more than the margin left."""
        if record is None:
            record = self.load_token()
        return record is None or record.seconds_left(self._clock()) <= self.windows.expiry_margin

    def get_token_info(self) -> dict[str, Any]:
        """Status of this market's token, as ``check --json`` prints it (see the README schema)."""
        from common.report import token_info

        return token_info(self)

    def load_renewal_state(self) -> RenewalState:
        """The key's shared renewal memory; an unusable file counts as empty (warning logged)."""
        return self._engine().load_state()

    # -- operations ---------------------------------------------------------------------------

    def refresh_token(self) -> TokenRecord:
        """Force a renewal now, whatever the current token's age.

        Returns:
            The new record; the same token if the broker re-sent it (within 6 h of an issuance).

        Raises:
            RateLimitedError: the broker (or the key's one-a-minute memory) refused; the token is kept.
            KISTokenError: any other failure; the current token is kept.
        """
        engine = self._engine()
        return engine.renew(engine.windows.lock_wait, lambda record, now: True)

    def replace_rejected_token(self, rejected: str) -> str:
        """Return a token other than ``rejected``, which the broker refused (``EGW00123``/``EGW00121``).

        Takes another process's newer token if there is one; otherwise renews (one request at most).
        """
        engine = self._engine()

        def needed(record: TokenRecord | None, now: float) -> bool:
            return record is None or record.access_token == rejected or engine.due(record, now)

        return engine.renew(engine.windows.lock_wait, needed).access_token

    def warm_up(self, valid_for: float) -> tuple[TokenRecord, bool]:
        """Make sure the key's token stays valid for ``valid_for`` seconds more, renewing only if not.

        Returns:
            The record and whether a new token was obtained.

        Raises:
            ValueError: ``valid_for`` is over :data:`~common.policy.MAX_HORIZON`.
            KISTokenError: a needed renewal failed.
        """
        if valid_for > MAX_HORIZON:
            raise ValueError(
                f"a horizon over {clock_module.format_duration(MAX_HORIZON)} can never be met: tokens "
                "live 24 h and the broker re-sends the same token within 6 h of issuing it, so a "
                "renewal gives at most 18 h, less the 5-min expiry margin"
            )
        engine = self._engine()

        def needed(record: TokenRecord | None, now: float) -> bool:
            return decide(record, now, NO_BACKOFF, engine.windows, valid_for).action is not Action.SERVE

        before = engine.current()
        if not needed(before, self._clock()):
            return before._replace(market=self.market), False  # type: ignore[union-attr]
        record = engine.renew(engine.windows.lock_wait, needed)
        renewed = before is None or record.access_token != before.access_token
        return record._replace(market=self.market), renewed

    def revoke(self) -> list[str]:
        """Revoke the key's token at the broker, then delete the local files.

        Raises:
            TokenUnavailableError: there is no local token to revoke.
            KISTokenError: the broker refused or could not be reached; local files are kept.
        """
        from common import kis_client

        engine = self._engine()
        with engine.store.lock.hold(engine.windows.lock_wait):
            record = engine.current()
            if record is None:
                raise TokenUnavailableError(f"no {self.market} token to revoke")
            app_key, app_secret = self.get_app_credentials()
            kis_client.revoke_token(self.get_api_url(), app_key, app_secret, record.access_token,
                                    sleep=self._sleep, session=self._session,
                                    timeouts=self._timeouts or kis_client.DEFAULT_TIMEOUTS)
            _log.info("revoked the %s token %s at the broker", self.market, mask_token(record.access_token))
            return self.delete_token()

    def create_broker(self, acc_no: str | None = None, **kwargs: Any) -> Any:
        """Build a mojito2 ``KoreaInvestment`` broker for this market that runs on the managed token.

        ``acc_no`` defaults to the market's account variable; other keyword arguments go to mojito.
        """
        from common.broker import create_broker

        return create_broker(self, acc_no, **kwargs)
