"""The WebSocket approval key as a second credential kind of the same engine.

``POST /oauth2/Approval`` answers ``{"approval_key"}`` with no expiry; the portal says it is valid
24 h. So the record counts 24 h from its issuance and the engine renews it ahead of that with the
same windows as the token. One per app key (both markets share it when they share the key), kept
in ``key-<id>.approval.json`` (0600) beside the key's token record.
"""

from __future__ import annotations

import logging

from common.credentials.access import KeyAccess
from common.credentials.identity import Credential
from common.credentials.records import APPROVAL_LIFETIME, ApprovalRecord, mask_token

_log = logging.getLogger(__name__)


class ApprovalKind:
    """A key's WebSocket approval key, asked for through one market's configuration.

    Args:
        manager: the market's hooks, clock, sleep, session and timeouts.
        credential: the key it belongs to.
    """

    def __init__(self, manager: KeyAccess, credential: Credential) -> None:
        self.manager = manager
        self.credential = credential

    def accept(self, record: ApprovalRecord) -> str | None:
        """Why a stored record is not this key's approval key (None: it is)."""
        if record.environment != self.credential.environment:
            return f"it was issued for environment {record.environment!r}"
        if record.key_fingerprint != self.credential.key_fingerprint:
            return "it was issued to another app key"
        return None

    def calibrate(self) -> bool:
        """Read the broker's clock into the manager's (one ``GET``, no request for a key)."""
        from common.credentials import kis_client

        return kis_client.probe_date(self.manager.get_api_url(), self.manager.now.observe,
                                     session=self.manager.session)

    def issue(self, current: ApprovalRecord | None) -> ApprovalRecord:
        """One ``/oauth2/Approval`` (with its retries) for this market's key."""
        from common.credentials import kis_client

        manager = self.manager
        app_key, app_secret = manager.get_app_credentials()
        key = kis_client.issue_approval_key(
            manager.get_api_url(), app_key, app_secret, sleep=manager.sleep, session=manager.session,
            timeouts=manager.timeouts or kis_client.DEFAULT_TIMEOUTS, on_date=manager.now.observe,
        )
        now = float(int(manager.now()))
        _log.info("obtained a WebSocket approval key %s for the %s key", mask_token(key), manager.market)
        return ApprovalRecord(key, now, now + APPROVAL_LIFETIME, self.credential.environment,
                              self.credential.key_fingerprint)
