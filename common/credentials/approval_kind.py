"""The WebSocket approval key as a second credential kind of the same engine.

``POST /oauth2/Approval`` answers ``{"approval_key"}`` with no expiry; the portal says it is valid
24 h. So the record counts 24 h from its issuance and the engine renews it ahead of that with the
same windows as the token. One per app key (both markets share it when they share the key), kept
in ``key-<id>.approval.json`` (0600) beside the key's token record.
"""

from __future__ import annotations

import json
import logging
from typing import Any, NamedTuple

from common.clock import parse_iso, to_kst_iso
from common.credentials.identity import Credential
from common.credentials.records import CorruptRecordError, mask_token

#: The approval key's lifetime as the broker's portal states it.
APPROVAL_LIFETIME = 86400.0
FORMAT_VERSION = 1

_log = logging.getLogger(__name__)


class ApprovalRecord(NamedTuple):
    """An immutable snapshot of a WebSocket approval key.

    Attributes:
        approval_key: the key itself (a secret: never logged).
        issued_at: when it was obtained, epoch seconds.
        expires_at: ``issued_at`` + 24 h.
        environment: ``real`` or ``paper``.
        key_fingerprint: a hash of the app key it was issued to.
    """

    approval_key: str
    issued_at: float
    expires_at: float
    environment: str
    key_fingerprint: str

    def seconds_left(self, now: float) -> float:
        """Seconds until it is 24 h old (negative after)."""
        return self.expires_at - now

    def to_json(self) -> str:
        """Serialise to the on-disk JSON form."""
        return json.dumps({
            "version": FORMAT_VERSION,
            "kind": "approval",
            "environment": self.environment,
            "key_fingerprint": self.key_fingerprint,
            "approval_key": self.approval_key,
            "issued_at": to_kst_iso(self.issued_at),
            "expires_at": to_kst_iso(self.expires_at),
        }, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ApprovalRecord:
        """Parse and check the on-disk form; raise :class:`CorruptRecordError` if it is unusable."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise CorruptRecordError("not valid JSON") from None
        if not isinstance(data, dict) or data.get("kind") != "approval":
            raise CorruptRecordError("not an approval key record")
        if data.get("version") != FORMAT_VERSION:
            raise CorruptRecordError(f"unknown format version {data.get('version')!r}")
        values: dict[str, Any] = {}
        for name in ("approval_key", "environment", "key_fingerprint", "issued_at", "expires_at"):
            value = data.get(name)
            if not isinstance(value, str) or not value.strip():
                raise CorruptRecordError(f"field {name!r} is missing or not a non-empty string")
            values[name] = value
        try:
            issued, expires = parse_iso(values.pop("issued_at")), parse_iso(values.pop("expires_at"))
        except ValueError:
            raise CorruptRecordError("a time is not ISO 8601 with a zone offset") from None
        if expires <= issued:
            raise CorruptRecordError("expires_at is not after issued_at")
        return cls(issued_at=issued, expires_at=expires, **values)


class ApprovalKind:
    """A key's WebSocket approval key, asked for through one market's configuration.

    Args:
        manager: the market's token manager (hooks, clock, sleep, session, timeouts).
        credential: the key it belongs to.
    """

    def __init__(self, manager: Any, credential: Credential) -> None:
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
