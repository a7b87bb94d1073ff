"""The access token as a credential kind: how one is asked for and revoked.

The engine (``common.renewal.engine``) runs any kind; this one talks to ``/oauth2/tokenP`` and
``/oauth2/revokeP`` through ``common.credentials.kis_client``. A market's story files, the token's
copies, are ``common.store.mirror``.
"""

from __future__ import annotations

import logging

from common.clock import to_kst_iso
from common.credentials.access import KeyAccess
from common.credentials.identity import Credential
from common.credentials.records import TokenRecord, mask_token

_log = logging.getLogger(__name__)


class TokenKind:
    """One market's view of its key's access token.

    Args:
        manager: the market's hooks, clock, sleep, session and timeouts.
        credential: the key the token belongs to.
        min_lifetime: a token the broker sends with no more than this left is refused (the expiry
            margin).
    """

    def __init__(self, manager: KeyAccess, credential: Credential, min_lifetime: float) -> None:
        self.manager = manager
        self.credential = credential
        self.min_lifetime = min_lifetime

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
            session=manager.session, min_lifetime=self.min_lifetime,
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
