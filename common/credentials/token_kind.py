"""The access token as a credential kind: how one is asked for and revoked, and how it is mirrored.

The engine (``common.renewal.engine``) runs any kind; this one talks to ``/oauth2/tokenP`` and
``/oauth2/revokeP`` through ``common.credentials.kis_client`` and keeps a market's story files
(``<prefix>api_token.json``, ``<prefix>token_issued_at.dat``, ``<prefix>krs_token.dat``) in step
with the key's record.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from common.clock import to_kst_iso
from common.credentials.identity import Credential
from common.credentials.records import CorruptRecordError, TokenRecord, mask_token
from common.errors import KISTokenError, StoreError
from common.store.file_store import MarketMirror, mirror_prefixes

_log = logging.getLogger(__name__)


class TokenKind:
    """One market's view of its key's access token.

    Args:
        manager: the market's token manager (hooks, clock, sleep, session, timeouts).
        credential: the key the token belongs to.
    """

    def __init__(self, manager: Any, credential: Credential) -> None:
        self.manager = manager
        self.credential = credential
        self.files = MarketMirror(manager.settings.token_dir, manager.get_token_file_prefix())

    def accept(self, record: TokenRecord) -> str | None:
        """Why a stored record is not this key's token (None: it is)."""
        return record.mismatch(None, self.credential.environment, self.credential.key_fingerprint)

    def issue(self, current: TokenRecord | None) -> TokenRecord:
        """One ``/oauth2/tokenP`` (with its retries) for this market's key.

        A token the broker re-sends (within 6 h of an issuance) keeps the record it had.
        """
        from common.credentials import kis_client

        manager = self.manager
        app_key, app_secret = manager.get_app_credentials()
        issued = kis_client.issue_token(
            manager.get_api_url(), app_key, app_secret, now=manager.now, sleep=manager.sleep,
            session=manager.session, min_lifetime=manager.windows.expiry_margin,
            timeouts=manager.timeouts or kis_client.DEFAULT_TIMEOUTS, on_date=manager.now.observe,
        )
        if current is not None and issued.access_token == current.access_token:
            _log.info("the broker re-sent the same %s token", manager.market)
            return current._replace(expires_at=issued.expires_at)
        _log.info("obtained a new %s token %s, expires %s", manager.market,
                  mask_token(issued.access_token), to_kst_iso(issued.expires_at))
        return TokenRecord(issued.access_token, issued.token_type, manager.now(), issued.expires_at,
                           manager.market, self.credential.environment, self.credential.key_fingerprint)

    def revoke(self, record: TokenRecord) -> None:
        """Revoke ``record``'s token with ``/oauth2/revokeP``."""
        from common.credentials import kis_client

        manager = self.manager
        app_key, app_secret = manager.get_app_credentials()
        kis_client.revoke_token(manager.get_api_url(), app_key, app_secret, record.access_token,
                                sleep=manager.sleep, session=manager.session,
                                timeouts=manager.timeouts or kis_client.DEFAULT_TIMEOUTS,
                                on_date=manager.now.observe)
        _log.info("revoked the %s token %s at the broker", manager.market, mask_token(record.access_token))

    def calibrate(self) -> bool:
        """Read the broker's clock into the manager's (one ``GET``, no token request)."""
        from common.credentials import kis_client

        return kis_client.probe_date(self.manager.get_api_url(), self.manager.now.observe,
                                     session=self.manager.session)

    def holds(self, record: TokenRecord) -> bool:
        """True if this market's story files already show the key's ``record``."""
        return self.files.holds(record._replace(market=self.manager.market), self.credential.key_id)

    def write(self, record: TokenRecord) -> None:
        """Write this market's story files for the key's ``record``."""
        self.files.write(record._replace(market=self.manager.market), self.credential.key_id)

    def copy(self) -> TokenRecord | None:
        """This market's mirror of the key's record (None if it is not one, or cannot be read)."""
        return self.files.load_copy(self.credential.key_id)

    def delete_other_copies(self) -> list[str]:
        """Remove the other markets' story files that mirror this key's token; return their paths."""
        removed: list[str] = []
        for prefix in mirror_prefixes(self.files.directory):
            other = MarketMirror(self.files.directory, prefix)
            if other.record_path != self.files.record_path:
                with contextlib.suppress(CorruptRecordError, KISTokenError):
                    if other.load_copy(self.credential.key_id) is not None:
                        removed += other.delete()
        return removed

    def legacy(self) -> TokenRecord | None:
        """The best record of this key left by version 0.1 in any market's file (the one that lives
        longest), to adopt as the key's record; None if there is none."""
        found = []
        for prefix in mirror_prefixes(self.files.directory):
            try:  # one market's unusable file (a FIFO, garbage) must not hide another's good one
                record = MarketMirror(self.files.directory, prefix).load_legacy()
            except (CorruptRecordError, StoreError) as exc:
                name = f"{prefix}api_token.json"
                reason = str(exc) if name in str(exc) else f"{exc} in {name}"
                _log.warning("ignoring the stored %s token: %s", self.manager.market, reason)
                continue
            if record is not None and self.accept(record) is None:
                found.append(record)
        return max(found, key=lambda record: record.expires_at, default=None)
