"""Which store holds a key's token: the token directory (one host) or a Redis/Valkey server that
several hosts share (``KIS_TOKEN_STORE``). redis is imported only for the latter."""

from __future__ import annotations

from typing import Any

from common.settings import Settings, token_store_url
from common.store import file_store
from common.store.protocols import KeyStore


def key_store(settings: Settings, key_id: str, kind: str = "token") -> KeyStore[Any]:
    """The store of key ``key_id``'s credential of ``kind`` (``token`` or ``approval``) that
    ``KIS_TOKEN_STORE`` selects.

    Raises:
        ConfigError: ``KIS_TOKEN_STORE`` is neither ``file`` nor a usable URL.
    """
    url = token_store_url(settings)
    if url is None:
        return file_store.key_store(settings.token_dir, key_id, kind)
    from common.store import redis_store

    return redis_store.shared_key_store(url, settings.token_dir, key_id, kind)


def describe(store: KeyStore[Any]) -> dict[str, Any]:
    """Which store ``store`` is and whether it answers, as ``check --json`` shows it under ``store``."""
    if hasattr(store.record, "link"):
        from common.store import redis_store

        return redis_store.describe(store)
    return {"kind": "file", "url": None, "reachable": True, "misconfigured": False, "error": None,
            "prefix": None}
