"""What ``check`` and ``metrics`` show of a market's token: one dict, read from the store, no request."""

from __future__ import annotations

from typing import Any

from common.clock import describe_offset, to_kst_iso
from common.credentials.records import mask_token
from common.renewal import policy
from common.store import selection

SCHEMA = 1


def token_info(manager: Any) -> dict[str, Any]:
    """Status of ``manager``'s token as ``check --json`` prints it (the README documents the schema).

    ``status`` comes from :func:`common.renewal.policy.status`, the same decision the live path makes.

    Raises:
        ConfigError: the market is not configured (its key is needed to find the record).
    """
    now = manager.now()
    record = manager.load_token()
    windows = manager.windows
    status = policy.status(record, now, windows)
    left = None if record is None else record.seconds_left(now)
    state = manager.load_renewal_state()
    last = None
    if state.last_outcome is not None:
        last = {
            "outcome": state.last_outcome,
            "at": to_kst_iso(state.last_outcome_at or 0.0),
            "code": state.last_code,
            "message": state.last_message,
        }
    store, mirror = manager.store, manager.mirror
    approval = manager.load_approval_key()
    return {
        "schema": SCHEMA,
        "market": manager.market,
        "environment": manager.environment,
        "key_fingerprint": manager.key_fingerprint(),
        "status": status,
        "present": record is not None,
        "valid": status in ("ok", "renewal_due"),
        "issued_at": None if record is None else to_kst_iso(record.issued_at),
        "expires_at": None if record is None else to_kst_iso(record.expires_at),
        "seconds_left": None if left is None else int(left),
        "token": None if record is None else mask_token(record.access_token),
        "renewal_window_seconds": int(windows.advisory),
        "last_renewal": last,
        "approval": None if approval is None else {
            "key": mask_token(approval.approval_key),
            "issued_at": to_kst_iso(approval.issued_at),
            "age_seconds": int(now - approval.issued_at),
            "valid": approval.seconds_left(now) > windows.expiry_margin,
        },
        "clock_offset_seconds": round(manager.now.offset),
        "clock": describe_offset(manager.now.offset),
        "daily_limit": manager.settings.daily_limit,
        "issued_24h": len(state.recent_issuances(now)),
        "store": selection.describe(store),
        "problem": store.record.problem(),
        "files": {
            "record": str(mirror.record_path),
            "issued_at": str(mirror.issued_at_path),
            "mojito": str(mirror.mojito_path),
            "key_record": store.record.location,
            "state": store.state.location,
            "lock": store.lock.location,
        },
    }
