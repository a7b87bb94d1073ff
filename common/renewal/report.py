"""What ``check`` and ``metrics`` show of a market's token: one dict, read from the store, no request."""

from __future__ import annotations

import re
from typing import Any

from common.clock import describe_offset, to_kst_iso
from common.credentials.records import mask_token
from common.errors import KISTokenError
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
        "call_budget": call_budget_info(manager),
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


def call_budget_info(manager: Any) -> dict[str, Any]:
    """The key's call budget as ``check --json`` shows it (read only: the budget's file, without its
    lock and without creating it, or the store's counters; no request to the broker).

    Returns:
        ``{"rate", "paced_rate", "calls_last_minute", "egw00201_last_minute", "egw00201_total",
        "backend": "file" | "redis", "store_down", "hosts", "location", "error"}``; ``error`` is
        None, or why the counters could not be read (then they are null).
    """
    rate = manager.settings.rate_limit
    try:
        budget = manager.call_budget()
        snap = budget.snapshot()
    except KISTokenError as exc:  # a budget file that is not one, a store that refuses us
        return {"rate": rate, "paced_rate": None, "calls_last_minute": None, "egw00201_last_minute": None,
                "egw00201_total": None, "backend": None, "store_down": None, "hosts": None,
                "location": None, "error": str(exc)}
    return {"rate": snap.rate, "paced_rate": round(snap.paced_rate, 2),
            "calls_last_minute": snap.calls_last_minute, "egw00201_last_minute": snap.egw00201_seen,
            "egw00201_total": snap.egw00201_total, "backend": snap.backend, "store_down": snap.store_down,
            "hosts": snap.hosts, "location": snap.location, "error": None}


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
