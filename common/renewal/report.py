"""What ``check`` and ``metrics`` show of a market's token: one dict, read from the store, no request."""

from __future__ import annotations

import re
from typing import Any

from common.clock import describe_offset, to_kst_iso
from common.credentials.records import mask_token
from common.renewal import policy
from common.store import selection

SCHEMA = 1
#: The transport's message for a broker that could not be reached names the URL first.
_UNREACHABLE = re.compile(r"broker unreachable at (\S+): ")
#: The longest failure summary in the ``status`` table (the full message is in ``check``).
SUMMARY_LENGTH = 72


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
    described, problem = selection.describe(store), store.record.problem()
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
        "removed": _removed(state),
        "last_failure": last_failure(state, described, problem),
        "approval": None if approval is None else {
            "key": mask_token(approval.approval_key),
            "issued_at": to_kst_iso(approval.issued_at),
            "age_seconds": int(now - approval.issued_at),
            "valid": policy.usable(approval, now, windows),
        },
        "clock_offset_seconds": round(manager.now.offset),
        "clock": describe_offset(manager.now.offset),
        "daily_limit": manager.settings.daily_limit,
        "issued_24h": len(state.recent_issuances(now)),
        "store": described,
        "problem": problem,
        "files": {
            "record": str(mirror.record_path),
            "issued_at": str(mirror.issued_at_path),
            "mojito": str(mirror.mojito_path),
            "key_record": store.record.location,
            "state": store.state.location,
            "lock": store.lock.location,
        },
    }


def _removed(state: Any) -> dict[str, Any] | None:
    """The key's token was deleted or revoked after its last request (None: it was not)."""
    at = state.removed_at
    if at is None or (state.last_outcome_at is not None and state.last_outcome_at > at):
        return None
    return {"how": state.removed_by or "deleted", "at": to_kst_iso(at)}


def last_failure(state: Any, store: dict[str, Any], problem: str | None) -> dict[str, Any] | None:
    """What stands in the way of the key's next renewal, if anything: the store (it does not answer,
    refuses our configuration, or cannot take the record), else the key's last request if it
    failed; None if nothing does.

    Returns:
        ``{"kind": "store" | "refused" | "failed", "at": ISO time or None, "code": broker code or
        None, "message": the whole message, "summary": a short line (``refused EGW00105``,
        ``broker unreachable (https://...)``, ``store unreachable (redis://...)``)}``.
    """
    if not store["reachable"] or store["misconfigured"]:
        what = "refuses this configuration" if store["misconfigured"] else "unreachable"
        return {"kind": "store", "at": None, "code": None, "message": store["error"],
                "summary": f"store {what} ({store['url']})"}
    if problem is not None:
        return {"kind": "store", "at": None, "code": None, "message": problem,
                "summary": "the token record cannot be written"}
    if state.last_outcome not in ("refused", "failed"):
        return None
    message = state.last_message or ""
    if state.last_outcome == "refused":
        summary = f"refused {state.last_code}" if state.last_code else "refused"
    else:
        unreachable = _UNREACHABLE.search(message)
        summary = f"broker unreachable ({unreachable.group(1)})" if unreachable else _shorten(message)
    return {"kind": state.last_outcome, "at": to_kst_iso(state.last_outcome_at or 0.0),
            "code": state.last_code, "message": state.last_message, "summary": summary}


def _shorten(text: str) -> str:
    line = " ".join(text.split()) or "failed"
    return line if len(line) <= SUMMARY_LENGTH else line[:SUMMARY_LENGTH - 3].rstrip() + "..."
