"""The two credential records (the token, the WebSocket approval key): what is kept per key, and how
it is checked when read back (one validator for both)."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from common.clock import EARLIEST, LATEST, parse_iso, to_kst_iso
from common.errors import CorruptRecordError

FORMAT_VERSION = 1
#: The approval key's lifetime as the broker's portal states it.
APPROVAL_LIFETIME = 86400.0


class TokenRecord(NamedTuple):
    """An immutable snapshot of a token.

    Attributes:
        access_token: the bearer token itself.
        token_type: ``Bearer``.
        issued_at: when it was obtained, epoch seconds.
        expires_at: when the broker says it expires, epoch seconds.
        market: ``us`` or ``kr``: the market that asked for it (a key's record serves both).
        environment: ``real`` or ``paper``.
        key_fingerprint: a hash of the app key it was issued to (never the key or secret).
    """

    access_token: str
    token_type: str
    issued_at: float
    expires_at: float
    market: str
    environment: str
    key_fingerprint: str

    def seconds_left(self, now: float) -> float:
        """Seconds until expiry (negative once expired)."""
        return self.expires_at - now

    def mismatch(self, market: str | None, environment: str, key_fingerprint: str) -> str | None:
        """Say why this record does not belong to the given configuration, or None if it does.

        ``market`` None skips the market (a key's record serves every market that uses the key).
        """
        if market is not None and self.market != market:
            return f"it belongs to market {self.market!r}"
        if self.environment != environment:
            return f"it was issued for environment {self.environment!r}, not {environment!r}"
        if self.key_fingerprint != key_fingerprint:
            return "it was issued to another app key"
        return None

    def to_json(self, mirror_of: str | None = None) -> str:
        """Serialise to the on-disk JSON form (a market's mirror names the key record it mirrors)."""
        data: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "market": self.market,
            "environment": self.environment,
            "key_fingerprint": self.key_fingerprint,
            "token_type": self.token_type,
            "access_token": self.access_token,
            "issued_at": to_kst_iso(self.issued_at),
            "expires_at": to_kst_iso(self.expires_at),
        }
        if mirror_of is not None:
            data["mirror_of"] = mirror_of
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> TokenRecord:
        """Parse and check the on-disk JSON form.

        Raises:
            CorruptRecordError: empty, not JSON, wrong shape, wrong types or an unknown version.
        """
        data = _load_object(text)
        fields = {
            name: _require_str(data, name)
            for name in ("market", "environment", "key_fingerprint", "token_type", "access_token")
        }
        return cls(**_lifetime(data), **fields)


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
        """Parse and check the on-disk form.

        Raises:
            CorruptRecordError: empty, not JSON, not an approval key record, wrong types, an
                unknown version or implausible times.
        """
        data = _load_object(text)
        if data.get("kind") != "approval":
            raise CorruptRecordError("not an approval key record")
        names = ("approval_key", "environment", "key_fingerprint")
        fields = {name: _require_str(data, name) for name in names}
        return cls(**_lifetime(data), **fields)


#: The record type of each credential kind; each carries its codec (``to_json``/``from_json``).
RECORD_TYPES: dict[str, type[TokenRecord] | type[ApprovalRecord]] = {
    "token": TokenRecord,
    "approval": ApprovalRecord,
}


def _load_object(text: str) -> dict[str, Any]:
    """The JSON object of a record of this format version."""
    if not text.strip():
        raise CorruptRecordError("the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptRecordError(f"not valid JSON ({exc.msg}, char {exc.pos})") from None
    except (ValueError, RecursionError):
        raise CorruptRecordError("not valid JSON") from None
    if not isinstance(data, dict):
        raise CorruptRecordError(f"expected a JSON object, found {type(data).__name__}")
    if data.get("version") != FORMAT_VERSION:
        raise CorruptRecordError(f"unknown format version {data.get('version')!r}")
    return data


def _lifetime(data: dict[str, Any]) -> dict[str, float]:
    """``issued_at`` and ``expires_at``: plausible times, in order."""
    issued_at = _require_time(data, "issued_at")
    expires_at = _require_time(data, "expires_at")
    if expires_at <= issued_at:
        raise CorruptRecordError("expires_at is not after issued_at")
    return {"issued_at": issued_at, "expires_at": expires_at}


def _require_str(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise CorruptRecordError(f"field {name!r} is missing or not a non-empty string")
    return value


def _require_time(data: dict[str, Any], name: str) -> float:
    value = _require_str(data, name)
    try:
        moment = parse_iso(value)
    except ValueError:
        raise CorruptRecordError(f"field {name!r} is not an ISO time with a zone offset") from None
    if not EARLIEST <= moment <= LATEST:
        raise CorruptRecordError(f"field {name!r} is not a plausible time")
    return moment


def mask_token(token: str | None) -> str:
    """Show only a few characters of a token: enough to tell two apart, useless to an attacker."""
    if not token:
        return "-"
    if len(token) < 16:
        return "***"
    return f"{token[:4]}...{token[-4:]}"
